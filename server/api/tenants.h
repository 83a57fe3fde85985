// Tenants: who a caller is (API keys), which adapters it may see, use and
// change, how much it may store, and how fast it may send requests.
//
// The HTTP gateway authenticates `Authorization: Bearer KEY` with ApiKeys,
// asks AdapterAccess before it resolves, lists, uploads or unloads an adapter,
// checks CheckQuota before it stores one, and asks RateLimiter before it
// admits a request. Nothing here touches the registry or the engine: these
// are rules, the gateway applies them.
//
// Namespaces. Adapter ids are "tenant/name". Adapters loaded by operators
// (command line, admin keys) live in the tenant "default" (kOperatorTenant),
// which every tenant may see and use but only admins may change, so a key
// file may not give that tenant a tenant-role key.
//
// Key file: one key per line, "KEY TENANT ROLE" separated by spaces or tabs,
// ROLE `admin` or `tenant`; blank lines and lines starting with '#' are
// skipped. Keys are at least 8 characters. An admin key's tenant names the
// admin for rate limits and logs; it does not narrow what the admin may do.
// ApiKeys keeps only the SHA-256 of each key, and Find compares the digest of
// the presented key with every stored digest, without an early exit, so the
// time it takes says nothing about how close a guess was.
//
// Threading: ApiKeys and AdapterAccess are immutable / stateless and may be
// used from any thread. RateLimiter is thread-safe (one mutex, held for a few
// arithmetic operations). Ownership: the gateway owns one ApiKeys and one
// RateLimiter for the server's lifetime.
//
// Example:
//   ASSIGN_OR_RETURN(ApiKeys keys, ApiKeys::LoadFile(flags.api_keys));
//   RateLimiter limiter({.requests_per_second = 20, .tokens_per_minute = 100000});
//   std::optional<Principal> who = keys.Find(bearer_token);
//   if (!who) return Unauthorized();
//   RateLimiter::Decision decision = limiter.Admit(who->tenant);
//   if (!decision.allowed) return TooManyRequests(decision.retry_after, decision.reason);
//   ASSIGN_OR_RETURN(std::vector<std::string> ids, AdapterAccess::Candidates(*who, "support-bot"));
//   for (const std::string& id : ids) {
//     if (AdapterAccess::CanUse(*who, id) && registry.Has(id)) return Generate(id, ...);
//   }
//   ...
//   limiter.ChargeTokens(who->tenant, prompt_tokens + generated_tokens);
#ifndef LORASERVE_SERVER_API_TENANTS_H_
#define LORASERVE_SERVER_API_TENANTS_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "adapters/registry.h"
#include "base/sha256.h"

namespace loraserve::api {

enum class Role { kAdmin, kTenant };

struct Principal {
  std::string tenant;
  Role role = Role::kTenant;

  bool is_admin() const { return role == Role::kAdmin; }
};

// The tenant of operator-loaded adapters: visible to all, changed by admins.
inline constexpr const char* kOperatorTenant = adapters::kDefaultTenant;

class ApiKeys {
 public:
  // Parse() of the file's text with `path` as the source name; NotFound when
  // the file cannot be opened.
  static absl::StatusOr<ApiKeys> LoadFile(const std::string& path);
  // InvalidArgument naming "source_name:line" and what was expected for: a
  // wrong field count, an unknown role, bad tenant characters, a key shorter
  // than 8 characters, a duplicate key, a tenant-role key for the tenant
  // "default". Messages never contain a key.
  static absl::StatusOr<ApiKeys> Parse(absl::string_view text, absl::string_view source_name);

  // The principal `key` belongs to, or nullopt. Time does not depend on where
  // a wrong key differs from a right one (see the file comment).
  std::optional<Principal> Find(absl::string_view key) const;
  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    Sha256::Digest digest;  // sha256 of the key; the key itself is not kept
    Principal principal;
  };

  std::vector<Entry> entries_;
};

// The tenant of a well-formed canonical id "tenant/name", or nullopt.
std::optional<absl::string_view> TenantOf(absl::string_view canonical_id);

// Who may see, use and change which adapter:
//   tenant T: sees and uses "T/*" and "default/*"; changes only "T/*".
//   admin: sees, uses and changes everything; a bare name means "default/name".
// A bare name from tenant T means "T/name" if that exists, else "default/name".
// A tenant-role principal for "default" (which a key file cannot produce)
// changes nothing: that namespace belongs to operators.
class AdapterAccess {
 public:
  // The canonical ids `name` may mean for `who`, in lookup order (1 or 2).
  // Does not check access: an explicit "B/x" from tenant A yields "B/x", which
  // CanUse then refuses. InvalidArgument for a malformed id (the message
  // names it and the expected form).
  static absl::StatusOr<std::vector<std::string>> Candidates(const Principal& who,
                                                             absl::string_view name);
  // `canonical_id` is "tenant/name"; a malformed id is neither usable nor
  // changeable.
  static bool CanUse(const Principal& who, absl::string_view canonical_id);
  static bool CanChange(const Principal& who, absl::string_view canonical_id);
  // The canonical id an upload or load named `name` creates: tenant T gets
  // "T/name" (PermissionDenied naming both tenants for "X/name" with X != T);
  // an admin gets CanonicalAdapterId(name, "default"). InvalidArgument for a
  // malformed id.
  static absl::StatusOr<std::string> OwnedId(const Principal& who, absl::string_view name);
};

// Per-tenant quota on stored adapters; 0 means unlimited.
struct TenantQuota {
  int64_t max_adapters = 0;       // adapters the tenant may store
  int64_t max_adapter_bytes = 0;  // total bytes of the tenant's stored adapters
};

// OK if `tenant`, which stores `adapters` adapters totalling `bytes`, may add
// one of `new_bytes`. A replacement of an existing id (`is_replacement`) does
// not add to the count, and its old `replaced_bytes` are subtracted from the
// total; `replaced_bytes` is ignored otherwise. ResourceExhausted naming the
// tenant, the limit and the usage when the result would exceed the quota.
absl::Status CheckQuota(const TenantQuota& quota, absl::string_view tenant, int64_t adapters,
                        int64_t bytes, int64_t new_bytes, bool is_replacement,
                        int64_t replaced_bytes);

// 0 turns a limit off.
struct RateLimits {
  double requests_per_second = 0;
  int64_t tokens_per_minute = 0;
};

// Two token buckets per tenant, both full when a tenant is first seen:
//   requests: capacity max(1, requests_per_second), refilled continuously at
//     requests_per_second; Admit takes one and needs one.
//   tokens: capacity tokens_per_minute, refilled at tokens_per_minute / 60 per
//     second. A request's tokens are unknown when it is admitted, so
//     ChargeTokens debits them afterwards and the level may go negative;
//     Admit needs a positive level and takes nothing from it.
// A refused Admit takes nothing. The clock is injectable for tests.
class RateLimiter {
 public:
  explicit RateLimiter(RateLimits limits, std::function<absl::Time()> now = absl::Now);

  struct Decision {
    bool allowed = true;
    // When refused: how long until every exhausted bucket has room again
    // (one request, one token), rounded up to a microsecond. Zero when allowed.
    absl::Duration retry_after;
    std::string reason;  // when refused: the tenant and the limit
  };

  Decision Admit(absl::string_view tenant);
  void ChargeTokens(absl::string_view tenant, int64_t tokens);

 private:
  struct Buckets {
    double requests = 0;
    double tokens = 0;
    absl::Time refilled;  // when the levels above were last brought up to date
  };

  // The tenant's buckets, refilled up to now.
  Buckets& RefillLocked(absl::string_view tenant);  // mu_ held

  const RateLimits limits_;
  const double request_capacity_;
  const std::function<absl::Time()> now_;
  // std::mutex, not absl::Mutex: TSan cannot see Debian's uninstrumented libabsl lock.
  std::mutex mu_;
  std::map<std::string, Buckets, std::less<>> tenants_;  // guarded by mu_
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_TENANTS_H_
