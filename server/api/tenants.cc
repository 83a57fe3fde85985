#include "server/api/tenants.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "adapters/registry.h"
#include "base/status_macros.h"

namespace loraserve::api {
namespace {

constexpr size_t kMinKeyChars = 8;

// The registry owns the rule for id parts; a tenant is valid exactly when it
// can prefix a valid id.
bool ValidTenant(absl::string_view tenant) {
  return adapters::CanonicalAdapterId("x", tenant).ok();
}

Sha256::Digest DigestOf(absl::string_view key) {
  Sha256 hash;
  hash.Update(key);
  return hash.Final();
}

}  // namespace

absl::StatusOr<ApiKeys> ApiKeys::LoadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("API key file ", path, ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), path);
}

absl::StatusOr<ApiKeys> ApiKeys::Parse(absl::string_view text, absl::string_view source_name) {
  ApiKeys keys;
  std::map<Sha256::Digest, int> first_line;  // digest -> line it first appeared on
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);  // also drops a '\r' from CRLF files
    if (line.empty() || line[0] == '#') continue;
    const std::string where = absl::StrCat(source_name, ":", line_number, ": ");
    const std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 3) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, fields.size(),
                       " fields: expected \"KEY TENANT ROLE\" separated by spaces or tabs"));
    }
    const absl::string_view key = fields[0], tenant = fields[1], role_name = fields[2];
    Role role;
    if (role_name == "admin") {
      role = Role::kAdmin;
    } else if (role_name == "tenant") {
      role = Role::kTenant;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "role \"", role_name, "\": expected \"admin\" or \"tenant\""));
    }
    if (!ValidTenant(tenant)) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "tenant \"", tenant, "\": expected 1-64 characters of A-Z a-z 0-9 . _ -"));
    }
    // Messages below describe the key but never quote it: it is a secret.
    if (key.size() < kMinKeyChars) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, "key of ", key.size(), " characters: expected at least ", kMinKeyChars));
    }
    if (role == Role::kTenant && tenant == kOperatorTenant) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, "tenant-role key for tenant \"", kOperatorTenant,
                       "\": that tenant belongs to operators; expected role \"admin\" or "
                       "another tenant"));
    }
    Sha256::Digest digest = DigestOf(key);
    auto [it, inserted] = first_line.emplace(digest, line_number);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(where, "duplicate key (first on line ",
                                                     it->second, "): expected each key once"));
    }
    keys.entries_.push_back({digest, Principal{std::string(tenant), role}});
  }
  return keys;
}

std::optional<Principal> ApiKeys::Find(absl::string_view key) const {
  // Hashing first means the comparisons below see digests, not the key, and
  // every entry is compared in full whatever the outcome.
  const Sha256::Digest digest = DigestOf(key);
  const Entry* found = nullptr;
  for (const Entry& entry : entries_) {
    uint8_t difference = 0;
    for (size_t i = 0; i < digest.size(); ++i) difference |= digest[i] ^ entry.digest[i];
    if (difference == 0) found = &entry;
  }
  if (found == nullptr) return std::nullopt;
  return found->principal;
}

absl::StatusOr<std::vector<std::string>> AdapterAccess::Candidates(const Principal& who,
                                                                   absl::string_view name) {
  const bool bare = name.find('/') == absl::string_view::npos;
  const absl::string_view own_tenant =
      who.is_admin() ? absl::string_view(kOperatorTenant) : absl::string_view(who.tenant);
  ASSIGN_OR_RETURN(std::string id, adapters::CanonicalAdapterId(name, own_tenant));
  std::vector<std::string> ids = {std::move(id)};
  if (bare && own_tenant != kOperatorTenant)
    ids.push_back(absl::StrCat(kOperatorTenant, "/", name));
  return ids;
}

// An empty default tenant makes a bare name fail, so only full ids pass.
std::optional<absl::string_view> TenantOf(absl::string_view canonical_id) {
  if (!adapters::CanonicalAdapterId(canonical_id, "").ok()) return std::nullopt;
  return canonical_id.substr(0, canonical_id.find('/'));
}

bool AdapterAccess::CanUse(const Principal& who, absl::string_view canonical_id) {
  const std::optional<absl::string_view> tenant = TenantOf(canonical_id);
  if (!tenant) return false;
  return who.is_admin() || *tenant == who.tenant || *tenant == kOperatorTenant;
}

bool AdapterAccess::CanChange(const Principal& who, absl::string_view canonical_id) {
  const std::optional<absl::string_view> tenant = TenantOf(canonical_id);
  if (!tenant) return false;
  if (who.is_admin()) return true;
  return *tenant == who.tenant && who.tenant != kOperatorTenant;
}

absl::StatusOr<std::string> AdapterAccess::OwnedId(const Principal& who, absl::string_view name) {
  if (who.is_admin()) return adapters::CanonicalAdapterId(name, kOperatorTenant);
  ASSIGN_OR_RETURN(std::string id, adapters::CanonicalAdapterId(name, who.tenant));
  if (!CanChange(who, id)) {
    return absl::PermissionDeniedError(
        absl::StrCat("tenant \"", who.tenant, "\" may not create adapter \"", id, "\" in tenant \"",
                     *TenantOf(id), "\": expected a bare name or \"", who.tenant, "/name\""));
  }
  return id;
}

absl::Status CheckQuota(const TenantQuota& quota, absl::string_view tenant, int64_t adapters,
                        int64_t bytes, int64_t new_bytes, bool is_replacement,
                        int64_t replaced_bytes) {
  if (quota.max_adapters > 0 && !is_replacement && adapters + 1 > quota.max_adapters) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant, "\" stores ", adapters, " adapters, its limit (max_adapters) is ",
        quota.max_adapters, ": expected an unload or a replacement of an existing id"));
  }
  const int64_t removed = is_replacement ? replaced_bytes : 0;
  const int64_t total = bytes - removed + new_bytes;
  if (quota.max_adapter_bytes > 0 && total > quota.max_adapter_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant \"", tenant, "\" would store ", total, " adapter bytes (", bytes, " stored",
        is_replacement ? absl::StrCat(" - ", removed, " replaced") : "", " + ", new_bytes,
        " new), its limit (max_adapter_bytes) is ", quota.max_adapter_bytes));
  }
  return absl::OkStatus();
}

RateLimiter::RateLimiter(RateLimits limits, std::function<absl::Time()> now)
    : limits_(limits),
      request_capacity_(std::max(1.0, limits.requests_per_second)),
      now_(std::move(now)) {}

RateLimiter::Buckets& RateLimiter::RefillLocked(absl::string_view tenant) {
  const absl::Time now = now_();
  auto it = tenants_.find(tenant);
  if (it == tenants_.end()) {
    Buckets full{request_capacity_, static_cast<double>(limits_.tokens_per_minute), now};
    return tenants_.emplace(std::string(tenant), full).first->second;
  }
  Buckets& buckets = it->second;
  // A clock that steps back refills nothing (and is not counted twice later).
  const double seconds = std::max(0.0, absl::ToDoubleSeconds(now - buckets.refilled));
  buckets.refilled = std::max(buckets.refilled, now);
  buckets.requests =
      std::min(request_capacity_, buckets.requests + seconds * limits_.requests_per_second);
  const double tokens_per_second = static_cast<double>(limits_.tokens_per_minute) / 60;
  buckets.tokens = std::min(static_cast<double>(limits_.tokens_per_minute),
                            buckets.tokens + seconds * tokens_per_second);
  return buckets;
}

RateLimiter::Decision RateLimiter::Admit(absl::string_view tenant) {
  const bool requests_on = limits_.requests_per_second > 0;
  const bool tokens_on = limits_.tokens_per_minute > 0;
  if (!requests_on && !tokens_on) return {};

  std::lock_guard<std::mutex> lock(mu_);
  Buckets& buckets = RefillLocked(tenant);
  // Refill arithmetic in doubles may land a hair below a whole request at the
  // moment retry_after promised one.
  constexpr double kSlack = 1e-9;
  double wait_seconds = 0;
  std::vector<std::string> reasons;
  if (requests_on && buckets.requests < 1 - kSlack) {
    wait_seconds = (1 - buckets.requests) / limits_.requests_per_second;
    reasons.push_back(
        absl::StrCat("requests_per_second limit of ", limits_.requests_per_second, " reached"));
  }
  if (tokens_on && buckets.tokens <= 0) {
    // Room again means a positive level; one whole token is the first such
    // level that cannot be lost to rounding.
    const double tokens_per_second = static_cast<double>(limits_.tokens_per_minute) / 60;
    wait_seconds = std::max(wait_seconds, (1 - buckets.tokens) / tokens_per_second);
    reasons.push_back(absl::StrCat("tokens_per_minute limit of ", limits_.tokens_per_minute,
                                   " used up (", static_cast<int64_t>(std::floor(buckets.tokens)),
                                   " tokens left)"));
  }
  if (!reasons.empty()) {
    Decision refused;
    refused.allowed = false;
    refused.retry_after = std::max(absl::Microseconds(1),
                                   absl::Ceil(absl::Seconds(wait_seconds), absl::Microseconds(1)));
    refused.reason = absl::StrCat("tenant \"", tenant, "\": ", absl::StrJoin(reasons, "; "));
    return refused;
  }
  if (requests_on) buckets.requests -= 1;
  return {};
}

void RateLimiter::ChargeTokens(absl::string_view tenant, int64_t tokens) {
  if (limits_.tokens_per_minute <= 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  RefillLocked(tenant).tokens -= static_cast<double>(tokens);
}

}  // namespace loraserve::api
