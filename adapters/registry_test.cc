#include "adapters/registry.h"

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "adapters/testing.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::adapters {
namespace {

using ::loraserve::test_support::StatusIs;

namespace fs = std::filesystem;
using test_support::FreshDir;
using test_support::LoraConfigJson;
using test_support::LoraTensors;
using test_support::SharedModelShape;
using test_support::WriteAdapter;
using test_support::WriteSmallAdapter;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// float32 bytes of WriteSmallAdapter(dir, r = 4): 4 layers x {q, v} x (A 4x64 + B 64x4).
constexpr size_t kSmallBytes = 4 * 2 * (4 * 64 + 64 * 4) * sizeof(float);

std::string SharedAdapter(const std::string& name) {
  return std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/" + name;
}

std::unique_ptr<AdapterRegistry> MakeRegistry(size_t host_budget_bytes = 0) {
  absl::StatusOr<std::unique_ptr<AdapterRegistry>> registry = AdapterRegistry::Create(
      {.base = SharedModelShape(), .limits = {.max_rank = 16}, .default_tenant = "default",
       .host_budget_bytes = host_budget_bytes});
  EXPECT_OK(registry);
  return std::move(registry).value();
}

// Everything observable about a registry, to check that a failure changed nothing.
std::string Snapshot(const AdapterRegistry& registry) {
  std::string out;
  for (const AdapterInfo& info : registry.List()) {
    out += info.id + " v" + std::to_string(info.version) + " " + info.content_hash + " " +
           info.dir + (info.pinned ? " pinned" : "") + (info.resident ? " resident" : "") + "\n";
  }
  const AdapterRegistryStats stats = registry.stats();
  return out + "live " + std::to_string(stats.live_adapters) + " bytes " +
         std::to_string(stats.host_bytes) + " evictions " + std::to_string(stats.host.evictions);
}

TEST(AdapterIdTest, CanonicalForms) {
  EXPECT_EQ(*CanonicalAdapterId("acme/support-bot", "default"), "acme/support-bot");
  EXPECT_EQ(*CanonicalAdapterId("v1.2_final", "default"), "default/v1.2_final");
  EXPECT_OK(CanonicalAdapterId(std::string(64, 'a') + "/" + std::string(64, 'b'), "d"));
  for (const std::string& bad : std::vector<std::string>{"", "/x", "x/", "a/b/c", "a b", "t/ü", std::string(65, 'a'),
                                "t/" + std::string(65, 'a'), "t/x?y", "..", "./x", "t/..", "../z"}) {
    absl::StatusOr<std::string> id = CanonicalAdapterId(bad, "default");
    ASSERT_FALSE(id.ok()) << bad;
    EXPECT_THAT(id, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(id.status().message(), AllOf(HasSubstr("\"" + bad + "\""), HasSubstr("tenant/name")));
  }
  EXPECT_FALSE(AdapterRegistry::Create({.base = SharedModelShape(), .limits = {}, .default_tenant = "a/b"}).ok());
}

TEST(AdapterRegistryTest, LoadAcquireAndInfo) {
  auto registry = MakeRegistry();
  absl::StatusOr<AdapterInfo> info = registry->Load("qv", SharedAdapter("qv-r4"));
  ASSERT_OK(info);
  EXPECT_EQ(info->id, "default/qv");
  EXPECT_EQ(info->version, 1);
  EXPECT_THAT(info->ranks, ElementsAre(4));
  EXPECT_THAT(info->target_modules, ElementsAre("q_proj", "v_proj"));
  EXPECT_EQ(info->bytes, kSmallBytes);
  EXPECT_TRUE(info->resident);
  EXPECT_FALSE(info->pinned);

  absl::StatusOr<AdapterHandle> handle = registry->Acquire("default/qv");
  ASSERT_OK(handle);
  EXPECT_EQ((*handle)->id, "default/qv");
  EXPECT_EQ((*handle)->version, 1);
  EXPECT_EQ((*handle)->content_hash(), info->content_hash);
  EXPECT_EQ((*handle)->adapter.weights(0, LoraModule::kQProj).rank, 4);

  EXPECT_THAT(registry->Acquire("nope"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(registry->Acquire("nope").status().message(), HasSubstr("default/nope"));
  EXPECT_THAT(registry->Acquire("bad id"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(registry->stats().host.hits, 1);
}

TEST(AdapterRegistryTest, ReplaceMakesANewVersionAndInFlightHandlesKeepTheirs) {
  auto registry = MakeRegistry();
  ASSERT_OK(registry->Load("t/x", SharedAdapter("ocean")));
  ASSERT_OK(registry->Pin("t/x"));
  AdapterHandle v1 = *registry->Acquire("t/x");
  absl::StatusOr<AdapterInfo> replaced = registry->Load("t/x", SharedAdapter("robot"));
  ASSERT_OK(replaced);
  EXPECT_EQ(replaced->version, 2);
  EXPECT_TRUE(replaced->pinned) << "pinning belongs to the id";
  AdapterHandle v2 = *registry->Acquire("t/x");
  EXPECT_EQ(v1->version, 1);
  EXPECT_EQ(v2->version, 2);
  EXPECT_NE(v1->content_hash(), v2->content_hash());
  EXPECT_EQ(v1->dir, SharedAdapter("ocean"));
  EXPECT_EQ(registry->List().size(), 1u);
  EXPECT_EQ(registry->stats().live_adapters, 2);

  std::weak_ptr<const LoadedAdapter> old = v1;
  v1.reset();
  EXPECT_TRUE(old.expired()) << "the old version is freed with its last handle";
  EXPECT_EQ(registry->stats().live_adapters, 1);
  EXPECT_EQ(registry->stats().host_bytes, v2->adapter.bytes());
  EXPECT_EQ(registry->Load("t/x", SharedAdapter("qv-r4"))->version, 3);
}

TEST(AdapterRegistryTest, FailedLoadsLeaveTheRegistryUnchanged) {
  auto registry = MakeRegistry();
  ASSERT_OK(registry->Load("t/x", SharedAdapter("qv-r4")));
  const std::string before = Snapshot(*registry);
  const std::vector<std::string> targets = {"q_proj", "v_proj"};

  std::vector<std::pair<std::string, std::string>> broken;  // dir, expected message
  const std::string truncated = WriteSmallAdapter(FreshDir("truncated"));
  fs::resize_file(truncated + "/adapter_model.safetensors", 100);
  broken.emplace_back(truncated, "adapter_model.safetensors");
  auto nan = LoraTensors(SharedModelShape(), 4, targets, 1);
  nan[0].values[0] = std::numeric_limits<float>::quiet_NaN();
  broken.emplace_back(WriteAdapter(FreshDir("nan"), LoraConfigJson(4, 8, targets), nan), "non-finite");
  broken.emplace_back(WriteAdapter(FreshDir("rank"), LoraConfigJson(32, 32, targets),
                                   LoraTensors(SharedModelShape(), 32, targets, 1)),
                      "--max-lora-rank");
  broken.emplace_back(WriteAdapter(FreshDir("base"), LoraConfigJson(4, 8, targets),
                                   LoraTensors(LlamaBaseShape(4, 32, 86, 2, 2, 16), 4, targets, 1)),
                      "different base model");
  auto dora = LoraConfigJson(4, 8, targets);
  dora["use_dora"] = true;
  broken.emplace_back(WriteAdapter(FreshDir("dora"), dora, LoraTensors(SharedModelShape(), 4, targets, 1)),
                      "use_dora but");
  const std::string pickle = FreshDir("pickle");
  std::ofstream(pickle + "/adapter_config.json") << LoraConfigJson(4, 8, targets).dump();
  std::ofstream(pickle + "/adapter_model.bin") << "pickle";
  broken.emplace_back(pickle, "pickle");

  for (const auto& [dir, message] : broken) {
    for (const std::string id : {"t/x", "t/new"}) {
      absl::StatusOr<AdapterInfo> info = registry->Load(id, dir);
      ASSERT_FALSE(info.ok()) << dir;
      EXPECT_THAT(info.status().message(), HasSubstr(message));
      EXPECT_EQ(Snapshot(*registry), before) << dir;
    }
  }
  EXPECT_THAT(registry->Get("t/new"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(AdapterRegistryTest, UnloadKeepsInFlightHandlesAndFreesOnTheLastOne) {
  auto registry = MakeRegistry();
  ASSERT_OK(registry->Load("t/x", SharedAdapter("attn-r8")));
  AdapterHandle handle = *registry->Acquire("t/x");
  ASSERT_OK(registry->Unload("t/x"));
  EXPECT_THAT(registry->Acquire("t/x"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(registry->Unload("t/x"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(handle->adapter.weights(3, LoraModule::kOProj).rank, 8);  // still usable
  EXPECT_EQ(registry->stats().live_adapters, 1);
  handle.reset();
  EXPECT_EQ(registry->stats().live_adapters, 0);
  EXPECT_EQ(registry->stats().host_bytes, 0u);
}

TEST(AdapterRegistryTest, ThousandLoadUnloadCyclesReturnToBaseline) {
  auto registry = MakeRegistry();
  ASSERT_OK(registry->Load("t/resident", SharedAdapter("qv-r4")));
  const AdapterRegistryStats baseline = registry->stats();
  std::vector<std::weak_ptr<const LoadedAdapter>> seen;
  AdapterHandle held;  // every third cycle a "request" outlives the unload
  for (int i = 0; i < 1000; ++i) {
    ASSERT_TRUE(registry->Load("t/cycle", SharedAdapter(i % 2 ? "ocean" : "mlp-r16-rslora")).ok());
    AdapterHandle handle = *registry->Acquire("t/cycle");
    if (i % 100 == 0) seen.push_back(handle);
    if (i % 3 == 0) held = handle;
    ASSERT_OK(registry->Unload("t/cycle"));
    if (i % 3 == 2) held.reset();
  }
  held.reset();
  for (const auto& weak : seen) EXPECT_TRUE(weak.expired());
  const AdapterRegistryStats after = registry->stats();
  EXPECT_EQ(after.live_adapters, baseline.live_adapters);
  EXPECT_EQ(after.host_bytes, baseline.host_bytes);
  EXPECT_EQ(after.registered, baseline.registered);
  EXPECT_EQ(after.host.loads, baseline.host.loads + 1000);
}

TEST(AdapterRegistryTest, EvictionUnderTheHostBudgetRespectsPinsAndUse) {
  // Room for two small adapters.
  auto registry = MakeRegistry(/*host_budget_bytes=*/2 * kSmallBytes + kSmallBytes / 2);
  std::map<std::string, std::string> dirs;
  for (const std::string name : {"a", "b", "c", "d"}) {
    dirs[name] = WriteSmallAdapter(FreshDir(name), 4, name[0]);
  }
  ASSERT_OK(registry->Load("t/a", dirs["a"]));
  ASSERT_OK(registry->Load("t/b", dirs["b"]));
  ASSERT_OK(registry->Acquire("t/a"));  // a is now more recently used than b
  ASSERT_OK(registry->Load("t/c", dirs["c"]));
  EXPECT_TRUE(registry->IsResident("t/a"));
  EXPECT_FALSE(registry->IsResident("t/b")) << "least recently used goes first";
  EXPECT_TRUE(registry->IsResident("t/c"));
  EXPECT_EQ(registry->stats().host.evictions, 1);
  EXPECT_EQ(registry->List().size(), 3u) << "evicted adapters stay registered";
  EXPECT_LE(registry->stats().host_bytes, registry->stats().host_budget_bytes);

  // a pinned, c in use: nothing can make room for d.
  ASSERT_OK(registry->Pin("t/a"));
  AdapterHandle c = *registry->Acquire("t/c");
  const std::string before = Snapshot(*registry);
  absl::StatusOr<AdapterInfo> d = registry->Load("t/d", dirs["d"]);
  ASSERT_FALSE(d.ok());
  EXPECT_THAT(d, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_THAT(d.status().message(), AllOf(HasSubstr("t/d"), HasSubstr("--adapter-host-bytes")));
  EXPECT_EQ(Snapshot(*registry), before);
  // Acquiring the evicted b cannot reload it either.
  EXPECT_THAT(registry->Acquire("t/b"), StatusIs(absl::StatusCode::kResourceExhausted));

  // Once c is released it can be evicted.
  c.reset();
  ASSERT_OK(registry->Load("t/d", dirs["d"]));
  EXPECT_TRUE(registry->IsResident("t/a"));
  EXPECT_FALSE(registry->IsResident("t/c"));

  // Acquiring evicted b reloads it (a miss) at its version and hash, evicting d.
  const AdapterInfo b_info = *registry->Get("t/b");
  const AdapterRegistryStats stats = registry->stats();
  absl::StatusOr<AdapterHandle> b = registry->Acquire("t/b");
  ASSERT_OK(b);
  EXPECT_EQ((*b)->version, b_info.version);
  EXPECT_EQ((*b)->content_hash(), b_info.content_hash);
  EXPECT_EQ(registry->stats().host.misses, stats.host.misses + 1);
  EXPECT_EQ(registry->stats().host.loads, stats.host.loads + 1);
  EXPECT_GT(registry->stats().host.load_seconds.sum, 0);
  EXPECT_FALSE(registry->IsResident("t/d"));
  ASSERT_OK(registry->Acquire("t/b"));
  EXPECT_EQ(registry->stats().host.hits, stats.host.hits + 1);
}

TEST(AdapterRegistryTest, PinningAnEvictedAdapterReloadsIt) {
  auto registry = MakeRegistry(/*host_budget_bytes=*/kSmallBytes + kSmallBytes / 2);
  ASSERT_OK(registry->Load("t/x", WriteSmallAdapter(FreshDir("x"), 4, 1)));
  ASSERT_OK(registry->Load("t/y", WriteSmallAdapter(FreshDir("y"), 4, 2)));  // evicts x
  ASSERT_FALSE(registry->IsResident("t/x"));
  const int64_t loads = registry->stats().host.loads;

  ASSERT_OK(registry->Pin("t/x"));
  EXPECT_TRUE(registry->IsResident("t/x")) << "a pinned adapter is resident";
  EXPECT_TRUE(registry->Get("t/x")->pinned);
  EXPECT_FALSE(registry->IsResident("t/y")) << "y made room for it";
  EXPECT_EQ(registry->stats().host.loads, loads + 1);

  // y cannot come back while x is pinned and the budget holds one; y stays unpinned.
  const absl::Status pin_y = registry->Pin("t/y");
  EXPECT_THAT(pin_y, StatusIs(absl::StatusCode::kResourceExhausted)) << pin_y;
  EXPECT_FALSE(registry->Get("t/y")->pinned);
  EXPECT_THAT(registry->Pin("t/unknown"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(AdapterRegistryTest, AdapterLargerThanTheWholeBudget) {
  auto registry = MakeRegistry(/*host_budget_bytes=*/kSmallBytes / 2);
  absl::StatusOr<AdapterInfo> info = registry->Load("t/x", SharedAdapter("qv-r4"));
  ASSERT_FALSE(info.ok());
  EXPECT_THAT(info, StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_TRUE(registry->List().empty());
}

TEST(AdapterRegistryTest, ReloadRefusesFilesChangedOnDisk) {
  auto registry = MakeRegistry(/*host_budget_bytes=*/kSmallBytes + kSmallBytes / 2);
  const std::string dir = WriteSmallAdapter(FreshDir("x"), 4, 1);
  ASSERT_OK(registry->Load("t/x", dir));
  ASSERT_OK(registry->Load("t/y", WriteSmallAdapter(FreshDir("y"), 4, 2)));  // evicts x
  ASSERT_FALSE(registry->IsResident("t/x"));
  WriteSmallAdapter(dir, 4, 3);
  absl::StatusOr<AdapterHandle> x = registry->Acquire("t/x");
  ASSERT_FALSE(x.ok());
  EXPECT_THAT(x, StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(x.status().message(), AllOf(HasSubstr("t/x"), HasSubstr(dir), HasSubstr("changed")));
  // Loading it again makes a new version from the new files.
  EXPECT_EQ(registry->Load("t/x", dir)->version, 2);
}

// Register reads only the config and the safetensors header: the adapter is
// listed with its ranks, modules and bytes but takes no host bytes until its
// first Acquire reads the tensors and fixes its content hash, which later
// reloads are held to.
TEST(AdapterRegistryTest, RegisteredAdaptersLoadOnFirstUse) {
  auto registry = MakeRegistry(/*host_budget_bytes=*/kSmallBytes + kSmallBytes / 2);
  const std::string dir = WriteSmallAdapter(FreshDir("registered"), 4, 1);
  absl::StatusOr<AdapterInfo> info = registry->Register("t/r", dir);
  ASSERT_OK(info);
  EXPECT_EQ(info->version, 1);
  EXPECT_FALSE(info->resident);
  EXPECT_EQ(info->content_hash, "");
  EXPECT_EQ(info->bytes, kSmallBytes);
  EXPECT_THAT(info->ranks, ElementsAre(4));
  EXPECT_EQ(registry->stats().host_bytes, 0u);
  EXPECT_EQ(registry->stats().host.loads, 0);

  absl::StatusOr<AdapterHandle> handle = registry->Acquire("t/r");
  ASSERT_OK(handle);
  EXPECT_EQ((*handle)->adapter.weights(0, LoraModule::kQProj).a.size(), 4u * 64);
  const std::string hash = registry->Get("t/r")->content_hash;
  EXPECT_EQ(hash, (*handle)->content_hash());
  EXPECT_EQ(hash.size(), 64u);
  EXPECT_TRUE(registry->IsResident("t/r"));
  EXPECT_EQ(registry->stats().host_bytes, kSmallBytes);
  handle->reset();
  // The same files loaded eagerly give the same hash (and evict t/r, now unused).
  EXPECT_EQ(registry->Load("t/eager", dir)->content_hash, hash);

  // Evicted, then changed on disk: the hash of the first read holds.
  ASSERT_OK(registry->Load("t/other", WriteSmallAdapter(FreshDir("other"), 4, 2)));
  ASSERT_FALSE(registry->IsResident("t/r"));
  WriteSmallAdapter(dir, 4, 3);
  EXPECT_THAT(registry->Acquire("t/r"), StatusIs(absl::StatusCode::kFailedPrecondition));
}

// Compaction: the registry's default applies to every load that does not
// choose, a load may choose another target or none (1), and every reload of
// an evicted or lazily registered adapter is compacted as its version was.
TEST(AdapterRegistryTest, CompactionByDefaultPerLoadAndOnEveryReload) {
  const std::string ocean = SharedAdapter("ocean");
  auto sizes = MakeRegistry();
  ASSERT_OK_AND_ASSIGN(const AdapterInfo plain, sizes->Load("t/plain", ocean));
  ASSERT_FALSE(plain.compaction.has_value());

  AdapterRegistryOptions options = {.base = SharedModelShape(), .limits = {.max_rank = 16}};
  options.compaction = CompactionTarget{0.9};
  ASSERT_OK_AND_ASSIGN(auto registry, AdapterRegistry::Create(options));
  ASSERT_OK_AND_ASSIGN(const AdapterInfo compacted, registry->Load("t/default", ocean));
  ASSERT_TRUE(compacted.compaction.has_value());
  EXPECT_EQ(compacted.compaction->min_energy, 0.9);
  EXPECT_EQ(compacted.compaction->bytes_before, plain.bytes);
  EXPECT_EQ(compacted.compaction->ranks_before, plain.ranks);
  EXPECT_LT(compacted.bytes, plain.bytes);
  EXPECT_FALSE(compacted.compaction->modules.empty());
  EXPECT_NE(compacted.content_hash, plain.content_hash);
  ASSERT_OK_AND_ASSIGN(const AdapterInfo off, registry->Load("t/off", ocean, CompactionTarget{1}));
  EXPECT_FALSE(off.compaction.has_value());
  EXPECT_EQ(off.content_hash, plain.content_hash);
  ASSERT_OK_AND_ASSIGN(const AdapterInfo strict,
                       registry->Load("t/strict", ocean, CompactionTarget{0.5}));
  EXPECT_LT(strict.bytes, compacted.bytes);

  // Room for one compacted ocean: each load evicts the other, each reload
  // compacts it again to the same adapter.
  options.host_budget_bytes = compacted.bytes + compacted.bytes / 2;
  ASSERT_OK_AND_ASSIGN(auto small, AdapterRegistry::Create(options));
  ASSERT_OK(small->Load("t/a", ocean));
  ASSERT_OK(small->Load("t/b", ocean));
  ASSERT_FALSE(small->IsResident("t/a"));
  ASSERT_OK_AND_ASSIGN(AdapterHandle a, small->Acquire("t/a"));
  EXPECT_EQ(a->content_hash(), compacted.content_hash);
  EXPECT_EQ(a->adapter.bytes(), compacted.bytes);
  EXPECT_EQ(small->Get("t/a")->compaction->modules.size(), compacted.compaction->modules.size());
  a.reset();

  // Registered lazily: the target until the first read, then what it made.
  ASSERT_OK_AND_ASSIGN(const AdapterInfo lazy, registry->Register("t/lazy", ocean));
  ASSERT_TRUE(lazy.compaction.has_value());
  EXPECT_TRUE(lazy.compaction->modules.empty());
  EXPECT_EQ(lazy.bytes, plain.bytes);
  ASSERT_OK(registry->Acquire("t/lazy"));
  ASSERT_OK_AND_ASSIGN(const AdapterInfo read, registry->Get("t/lazy"));
  EXPECT_EQ(read.bytes, compacted.bytes);
  EXPECT_EQ(read.ranks, compacted.ranks);
  EXPECT_EQ(read.content_hash, compacted.content_hash);
  EXPECT_EQ(read.compaction->modules.size(), compacted.compaction->modules.size());
}

// Register checks everything the header shows; a bad adapter is refused at
// once and the registry is unchanged.
TEST(AdapterRegistryTest, RegisterRefusesWhatTheHeaderShows) {
  auto registry = MakeRegistry();
  const std::string before = Snapshot(*registry);
  // Rank 32 is above the limit of 16.
  EXPECT_THAT(registry->Register("t/big", WriteSmallAdapter(FreshDir("big"), 32, 1)),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(registry->Register("t/none", FreshDir("none")),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(registry->Register("bad id", SharedAdapter("qv-r4")),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(Snapshot(*registry), before);
}

TEST(AdapterRegistryTest, ListPagesById) {
  auto registry = MakeRegistry();
  const std::string dir = SharedAdapter("qv-r4");
  for (const char* id : {"t/c", "t/a", "u/a", "t/b"}) ASSERT_OK(registry->Register(id, dir));
  const auto ids = [](const std::vector<AdapterInfo>& infos) {
    std::vector<std::string> out;
    for (const AdapterInfo& info : infos) out.push_back(info.id);
    return out;
  };
  EXPECT_THAT(ids(registry->List("", 2)), ElementsAre("t/a", "t/b"));
  EXPECT_THAT(ids(registry->List("t/b", 2)), ElementsAre("t/c", "u/a"));
  EXPECT_THAT(ids(registry->List("t/bb", 10)), ElementsAre("t/c", "u/a"));
  EXPECT_THAT(ids(registry->List("u/a", 10)), ElementsAre());
}

TEST(AdapterRegistryTest, PrefetchLoadsInTheBackground) {
  auto registry = MakeRegistry(/*host_budget_bytes=*/kSmallBytes + kSmallBytes / 2);
  ASSERT_OK(registry->Load("t/x", WriteSmallAdapter(FreshDir("x"), 4, 1)));
  ASSERT_OK(registry->Load("t/y", WriteSmallAdapter(FreshDir("y"), 4, 2)));
  ASSERT_FALSE(registry->IsResident("t/x"));
  EXPECT_THAT(registry->Prefetch("t/missing"), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(registry->Prefetch("t/x"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!registry->IsResident("t/x") && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_TRUE(registry->IsResident("t/x"));
  EXPECT_FALSE(registry->IsResident("t/y"));
  const AdapterRegistryStats stats = registry->stats();
  ASSERT_OK(registry->Acquire("t/x"));
  EXPECT_EQ(registry->stats().host.hits, stats.host.hits + 1);
  EXPECT_EQ(registry->stats().host.misses, stats.host.misses);
  // Prefetching a resident adapter is a no-op; an Acquire racing a prefetch
  // waits for it and gets the same adapter.
  EXPECT_OK(registry->Prefetch("t/x"));
  ASSERT_OK(registry->Prefetch("t/y"));
  absl::StatusOr<AdapterHandle> y = registry->Acquire("t/y");
  ASSERT_OK(y);
  EXPECT_EQ((*y)->id, "t/y");
}

TEST(AdapterRegistryTest, ConcurrentUseFromManyThreads) {
  auto registry = MakeRegistry(/*host_budget_bytes=*/3 * kSmallBytes);
  std::vector<std::string> dirs;
  for (int i = 0; i < 4; ++i) dirs.push_back(WriteSmallAdapter(FreshDir(std::to_string(i)), 4, i));
  for (int i = 0; i < 4; ++i) ASSERT_OK(registry->Load("t/" + std::to_string(i), dirs[i]));
  std::atomic<int> unexpected{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 200; ++i) {
        const std::string id = "t/" + std::to_string((t + i) % 4);
        absl::StatusOr<AdapterHandle> handle = registry->Acquire(id);
        if (handle.ok()) {
          if ((*handle)->id != id) ++unexpected;
        } else if (handle.status().code() != absl::StatusCode::kResourceExhausted &&
                   handle.status().code() != absl::StatusCode::kNotFound) {
          ++unexpected;
        }
        if (i % 10 == 0) registry->Prefetch(id).IgnoreError();
        if (t == 0 && i % 25 == 0) registry->Load(id, dirs[(t + i) % 4]).IgnoreError();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(unexpected, 0);
  EXPECT_EQ(registry->List().size(), 4u);
  EXPECT_LE(registry->stats().host_bytes, 3 * kSmallBytes);
}

// A registry whose resolver maps canonical ids through `folders`, counting its calls.
struct ResolvingRegistry {
  explicit ResolvingRegistry(std::map<std::string, std::string> folders,
                             absl::Duration delay = absl::ZeroDuration())
      : folders(std::move(folders)) {
    auto created = AdapterRegistry::Create(
        {.base = SharedModelShape(), .limits = {.max_rank = 16}, .default_tenant = "default",
         .resolve = [this, delay](const std::string& id) -> absl::StatusOr<std::string> {
           ++calls;
           absl::SleepFor(delay);
           auto it = this->folders.find(id);
           if (it == this->folders.end()) return absl::NotFoundError("no folder for " + id);
           return it->second;
         }});
    EXPECT_OK(created);
    registry = std::move(created).value();
  }
  std::map<std::string, std::string> folders;
  std::atomic<int> calls{0};
  std::unique_ptr<AdapterRegistry> registry;
};

TEST(AdapterRegistryTest, AnUnknownIdResolvesOnItsFirstAcquire) {
  ResolvingRegistry r({{"default/qv", SharedAdapter("qv-r4")}});
  EXPECT_THAT(r.registry->Get("qv"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_TRUE(r.registry->List().empty());
  EXPECT_EQ(r.calls, 0) << "Get and List never resolve";

  absl::StatusOr<AdapterHandle> first = r.registry->Acquire("qv");
  ASSERT_OK(first);
  EXPECT_EQ((*first)->id, "default/qv");
  EXPECT_EQ((*first)->version, 1);
  EXPECT_EQ((*first)->dir, SharedAdapter("qv-r4"));
  ASSERT_OK(r.registry->Acquire("default/qv"));
  EXPECT_EQ(r.calls, 1);
  const AdapterRegistryStats stats = r.registry->stats();
  EXPECT_EQ(stats.host.misses, 1);
  EXPECT_EQ(stats.host.hits, 1);
  EXPECT_EQ(stats.host.loads, 1);
  EXPECT_EQ(stats.registered, 1);

  // Resolve is Get with resolution: a second id, by its info.
  r.folders["acme/bot"] = SharedAdapter("attn-r8");
  absl::StatusOr<AdapterInfo> info = r.registry->Resolve("acme/bot");
  ASSERT_OK(info);
  EXPECT_EQ(info->version, 1);
  EXPECT_THAT(info->ranks, ElementsAre(8));
  EXPECT_EQ(r.calls, 2);
}

TEST(AdapterRegistryTest, ConcurrentFirstRequestsResolveOnce) {
  ResolvingRegistry r({{"default/qv", SharedAdapter("qv-r4")}}, absl::Milliseconds(50));
  std::vector<AdapterHandle> handles(8);
  std::vector<std::thread> threads;
  for (AdapterHandle& handle : handles) {
    threads.emplace_back([&] {
      absl::StatusOr<AdapterHandle> acquired = r.registry->Acquire("qv");
      ASSERT_OK(acquired);
      handle = *acquired;
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(r.calls, 1);
  for (const AdapterHandle& handle : handles) EXPECT_EQ(handle, handles[0]);
  EXPECT_EQ(r.registry->stats().host.loads, 1);
  EXPECT_EQ(r.registry->stats().live_adapters, 1);
}

TEST(AdapterRegistryTest, ResolutionFailuresReachTheCallerAndChangeNothing) {
  const std::string broken = FreshDir("resolve-broken");
  std::ofstream(broken + "/adapter_config.json") << "{not json";
  ResolvingRegistry r({{"default/broken", broken}});
  ASSERT_OK(r.registry->Load("qv", SharedAdapter("qv-r4")));
  const std::string before = Snapshot(*r.registry);

  absl::StatusOr<AdapterHandle> missing = r.registry->Acquire("nobody");
  EXPECT_THAT(missing, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(missing.status().message(), HasSubstr("no folder for default/nobody"));
  absl::StatusOr<AdapterInfo> invalid = r.registry->Resolve("broken");
  EXPECT_THAT(invalid, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(invalid.status().message(),
              AllOf(HasSubstr("\"default/broken\" resolved to " + broken), HasSubstr("json")));
  EXPECT_EQ(Snapshot(*r.registry), before);
  EXPECT_EQ(r.registry->stats().host.misses, 0) << "nothing was loaded";
  // The next request tries again: a folder fixed meanwhile (a sync that
  // finished) loads then.
  WriteSmallAdapter(broken);
  EXPECT_OK(r.registry->Acquire("broken"));
}

}  // namespace
}  // namespace loraserve::adapters

namespace loraserve::adapters {
namespace {

TEST(AdapterRegistryTest, CompositionsAreCachedByCanonicalKeyAndDroppedWithAComponent) {
  auto registry = MakeRegistry();
  ASSERT_OK(registry->Load("qv", SharedAdapter("qv-r4")));
  ASSERT_OK(registry->Load("attn", SharedAdapter("attn-r8")));
  const size_t components_bytes = registry->stats().host_bytes;
  absl::StatusOr<AdapterHandle> mix = registry->AcquireComposed({{"qv", 0.5f}, {"attn", 1.0f}});
  ASSERT_OK(mix);
  EXPECT_EQ((*mix)->id, "default/attn@1*1+default/qv@1*0.5");
  EXPECT_EQ((*mix)->adapter.weights(0, LoraModule::kQProj).rank, 12);
  EXPECT_EQ((*mix)->adapter.weights(0, LoraModule::kKProj).rank, 8);
  // The same mix in another order and spelling reuses the cached adapter.
  absl::StatusOr<AdapterHandle> again =
      registry->AcquireComposed({{"default/attn", 1.0f}, {"default/qv", 0.5f}});
  ASSERT_OK(again);
  EXPECT_EQ(mix->get(), again->get());
  EXPECT_EQ(registry->List().size(), 2u);  // never listed
  // Counted in the host budget.
  EXPECT_EQ(registry->stats().host_bytes, components_bytes + (*mix)->adapter.bytes());
  const std::string first_hash = (*mix)->content_hash();
  EXPECT_NE(first_hash, registry->Get("qv")->content_hash);

  // Another weight is another composition.
  absl::StatusOr<AdapterHandle> other = registry->AcquireComposed({{"qv", 0.25f}, {"attn", 1.0f}});
  ASSERT_OK(other);
  EXPECT_NE((*other)->content_hash(), first_hash);

  // Replacing a component drops its compositions; in-flight holders keep theirs.
  ASSERT_OK(registry->Load("qv", SharedAdapter("qv-r4")));
  absl::StatusOr<AdapterHandle> fresh = registry->AcquireComposed({{"qv", 0.5f}, {"attn", 1.0f}});
  ASSERT_OK(fresh);
  EXPECT_EQ((*fresh)->id, "default/attn@1*1+default/qv@2*0.5");
  EXPECT_NE(fresh->get(), mix->get());
  EXPECT_EQ((*fresh)->content_hash(), first_hash);  // the same contents and weights
  ASSERT_OK(registry->Unload("attn"));
  EXPECT_THAT(registry->AcquireComposed({{"qv", 0.5f}, {"attn", 1.0f}}),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST(AdapterRegistryTest, CompositionRefusesBadLists) {
  auto registry = MakeRegistry();
  ASSERT_OK(registry->Load("qv", SharedAdapter("qv-r4")));
  ASSERT_OK(registry->Load("mlp", SharedAdapter("mlp-r16-rslora")));
  EXPECT_THAT(registry->AcquireComposed({}), StatusIs(absl::StatusCode::kInvalidArgument));
  absl::StatusOr<AdapterHandle> twice = registry->AcquireComposed({{"qv", 1.0f}, {"default/qv", 2.0f}});
  EXPECT_THAT(twice, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(twice.status().message(), HasSubstr("named twice"));
  EXPECT_THAT(registry->AcquireComposed({{"qv", NAN}}), StatusIs(absl::StatusCode::kInvalidArgument));
  // 16 + 16 on gate_proj is above this registry's --max-lora-rank of 16.
  absl::StatusOr<AdapterHandle> rank = registry->AcquireComposed({{"mlp", 1.0f}, {"qv", 1.0f}});
  EXPECT_OK(rank);
  ASSERT_OK(registry->Load("mlp2", SharedAdapter("mlp-r16-rslora")));
  EXPECT_THAT(registry->AcquireComposed({{"mlp", 1.0f}, {"mlp2", 1.0f}}),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(registry->AcquireComposed({{"nope", 1.0f}}), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace loraserve::adapters
