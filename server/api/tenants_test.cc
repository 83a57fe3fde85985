#include "server/api/tenants.h"

#include <atomic>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::api {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr char kKeyFile[] =
    "# keys for the test\n"
    "\n"
    "admin-key-0001 ops admin\n"
    "  acme-key-0001\tacme   tenant  \r\n"
    "globex-key-001 globex tenant\n"
    "acme-key-0002 acme tenant\n";

Principal Tenant(const std::string& tenant) { return {tenant, Role::kTenant}; }
Principal Admin() { return {"ops", Role::kAdmin}; }

// ---------------------------------------------------------------- ApiKeys

TEST(ApiKeysTest, ParsesKeysAndFindsPrincipals) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(kKeyFile, "keys.txt");
  ASSERT_OK(keys);
  EXPECT_EQ(keys->size(), 4u);

  std::optional<Principal> admin = keys->Find("admin-key-0001");
  ASSERT_TRUE(admin.has_value());
  EXPECT_EQ(admin->tenant, "ops");
  EXPECT_TRUE(admin->is_admin());

  std::optional<Principal> acme = keys->Find("acme-key-0001");
  ASSERT_TRUE(acme.has_value());
  EXPECT_EQ(acme->tenant, "acme");
  EXPECT_EQ(acme->role, Role::kTenant);
  EXPECT_FALSE(acme->is_admin());
  EXPECT_EQ(keys->Find("acme-key-0002")->tenant, "acme");
  EXPECT_EQ(keys->Find("globex-key-001")->tenant, "globex");
}

TEST(ApiKeysTest, UnknownKeysAreNotFound) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(kKeyFile, "keys.txt");
  ASSERT_OK(keys);
  EXPECT_FALSE(keys->Find("").has_value());
  EXPECT_FALSE(keys->Find("acme-key-000").has_value());    // a prefix
  EXPECT_FALSE(keys->Find("acme-key-00011").has_value());  // an extension
  EXPECT_FALSE(keys->Find("ACME-KEY-0001").has_value());   // keys are case-sensitive
  EXPECT_FALSE(keys->Find("acme tenant").has_value());
}

TEST(ApiKeysTest, EmptyFileHasNoKeys) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse("# nobody yet\n\n", "keys.txt");
  ASSERT_OK(keys);
  EXPECT_EQ(keys->size(), 0u);
  EXPECT_FALSE(keys->Find("anything-at-all").has_value());
}

TEST(ApiKeysTest, AdminKeyMayBelongToDefault) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::Parse("root-key-0001 default admin\n", "k");
  ASSERT_OK(keys);
  EXPECT_TRUE(keys->Find("root-key-0001")->is_admin());
}

struct BadFile {
  std::string text;
  const char* where;     // "path:line"
  const char* expected;  // a piece of the message
};

TEST(ApiKeysTest, EveryErrorNamesPathLineAndExpectation) {
  const std::vector<BadFile> cases = {
      {"# ok\nacme-key-0001 acme\n", "keys.txt:2:", "expected \"KEY TENANT ROLE\""},
      {"acme-key-0001 acme tenant extra\n", "keys.txt:1:", "4 fields"},
      {"\n\nacme-key-0001 acme owner\n", "keys.txt:3:", "expected \"admin\" or \"tenant\""},
      {"acme-key-0001 acme Admin\n", "keys.txt:1:", "role \"Admin\""},
      {"acme-key-0001 ac/me tenant\n", "keys.txt:1:", "tenant \"ac/me\": expected 1-64"},
      {"acme-key-0001 acm%e tenant\n", "keys.txt:1:", "tenant \"acm%e\""},
      {"acme-key-0001 " + std::string(65, 'a') + " tenant\n", "keys.txt:1:", "expected 1-64"},
      {"short7x acme tenant\n", "keys.txt:1:", "key of 7 characters: expected at least 8"},
      {"acme-key-0001 acme tenant\n#\nacme-key-0001 globex tenant\n",
       "keys.txt:3:", "duplicate key (first on line 1)"},
      {"dflt-key-0001 default tenant\n", "keys.txt:1:", "tenant-role key for tenant \"default\""},
  };
  for (const BadFile& bad : cases) {
    SCOPED_TRACE(bad.text);
    absl::StatusOr<ApiKeys> keys = ApiKeys::Parse(bad.text, "keys.txt");
    ASSERT_FALSE(keys.ok());
    EXPECT_THAT(keys, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(std::string(keys.status().message()), HasSubstr(bad.where));
    EXPECT_THAT(std::string(keys.status().message()), HasSubstr(bad.expected));
  }
}

TEST(ApiKeysTest, ErrorsNeverQuoteAKey) {
  absl::StatusOr<ApiKeys> keys =
      ApiKeys::Parse("secret-0001 acme tenant\nsecret-0001 acme tenant\n", "keys.txt");
  ASSERT_FALSE(keys.ok());
  EXPECT_THAT(std::string(keys.status().message()), Not(HasSubstr("secret-0001")));
}

TEST(ApiKeysTest, LoadFileReadsAFileAndNamesItInErrors) {
  const std::string path = ::testing::TempDir() + "/tenants_test_keys.txt";
  {
    std::ofstream out(path);
    out << kKeyFile << "bad line\n";
  }
  absl::StatusOr<ApiKeys> keys = ApiKeys::LoadFile(path);
  ASSERT_FALSE(keys.ok());
  EXPECT_THAT(std::string(keys.status().message()), HasSubstr(path + ":7:"));

  {
    std::ofstream out(path);
    out << kKeyFile;
  }
  keys = ApiKeys::LoadFile(path);
  ASSERT_OK(keys);
  EXPECT_EQ(keys->size(), 4u);
  std::remove(path.c_str());
}

TEST(ApiKeysTest, MissingFileIsNotFound) {
  absl::StatusOr<ApiKeys> keys = ApiKeys::LoadFile("/nonexistent/keys.txt");
  EXPECT_THAT(keys, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(std::string(keys.status().message()), HasSubstr("/nonexistent/keys.txt"));
}

// ---------------------------------------------------------------- AdapterAccess

TEST(AdapterAccessTest, TenantUsesOwnAndDefaultButNotOthers) {
  const Principal acme = Tenant("acme");
  EXPECT_TRUE(AdapterAccess::CanUse(acme, "acme/bot"));
  EXPECT_TRUE(AdapterAccess::CanUse(acme, "default/base-chat"));
  EXPECT_FALSE(AdapterAccess::CanUse(acme, "globex/bot"));
  EXPECT_FALSE(AdapterAccess::CanUse(acme, "acme-other/bot"));
}

TEST(AdapterAccessTest, TenantChangesOnlyOwn) {
  const Principal acme = Tenant("acme");
  EXPECT_TRUE(AdapterAccess::CanChange(acme, "acme/bot"));
  EXPECT_FALSE(AdapterAccess::CanChange(acme, "default/base-chat"));
  EXPECT_FALSE(AdapterAccess::CanChange(acme, "globex/bot"));
  // A tenant-role principal for the operators' tenant changes nothing there.
  EXPECT_FALSE(AdapterAccess::CanChange(Tenant("default"), "default/base-chat"));
}

TEST(AdapterAccessTest, AdminUsesAndChangesEverything) {
  for (const char* id : {"acme/bot", "globex/bot", "default/base-chat"}) {
    EXPECT_TRUE(AdapterAccess::CanUse(Admin(), id)) << id;
    EXPECT_TRUE(AdapterAccess::CanChange(Admin(), id)) << id;
  }
}

TEST(AdapterAccessTest, MalformedIdsAreNeitherUsableNorChangeable) {
  for (const char* id : {"bot", "/bot", "acme/", "acme/b/ot", "acme/b ot", ""}) {
    EXPECT_FALSE(AdapterAccess::CanUse(Admin(), id)) << id;
    EXPECT_FALSE(AdapterAccess::CanChange(Admin(), id)) << id;
    EXPECT_FALSE(AdapterAccess::CanUse(Tenant("acme"), id)) << id;
  }
}

TEST(AdapterAccessTest, BareNameFromTenantTriesOwnThenDefault) {
  absl::StatusOr<std::vector<std::string>> ids = AdapterAccess::Candidates(Tenant("acme"), "bot");
  ASSERT_OK(ids);
  EXPECT_THAT(*ids, ElementsAre("acme/bot", "default/bot"));
}

TEST(AdapterAccessTest, BareNameFromAdminMeansDefault) {
  absl::StatusOr<std::vector<std::string>> ids = AdapterAccess::Candidates(Admin(), "bot");
  ASSERT_OK(ids);
  EXPECT_THAT(*ids, ElementsAre("default/bot"));
}

TEST(AdapterAccessTest, FullIdIsTheOnlyCandidateAndAccessIsCheckedSeparately) {
  absl::StatusOr<std::vector<std::string>> ids =
      AdapterAccess::Candidates(Tenant("acme"), "globex/bot");
  ASSERT_OK(ids);
  EXPECT_THAT(*ids, ElementsAre("globex/bot"));
  EXPECT_FALSE(AdapterAccess::CanUse(Tenant("acme"), (*ids)[0]));

  ids = AdapterAccess::Candidates(Tenant("acme"), "default/bot");
  ASSERT_OK(ids);
  EXPECT_THAT(*ids, ElementsAre("default/bot"));
}

TEST(AdapterAccessTest, MalformedNameIsInvalidArgument) {
  for (const char* name : {"", "b ot", "acme/", "a/b/c", "bot!"}) {
    absl::StatusOr<std::vector<std::string>> ids = AdapterAccess::Candidates(Tenant("acme"), name);
    ASSERT_FALSE(ids.ok()) << name;
    EXPECT_THAT(ids, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(std::string(ids.status().message()), HasSubstr(absl::StrCat("\"", name, "\"")));
    EXPECT_THAT(std::string(ids.status().message()), HasSubstr("tenant/name"));
  }
}

TEST(AdapterAccessTest, OwnedIdForTenant) {
  EXPECT_EQ(AdapterAccess::OwnedId(Tenant("acme"), "bot").value(), "acme/bot");
  EXPECT_EQ(AdapterAccess::OwnedId(Tenant("acme"), "acme/bot").value(), "acme/bot");

  absl::StatusOr<std::string> id = AdapterAccess::OwnedId(Tenant("acme"), "globex/bot");
  EXPECT_THAT(id, StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(std::string(id.status().message()), HasSubstr("\"acme\""));
  EXPECT_THAT(std::string(id.status().message()), HasSubstr("\"globex\""));

  id = AdapterAccess::OwnedId(Tenant("acme"), "default/bot");
  EXPECT_THAT(id, StatusIs(absl::StatusCode::kPermissionDenied));

  id = AdapterAccess::OwnedId(Tenant("acme"), "b@d");
  EXPECT_THAT(id, StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(AdapterAccessTest, OwnedIdForAdmin) {
  EXPECT_EQ(AdapterAccess::OwnedId(Admin(), "bot").value(), "default/bot");
  EXPECT_EQ(AdapterAccess::OwnedId(Admin(), "globex/bot").value(), "globex/bot");
  EXPECT_THAT(AdapterAccess::OwnedId(Admin(), "x/"), StatusIs(absl::StatusCode::kInvalidArgument));
}

// ---------------------------------------------------------------- CheckQuota

TEST(CheckQuotaTest, UnlimitedQuotaAllowsAnything) {
  EXPECT_OK(CheckQuota({}, "acme", 1000, int64_t{1} << 40, int64_t{1} << 40, false, 0));
}

TEST(CheckQuotaTest, AdapterCount) {
  const TenantQuota quota{.max_adapters = 2};
  EXPECT_OK(CheckQuota(quota, "acme", 0, 0, 100, false, 0));
  EXPECT_OK(CheckQuota(quota, "acme", 1, 100, 100, false, 0));

  absl::Status full = CheckQuota(quota, "acme", 2, 200, 100, false, 0);
  EXPECT_THAT(full, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(std::string(full.message()), HasSubstr("\"acme\""));
  EXPECT_THAT(std::string(full.message()), HasSubstr("stores 2 adapters"));
  EXPECT_THAT(std::string(full.message()), HasSubstr("max_adapters) is 2"));

  // Replacing one of the two does not add a third.
  EXPECT_OK(CheckQuota(quota, "acme", 2, 200, 100, true, 100));
}

TEST(CheckQuotaTest, TotalBytes) {
  const TenantQuota quota{.max_adapter_bytes = 1000};
  EXPECT_OK(CheckQuota(quota, "acme", 3, 600, 400, false, 0));  // exactly at the limit

  absl::Status over = CheckQuota(quota, "acme", 3, 600, 401, false, 0);
  EXPECT_THAT(over, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(std::string(over.message()), HasSubstr("\"acme\""));
  EXPECT_THAT(std::string(over.message()), HasSubstr("1001 adapter bytes (600 stored + 401 new)"));
  EXPECT_THAT(std::string(over.message()), HasSubstr("max_adapter_bytes) is 1000"));

  // The replaced version's bytes are not counted twice...
  EXPECT_OK(CheckQuota(quota, "acme", 3, 600, 700, true, 300));
  // ...but a bigger replacement may still not fit.
  over = CheckQuota(quota, "acme", 3, 600, 701, true, 300);
  EXPECT_THAT(over, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(std::string(over.message()), HasSubstr("600 stored - 300 replaced + 701 new"));
  // replaced_bytes only counts for a replacement.
  EXPECT_FALSE(CheckQuota(quota, "acme", 3, 600, 700, false, 300).ok());
}

TEST(CheckQuotaTest, BothLimits) {
  const TenantQuota quota{.max_adapters = 1, .max_adapter_bytes = 100};
  EXPECT_OK(CheckQuota(quota, "acme", 0, 0, 100, false, 0));
  EXPECT_FALSE(CheckQuota(quota, "acme", 0, 0, 101, false, 0).ok());
  EXPECT_FALSE(CheckQuota(quota, "acme", 1, 10, 10, false, 0).ok());
}

// ---------------------------------------------------------------- RateLimiter

class FakeClock {
 public:
  void Advance(absl::Duration d) { now_ += d; }
  std::function<absl::Time()> AsFunction() {
    return [this] { return now_; };
  }

 private:
  absl::Time now_ = absl::FromUnixSeconds(1700000000);
};

TEST(RateLimiterTest, LimitsOffAdmitEverything) {
  FakeClock clock;
  RateLimiter limiter({}, clock.AsFunction());
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(limiter.Admit("acme").allowed);
  limiter.ChargeTokens("acme", 1000000);
  EXPECT_TRUE(limiter.Admit("acme").allowed);
}

TEST(RateLimiterTest, RequestBurstThenRefill) {
  FakeClock clock;
  RateLimiter limiter({.requests_per_second = 4}, clock.AsFunction());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(limiter.Admit("acme").allowed) << i;

  RateLimiter::Decision refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after, absl::Milliseconds(250));
  EXPECT_THAT(refused.reason, HasSubstr("\"acme\""));
  EXPECT_THAT(refused.reason, HasSubstr("requests_per_second"));

  clock.Advance(absl::Milliseconds(100));
  refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after, absl::Milliseconds(150));

  clock.Advance(refused.retry_after);
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  EXPECT_FALSE(limiter.Admit("acme").allowed);

  // A long pause refills up to the capacity, no further.
  clock.Advance(absl::Hours(1));
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(limiter.Admit("acme").allowed) << i;
  EXPECT_FALSE(limiter.Admit("acme").allowed);
}

TEST(RateLimiterTest, SlowRateHasCapacityOne) {
  FakeClock clock;
  RateLimiter limiter({.requests_per_second = 0.5}, clock.AsFunction());
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  RateLimiter::Decision refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after, absl::Seconds(2));
  clock.Advance(absl::Seconds(1));
  EXPECT_FALSE(limiter.Admit("acme").allowed);
  clock.Advance(absl::Seconds(1));
  EXPECT_TRUE(limiter.Admit("acme").allowed);
}

TEST(RateLimiterTest, RetryAfterIsEnoughForAnAwkwardRate) {
  FakeClock clock;
  RateLimiter limiter({.requests_per_second = 3}, clock.AsFunction());
  for (int round = 0; round < 20; ++round) {
    while (limiter.Admit("acme").allowed) {
    }
    RateLimiter::Decision refused = limiter.Admit("acme");
    ASSERT_FALSE(refused.allowed);
    ASSERT_GT(refused.retry_after, absl::ZeroDuration());
    ASSERT_LE(refused.retry_after, absl::Milliseconds(334));
    clock.Advance(refused.retry_after);
    ASSERT_TRUE(limiter.Admit("acme").allowed) << round;
  }
}

TEST(RateLimiterTest, TokensGoNegativeAndRecover) {
  FakeClock clock;
  RateLimiter limiter({.tokens_per_minute = 600}, clock.AsFunction());  // 10 tokens/s
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  limiter.ChargeTokens("acme", 500);
  EXPECT_TRUE(limiter.Admit("acme").allowed);  // 100 left
  limiter.ChargeTokens("acme", 300);           // -200

  RateLimiter::Decision refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_THAT(refused.reason, HasSubstr("\"acme\""));
  EXPECT_THAT(refused.reason, HasSubstr("tokens_per_minute"));
  EXPECT_THAT(refused.reason, HasSubstr("-200 tokens left"));
  // Up to one positive token at 10 tokens/s.
  EXPECT_EQ(refused.retry_after, absl::Milliseconds(20100));

  clock.Advance(absl::Seconds(20));  // level 0: not positive yet
  refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after, absl::Milliseconds(100));

  clock.Advance(refused.retry_after);
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  // Admission takes no tokens: only charges do.
  EXPECT_TRUE(limiter.Admit("acme").allowed);
}

TEST(RateLimiterTest, TokenBucketCapsAtTokensPerMinute) {
  FakeClock clock;
  RateLimiter limiter({.tokens_per_minute = 600}, clock.AsFunction());
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  clock.Advance(absl::Hours(1));
  limiter.ChargeTokens("acme", 600);  // all of a full bucket, however long it waited
  EXPECT_FALSE(limiter.Admit("acme").allowed);
}

TEST(RateLimiterTest, BothLimitsRetryAfterTheLongerWait) {
  FakeClock clock;
  RateLimiter limiter({.requests_per_second = 1, .tokens_per_minute = 60}, clock.AsFunction());
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  limiter.ChargeTokens("acme", 64);  // -4 tokens at 1 token/s

  RateLimiter::Decision refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after, absl::Seconds(5));
  EXPECT_THAT(refused.reason, HasSubstr("requests_per_second"));
  EXPECT_THAT(refused.reason, HasSubstr("tokens_per_minute"));

  clock.Advance(absl::Seconds(1));
  refused = limiter.Admit("acme");
  EXPECT_FALSE(refused.allowed);
  EXPECT_THAT(refused.reason, Not(HasSubstr("requests_per_second")));
  EXPECT_EQ(refused.retry_after, absl::Seconds(4));
}

TEST(RateLimiterTest, TenantsAreIndependent) {
  FakeClock clock;
  RateLimiter limiter({.requests_per_second = 2, .tokens_per_minute = 100}, clock.AsFunction());
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  EXPECT_FALSE(limiter.Admit("acme").allowed);
  EXPECT_TRUE(limiter.Admit("globex").allowed);

  limiter.ChargeTokens("globex", 1000);
  EXPECT_FALSE(limiter.Admit("globex").allowed);
  clock.Advance(absl::Seconds(1));
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  EXPECT_FALSE(limiter.Admit("globex").allowed);
}

TEST(RateLimiterTest, ConcurrentAdmitsTakeExactlyTheBurst) {
  FakeClock clock;  // not advanced while the threads run
  RateLimiter limiter({.requests_per_second = 50}, clock.AsFunction());
  std::atomic<int> allowed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) allowed += limiter.Admit("acme").allowed ? 1 : 0;
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(allowed.load(), 50);
}

TEST(RateLimiterTest, ClockSteppingBackRefillsNothing) {
  FakeClock clock;
  RateLimiter limiter({.requests_per_second = 1}, clock.AsFunction());
  EXPECT_TRUE(limiter.Admit("acme").allowed);
  clock.Advance(absl::Seconds(-10));
  EXPECT_FALSE(limiter.Admit("acme").allowed);
  clock.Advance(absl::Seconds(10));
  EXPECT_FALSE(limiter.Admit("acme").allowed);  // the step back is not refilled twice
  clock.Advance(absl::Seconds(1));
  EXPECT_TRUE(limiter.Admit("acme").allowed);
}

}  // namespace
}  // namespace loraserve::api
