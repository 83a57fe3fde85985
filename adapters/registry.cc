#include "adapters/registry.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "adapters/adapter_composition.h"
#include "base/sha256.h"
#include "base/status_macros.h"

namespace loraserve::adapters {
namespace {

// "." and ".." are refused: ids become paths (URLs, upload directories).
bool ValidIdPart(absl::string_view part) {
  return !part.empty() && part.size() <= 64 && part != "." && part != ".." &&
         std::all_of(part.begin(), part.end(), [](char c) {
           return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
                  c == '-';
         });
}

absl::Status NotLoadedError(const std::string& id) {
  return absl::NotFoundError(absl::StrCat("adapter \"", id, "\" is not loaded"));
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

struct AdapterRegistry::LiveCounter {
  std::atomic<int64_t> adapters{0};
  std::atomic<int64_t> bytes{0};
};

absl::StatusOr<std::string> CanonicalAdapterId(absl::string_view id,
                                               absl::string_view default_tenant) {
  const size_t slash = id.find('/');
  const absl::string_view tenant = slash == id.npos ? default_tenant : id.substr(0, slash);
  const absl::string_view name = slash == id.npos ? id : id.substr(slash + 1);
  if (!ValidIdPart(tenant) || !ValidIdPart(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter id \"", id,
                     "\": expected \"tenant/name\" or \"name\", each part "
                     "1-64 characters of A-Z a-z 0-9 . _ - (not . or ..)"));
  }
  return absl::StrCat(tenant, "/", name);
}

absl::StatusOr<std::unique_ptr<AdapterRegistry>> AdapterRegistry::Create(
    AdapterRegistryOptions options) {
  if (!ValidIdPart(options.default_tenant)) {
    return absl::InvalidArgumentError(
        absl::StrCat("default tenant \"", options.default_tenant,
                     "\": expected 1-64 characters of A-Z a-z 0-9 . _ -"));
  }
  return std::unique_ptr<AdapterRegistry>(new AdapterRegistry(std::move(options)));
}

AdapterRegistry::AdapterRegistry(AdapterRegistryOptions options)
    : options_(std::move(options)), live_(std::make_shared<LiveCounter>()) {
  worker_ = std::thread([this] { PrefetchWorker(); });
}

AdapterRegistry::~AdapterRegistry() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_.notify_all();
  worker_.join();
}

absl::StatusOr<std::string> AdapterRegistry::Canonical(absl::string_view id) const {
  return CanonicalAdapterId(id, options_.default_tenant);
}

absl::StatusOr<AdapterRegistry::Entry*> AdapterRegistry::FindLocked(const std::string& id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) return NotLoadedError(id);
  return &it->second;
}

AdapterHandle AdapterRegistry::MakeHandle(std::string id, int64_t version, std::string dir,
                                          LoraAdapter adapter) {
  const int64_t bytes = static_cast<int64_t>(adapter.bytes());
  live_->adapters += 1;
  live_->bytes += bytes;
  // The deleter holds the counter, not the registry: handles may outlive it.
  return AdapterHandle(
      new LoadedAdapter{std::move(id), version, std::move(dir), std::move(adapter)},
      [live = live_, bytes](const LoadedAdapter* loaded) {
        delete loaded;
        live->adapters -= 1;
        live->bytes -= bytes;
      });
}

absl::Status AdapterRegistry::MakeRoomLocked(size_t need, size_t freed, const std::string& keep,
                                             const std::string& what) {
  const size_t budget = options_.host_budget_bytes;
  if (budget == 0) return absl::OkStatus();
  const size_t live = static_cast<size_t>(live_->bytes.load());
  size_t in_use = live - std::min(live, freed);
  if (in_use + need <= budget) return absl::OkStatus();

  std::vector<Entry*> candidates;
  for (auto* map : {&entries_, &composed_}) {
    for (auto& [id, entry] : *map) {
      if (id != keep && entry.resident != nullptr && !entry.info.pinned &&
          entry.resident.use_count() == 1) {
        candidates.push_back(&entry);
      }
    }
  }
  std::sort(candidates.begin(), candidates.end(),
            [](const Entry* a, const Entry* b) { return a->last_used < b->last_used; });
  size_t chosen = 0;
  while (in_use + need > budget && chosen < candidates.size()) {
    in_use -= std::min(in_use, candidates[chosen++]->info.bytes);
  }
  if (in_use + need > budget) {
    return absl::ResourceExhaustedError(
        absl::StrCat(what, " needs ", need,
                     " bytes of host memory, but the adapter host budget "
                     "(--adapter-host-bytes) is ",
                     budget, " bytes and ", in_use, " are held by pinned or in-use adapters"));
  }
  for (size_t i = 0; i < chosen; ++i) {
    candidates[i]->resident.reset();
    candidates[i]->info.resident = false;
    ++host_stats_.evictions;
  }
  return absl::OkStatus();
}

absl::StatusOr<LoraAdapter> AdapterRegistry::ReadWeights(
    const std::string& dir, const std::optional<CompactionTarget>& compaction,
    std::optional<CompactionReport>* report) const {
  ASSIGN_OR_RETURN(LoraAdapter adapter, LoadLoraAdapter(dir, options_.base, options_.limits));
  report->reset();
  if (compaction && compaction->min_energy < 1) {
    ASSIGN_OR_RETURN(*report, CompactRanks(*compaction, &adapter));
  }
  return adapter;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Load(absl::string_view id, const std::string& dir,
                                                  std::optional<CompactionTarget> compaction) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  const auto start = std::chrono::steady_clock::now();
  std::optional<CompactionReport> report;
  ASSIGN_OR_RETURN(LoraAdapter adapter,
                   ReadWeights(dir, compaction ? compaction : options_.compaction, &report));
  const double seconds = SecondsSince(start);
  std::lock_guard<std::mutex> lock(mu_);
  return InsertLocked(canonical, dir, std::move(adapter), std::move(report), seconds);
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Register(absl::string_view id,
                                                      const std::string& dir) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  ASSIGN_OR_RETURN(LoraAdapter adapter,
                   LoadLoraAdapter(dir, options_.base, options_.limits, AdapterRead::kMetadata));
  // Compacted on its first read; until then the info holds the target only.
  std::optional<CompactionReport> compaction;
  if (options_.compaction && options_.compaction->min_energy < 1) {
    compaction =
        CompactionReport{options_.compaction->min_energy, adapter.ranks(), adapter.bytes(), {}};
  }
  std::lock_guard<std::mutex> lock(mu_);
  return InsertLocked(canonical, dir, std::move(adapter), std::move(compaction),
                      /*load_seconds=*/0, /*resident=*/false);
}

absl::StatusOr<AdapterInfo> AdapterRegistry::InsertLocked(
    const std::string& id, const std::string& dir, LoraAdapter adapter,
    std::optional<CompactionReport> compaction, double load_seconds, bool resident) {
  auto existing = entries_.find(id);
  int64_t version = 1;
  bool pinned = false;
  size_t freed = 0;  // the old version's bytes, when nobody else holds it
  if (existing != entries_.end()) {
    version = existing->second.info.version + 1;
    pinned = existing->second.info.pinned;
    if (existing->second.resident != nullptr && existing->second.resident.use_count() == 1) {
      freed = existing->second.info.bytes;
    }
  }
  if (resident) {
    RETURN_IF_ERROR(MakeRoomLocked(adapter.bytes(), freed, id,
                                   absl::StrCat("adapter \"", id, "\" (", dir, ")")));
  }
  Entry entry;
  entry.info = {id,
                version,
                adapter.content_hash(),
                dir,
                adapter.ranks(),
                adapter.target_modules(),
                adapter.config().use_dora(),
                adapter.saved().paths,
                adapter.bytes(),
                pinned,
                resident,
                std::move(compaction)};
  entry.last_used = ++clock_;
  if (resident) entry.resident = MakeHandle(id, version, dir, std::move(adapter));
  DropCompositionsLocked(id);
  // Replacing the entry drops the registry's reference to the old version
  // and clears any reload of it under way (that reload then discards its result).
  entries_[id] = std::move(entry);
  if (resident) {
    ++host_stats_.loads;
    host_stats_.load_seconds.Observe(load_seconds);
  }
  load_done_.notify_all();
  return entries_[id].info;
}

absl::Status AdapterRegistry::ResolveLocked(std::unique_lock<std::mutex>& lock,
                                            const std::string& id) {
  if (!options_.resolve) return NotLoadedError(id);
  if (resolving_.count(id) != 0) {
    load_done_.wait(lock, [&] { return resolving_.count(id) == 0; });
    return absl::OkStatus();
  }
  resolving_.insert(id);
  lock.unlock();
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::string> dir = options_.resolve(id);
  std::optional<CompactionReport> compaction;
  absl::StatusOr<LoraAdapter> adapter = dir.ok()
                                            ? ReadWeights(*dir, options_.compaction, &compaction)
                                            : absl::StatusOr<LoraAdapter>(dir.status());
  const double seconds = SecondsSince(start);
  lock.lock();
  resolving_.erase(id);
  load_done_.notify_all();
  if (!dir.ok()) return dir.status();
  if (!adapter.ok()) {
    return absl::Status(adapter.status().code(),
                        absl::StrCat("adapter \"", id, "\" resolved to ", *dir, ": ",
                                     adapter.status().message()));
  }
  // A Load of the same id while the files were read wins: it is newer.
  if (entries_.count(id) != 0) return absl::OkStatus();
  return InsertLocked(id, *dir, *std::move(adapter), std::move(compaction), seconds).status();
}

absl::Status AdapterRegistry::Unload(absl::string_view id) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  AdapterHandle last;  // freed after the lock is released
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(Entry * entry, FindLocked(canonical));
    last = std::move(entry->resident);
    entries_.erase(canonical);
    DropCompositionsLocked(canonical);
  }
  load_done_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<AdapterHandle> AdapterRegistry::ReloadLocked(std::unique_lock<std::mutex>& lock,
                                                            const std::string& id) {
  const AdapterInfo expected = entries_.at(id).info;
  lock.unlock();
  const auto start = std::chrono::steady_clock::now();
  std::optional<CompactionReport> compaction;
  absl::StatusOr<LoraAdapter> adapter = ReadWeights(
      expected.dir,
      expected.compaction ? std::optional<CompactionTarget>({expected.compaction->min_energy})
                          : std::nullopt,
      &compaction);
  const double seconds = SecondsSince(start);
  lock.lock();

  auto it = entries_.find(id);
  const bool unchanged = it != entries_.end() && it->second.info.version == expected.version;
  if (unchanged) it->second.loading = false;
  load_done_.notify_all();
  if (!unchanged) return AdapterHandle();
  if (!adapter.ok()) {
    return absl::Status(adapter.status().code(),
                        absl::StrCat("reloading adapter \"", id, "\" version ", expected.version,
                                     ": ", adapter.status().message()));
  }
  // A registered adapter's first read fixes its hash (it had none).
  if (!expected.content_hash.empty() && adapter->content_hash() != expected.content_hash) {
    return absl::FailedPreconditionError(absl::StrCat(
        "adapter \"", id, "\" version ", expected.version, ": the files in ", expected.dir,
        " changed since it was loaded (content hash ", expected.content_hash, ", now ",
        adapter->content_hash(), "); load it again to make a new version"));
  }
  RETURN_IF_ERROR(
      MakeRoomLocked(adapter->bytes(), 0, id, absl::StrCat("reloading adapter \"", id, "\"")));
  ++host_stats_.loads;
  host_stats_.load_seconds.Observe(seconds);
  Entry& entry = it->second;
  entry.info.content_hash = adapter->content_hash();
  // A lazily registered adapter's first read shows what compaction made of it.
  entry.info.ranks = adapter->ranks();
  entry.info.bytes = adapter->bytes();
  entry.info.compaction = std::move(compaction);
  entry.resident = MakeHandle(id, expected.version, expected.dir, *std::move(adapter));
  entry.info.resident = true;
  return entry.resident;
}

absl::StatusOr<AdapterHandle> AdapterRegistry::Acquire(absl::string_view id) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  std::unique_lock<std::mutex> lock(mu_);
  return AcquireLocked(lock, canonical, /*resolve=*/true);
}

absl::StatusOr<AdapterHandle> AdapterRegistry::AcquireLocked(std::unique_lock<std::mutex>& lock,
                                                             const std::string& id, bool resolve) {
  bool counted = false;
  while (true) {
    if (entries_.count(id) == 0) {
      if (!resolve) return NotLoadedError(id);
      RETURN_IF_ERROR(ResolveLocked(lock, id));
      if (!counted) {  // resolved: loaded into this tier for this call
        ++host_stats_.misses;
        counted = true;
      }
      continue;
    }
    Entry* entry = &entries_.at(id);
    entry->last_used = ++clock_;
    if (entry->resident != nullptr) {
      if (!counted) ++host_stats_.hits;
      return entry->resident;
    }
    if (!counted) {
      ++host_stats_.misses;
      counted = true;
    }
    if (entry->loading) {
      load_done_.wait(lock);
      continue;
    }
    entry->loading = true;
    ASSIGN_OR_RETURN(AdapterHandle handle, ReloadLocked(lock, id));
    if (handle != nullptr) return handle;
    // Replaced or unloaded while loading: look again.
  }
}

void AdapterRegistry::DropCompositionsLocked(const std::string& id) {
  for (auto it = composed_.begin(); it != composed_.end();) {
    const std::vector<std::string> parts = absl::StrSplit(it->first, '+');
    const bool uses = std::any_of(parts.begin(), parts.end(), [&id](const std::string& part) {
      return absl::StartsWith(part, absl::StrCat(id, "@"));
    });
    it = uses ? composed_.erase(it) : std::next(it);
  }
}

absl::StatusOr<AdapterHandle> AdapterRegistry::AcquireComposed(
    const std::vector<WeightedAdapterId>& parts) {
  if (parts.empty() || parts.size() > static_cast<size_t>(kMaxComposedAdapters)) {
    return absl::InvalidArgumentError(absl::StrCat("adapters: a composition takes 1 to ",
                                                   kMaxComposedAdapters, " adapters, got ",
                                                   parts.size()));
  }
  std::vector<WeightedAdapterId> sorted;
  for (const WeightedAdapterId& part : parts) {
    ASSIGN_OR_RETURN(std::string canonical, Canonical(part.id));
    RETURN_IF_ERROR(CheckCompositionWeight(canonical, part.weight));
    sorted.push_back({std::move(canonical), part.weight});
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.id < b.id; });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i].id == sorted[i - 1].id) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapters: \"", sorted[i].id, "\" is named twice in one composition"));
    }
  }
  // The components, held while the composition is built; the key names
  // their versions and exact weights (%.9g round-trips a float).
  std::vector<AdapterHandle> handles;
  std::vector<std::string> key_parts;
  for (const WeightedAdapterId& part : sorted) {
    ASSIGN_OR_RETURN(AdapterHandle handle, Acquire(part.id));
    key_parts.push_back(absl::StrFormat("%s@%d*%.9g", part.id, handle->version, part.weight));
    handles.push_back(std::move(handle));
  }
  const std::string key = absl::StrJoin(key_parts, "+");
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = composed_.find(key);
    if (it != composed_.end() && it->second.resident != nullptr) {
      it->second.last_used = ++clock_;
      return it->second.resident;
    }
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<CompositionPart> composition;
  Sha256 hash;
  hash.Update("composition");
  for (size_t i = 0; i < handles.size(); ++i) {
    composition.push_back({handles[i]->id, &handles[i]->adapter, sorted[i].weight});
    hash.Update(absl::StrFormat("+%s*%.9g", handles[i]->content_hash(), sorted[i].weight));
  }
  ASSIGN_OR_RETURN(LoraAdapter adapter,
                   ComposeLoraAdapters(composition, options_.limits, hash.HexDigest()));
  const double seconds = SecondsSince(start);
  std::lock_guard<std::mutex> lock(mu_);
  // A component replaced meanwhile: serve this request's versions, cache nothing.
  const bool current = std::all_of(handles.begin(), handles.end(), [this](const auto& h) {
    auto it = entries_.find(h->id);
    return it != entries_.end() && it->second.info.version == h->version;
  });
  RETURN_IF_ERROR(MakeRoomLocked(adapter.bytes(), 0, key,
                                 absl::StrCat("the composition \"", key, "\"")));
  // Hits and misses are the components' (Acquire counted them).
  ++host_stats_.loads;
  host_stats_.load_seconds.Observe(seconds);
  Entry entry;
  entry.info.id = key;
  entry.info.content_hash = adapter.content_hash();
  entry.info.bytes = adapter.bytes();
  entry.info.resident = true;
  entry.last_used = ++clock_;
  entry.resident = MakeHandle(key, /*version=*/0, /*dir=*/"", std::move(adapter));
  AdapterHandle handle = entry.resident;
  if (current) composed_[key] = std::move(entry);
  return handle;
}

absl::Status AdapterRegistry::Prefetch(absl::string_view id) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(Entry * entry, FindLocked(canonical));
    if (entry->resident != nullptr || entry->loading) return absl::OkStatus();
    entry->loading = true;
    entry->queued = true;
    prefetch_queue_.push_back(canonical);
  }
  work_.notify_one();
  return absl::OkStatus();
}

void AdapterRegistry::PrefetchWorker() {
  std::unique_lock<std::mutex> lock(mu_);
  while (true) {
    work_.wait(lock, [this] { return stop_ || !prefetch_queue_.empty(); });
    if (stop_) return;
    const std::string id = std::move(prefetch_queue_.front());
    prefetch_queue_.pop_front();
    auto it = entries_.find(id);
    // Unloaded or replaced since it was queued: nothing to do.
    if (it == entries_.end() || !it->second.queued) continue;
    it->second.queued = false;
    // A failure is left for the next Acquire, which retries and reports it.
    ReloadLocked(lock, id).IgnoreError();
  }
}

bool AdapterRegistry::IsResident(absl::string_view id) const {
  absl::StatusOr<std::string> canonical = Canonical(id);
  if (!canonical.ok()) return false;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(*canonical);
  return it != entries_.end() && it->second.resident != nullptr;
}

absl::Status AdapterRegistry::Pin(absl::string_view id) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  std::unique_lock<std::mutex> lock(mu_);
  // Pinned means resident: an evicted adapter is reloaded first, and one that
  // cannot get room is not pinned. The lock is held from the acquire on, so
  // nothing evicts it before the pin is set.
  RETURN_IF_ERROR(AcquireLocked(lock, canonical, /*resolve=*/false).status());
  entries_.at(canonical).info.pinned = true;
  return absl::OkStatus();
}

absl::Status AdapterRegistry::Unpin(absl::string_view id) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  std::lock_guard<std::mutex> lock(mu_);
  ASSIGN_OR_RETURN(Entry * entry, FindLocked(canonical));
  entry->info.pinned = false;
  return absl::OkStatus();
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Resolve(absl::string_view id) {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  std::unique_lock<std::mutex> lock(mu_);
  while (entries_.count(canonical) == 0) RETURN_IF_ERROR(ResolveLocked(lock, canonical));
  return entries_.at(canonical).info;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Get(absl::string_view id) const {
  ASSIGN_OR_RETURN(const std::string canonical, Canonical(id));
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(canonical);
  if (it == entries_.end()) return NotLoadedError(canonical);
  return it->second.info;
}

std::vector<AdapterInfo> AdapterRegistry::List() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<AdapterInfo> infos;
  for (const auto& [id, entry] : entries_) infos.push_back(entry.info);
  return infos;
}

std::vector<AdapterInfo> AdapterRegistry::List(const std::string& after, size_t limit) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<AdapterInfo> infos;
  for (auto it = entries_.upper_bound(after); it != entries_.end() && infos.size() < limit; ++it) {
    infos.push_back(it->second.info);
  }
  return infos;
}

AdapterRegistryStats AdapterRegistry::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  AdapterRegistryStats stats;
  stats.host = host_stats_;
  stats.registered = static_cast<int64_t>(entries_.size());
  stats.resident = std::count_if(entries_.begin(), entries_.end(),
                                 [](const auto& e) { return e.second.resident != nullptr; });
  stats.live_adapters = live_->adapters.load();
  stats.host_bytes = static_cast<size_t>(live_->bytes.load());
  stats.host_budget_bytes = options_.host_budget_bytes;
  return stats;
}

}  // namespace loraserve::adapters
