// The set of adapters a server knows: versioned, refcounted, byte-budgeted.
//
// Ids are "tenant/name", each part 1-64 characters of [A-Za-z0-9._-]; a bare
// "name" belongs to the registry's default tenant. Load(id, dir) validates the
// adapter completely (LoadLoraAdapter) before the registry changes; loading
// an id that exists replaces it with a new version (version + 1), visible to
// the next Acquire at once. Acquire returns a handle (a shared_ptr to an
// immutable LoadedAdapter): a request holds it from admission to its last
// token, so it keeps its version across a Replace or an Unload, and the
// weights are freed when the last holder (registry or request) lets go.
//
// Tiers. The disk tier is every registered adapter (its directory is
// remembered). The host tier holds float32 weights within a byte budget
// (--adapter-host-bytes; 0 means unlimited): a load that does not fit evicts
// adapters from the host tier, least recently used first, skipping pinned
// ones (Pin) and ones in use (a handle outside the registry); if that is not
// enough it fails with ResourceExhausted and nothing is evicted. An evicted
// adapter stays registered and is reloaded from its directory by the next
// Acquire, or ahead of time by Prefetch (a background load, so the engine can
// admit the request once IsResident says so); a reload whose files changed on
// disk is refused (a new version needs a Load). The budget counts every live
// LoadedAdapter, including old versions still held by requests.
//
// Device tier: DeviceAdapterCache (device_cache.h), beside this class and
// keyed by content hash. A request holds its AdapterHandle while the engine
// uses the adapter's device copy, so the host tier never evicts an adapter in
// use on the device; a device copy outlives a host eviction (it is a copy).
// Stats: `host` here, DeviceCacheStats there.
//
// Resolution (options.resolve, as vLLM's LoRA resolvers): an id that is not
// registered is looked up once, on its first Acquire or Resolve: the resolver
// names a folder and the adapter loads from it as version 1, validated as any
// Load is; concurrent first requests wait for the one load. Get, List and the
// changing calls never resolve.
//
// Threading: every method may be called from any thread (API threads); one
// mutex guards the registry, and no file is read while it is held. This is
// not the engine's hot path: the engine acquires a handle once per request.
// Ownership: the registry owns its background prefetch thread and joins it in
// the destructor; handles may outlive the registry.
//
// Example:
//   ASSIGN_OR_RETURN(auto registry, AdapterRegistry::Create(
//       {.base = base_shape, .limits = {.max_rank = 64}, .host_budget_bytes = 1 << 30}));
//   RETURN_IF_ERROR(registry->Load("acme/support-bot", "/adapters/support-bot").status());
//   ASSIGN_OR_RETURN(AdapterHandle adapter, registry->Acquire("acme/support-bot"));
//   // adapter->adapter.weights(layer, LoraModule::kQProj) ...
#ifndef LORASERVE_ADAPTERS_REGISTRY_H_
#define LORASERVE_ADAPTERS_REGISTRY_H_

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "adapters/lora_adapter.h"
#include "adapters/rank_compaction.h"
#include "base/bucket_counts.h"

namespace loraserve::adapters {

// The tenant of bare names unless AdapterRegistryOptions says otherwise.
inline constexpr char kDefaultTenant[] = "default";

// "tenant/name" for a valid id ("name" gets `default_tenant`); InvalidArgument
// naming the id and the expected form otherwise.
absl::StatusOr<std::string> CanonicalAdapterId(absl::string_view id,
                                               absl::string_view default_tenant);

// One version of one adapter. Immutable; shared by the registry and requests.
struct LoadedAdapter {
  std::string id;  // canonical "tenant/name"
  int64_t version = 0;
  std::string dir;
  LoraAdapter adapter;

  const std::string& content_hash() const { return adapter.content_hash(); }
};
using AdapterHandle = std::shared_ptr<const LoadedAdapter>;

struct AdapterInfo {
  std::string id;
  int64_t version = 0;
  std::string content_hash;
  std::string dir;
  std::vector<int> ranks;
  std::vector<std::string> target_modules;
  bool dora = false;                       // use_dora: magnitudes on every target
  std::vector<std::string> saved_modules;  // its modules_to_save copies, by module path
  size_t bytes = 0;  // float32 bytes of its weights when resident
  bool pinned = false;
  bool resident = false;  // in the host tier (else on disk only)
  // Set when it loads rank-compacted: the target, ranks and bytes before, and
  // each module's spectrum (no modules until a lazily registered adapter's
  // weights are first read; ranks and bytes are the stored ones until then).
  std::optional<CompactionReport> compaction;
};

struct AdapterTierStats {
  int64_t hits = 0;           // Acquire found it in this tier
  int64_t misses = 0;         // Acquire had to load it into this tier
  int64_t loads = 0;          // loads into this tier (Load, reloads, prefetches)
  int64_t evictions = 0;      // adapters evicted from this tier for room
  BucketCounts load_seconds;  // durations of those loads
};

struct AdapterRegistryStats {
  AdapterTierStats host;
  int64_t registered = 0;     // ids
  int64_t resident = 0;       // ids whose weights the host tier holds
  int64_t live_adapters = 0;  // LoadedAdapter objects alive, held by the registry or handles
  size_t host_bytes = 0;      // their bytes
  size_t host_budget_bytes = 0;
};

// One component of a composition (AcquireComposed).
struct WeightedAdapterId {
  std::string id;  // as Acquire takes it
  float weight = 1.0f;
};

struct AdapterRegistryOptions {
  BaseModelShape base;
  AdapterLimits limits;
  std::string default_tenant = kDefaultTenant;
  size_t host_budget_bytes = 0;  // --adapter-host-bytes; 0: unlimited
  // The folder to load an unregistered canonical id from, or NotFound saying
  // where it looked (AdapterFolderResolver); null: unknown ids are NotFound.
  std::function<absl::StatusOr<std::string>(const std::string& canonical_id)> resolve;
  // Rank compaction of every load that does not choose (--compact-adapters-energy);
  // nullopt or min_energy 1: none.
  std::optional<CompactionTarget> compaction;
};

class AdapterRegistry {
 public:
  // InvalidArgument when the default tenant is not a valid tenant name.
  static absl::StatusOr<std::unique_ptr<AdapterRegistry>> Create(AdapterRegistryOptions options);
  ~AdapterRegistry();
  AdapterRegistry(const AdapterRegistry&) = delete;
  AdapterRegistry& operator=(const AdapterRegistry&) = delete;

  // Loads `dir` as `id` (a new id at version 1, or the next version of an
  // existing one), rank-compacted to `compaction` (nullopt: the options'
  // default; min_energy 1: none); every reload of this version is compacted
  // the same. On error the registry is unchanged.
  absl::StatusOr<AdapterInfo> Load(absl::string_view id, const std::string& dir,
                                   std::optional<CompactionTarget> compaction = std::nullopt);
  // Load without the weights: `dir` is checked from adapter_config.json and
  // the safetensors header alone (AdapterRead::kMetadata) and registered in
  // the disk tier, as an evicted adapter is; the first Acquire (or Prefetch,
  // Pin) reads its tensors. Its content_hash is "" until that first read,
  // which fixes it: later reloads are checked against it. For start-ups with
  // many adapters: the registry keeps only the AdapterInfo of each.
  absl::StatusOr<AdapterInfo> Register(absl::string_view id, const std::string& dir);
  // Forgets `id`; requests holding a handle keep their version until done.
  absl::Status Unload(absl::string_view id);
  // The current version, reloading it from disk if it was evicted (the calling
  // thread waits for that load, or for a prefetch already under way), or
  // resolving it if it is not registered.
  absl::StatusOr<AdapterHandle> Acquire(absl::string_view id);
  // The composition of `parts` (adapter_composition.h): each component
  // acquired as Acquire does, then their sum, cached under a canonical key
  // (components sorted by id, with their versions and weights:
  // "tenant/a@1*0.5+tenant/b@3*1", also the handle's id), so the same mix
  // reuses one LoadedAdapter. A cached composition is counted in the host
  // budget and evicted like an adapter; it is dropped when a component is
  // replaced or unloaded, and it is never listed. InvalidArgument for
  // duplicate ids and for what ComposeLoraAdapters refuses; NotFound for an
  // unknown component.
  absl::StatusOr<AdapterHandle> AcquireComposed(const std::vector<WeightedAdapterId>& parts);
  // Get, resolving the id first if it is not registered.
  absl::StatusOr<AdapterInfo> Resolve(absl::string_view id);
  // Starts loading an evicted adapter in the background; OK at once when it is
  // resident or already loading. A background failure shows at the next Acquire.
  absl::Status Prefetch(absl::string_view id);
  // False for unknown ids.
  bool IsResident(absl::string_view id) const;
  // A pinned adapter is never evicted from the host tier; pinning an evicted
  // one reloads it (RESOURCE_EXHAUSTED when it cannot get room). No resolution.
  absl::Status Pin(absl::string_view id);
  absl::Status Unpin(absl::string_view id);

  absl::StatusOr<AdapterInfo> Get(absl::string_view id) const;
  // All registered adapters, by id.
  std::vector<AdapterInfo> List() const;
  // A page of them: up to `limit` (> 0) adapters with ids after `after` ("":
  // from the first), by id.
  std::vector<AdapterInfo> List(const std::string& after, size_t limit) const;
  AdapterRegistryStats stats() const;

 private:
  // Shared with every handle's deleter, so it outlives the registry if needed.
  struct LiveCounter;
  struct Entry {
    AdapterInfo info;        // resident and pinned are kept current
    AdapterHandle resident;  // null: disk tier only
    bool loading = false;    // a reload from disk is under way
    bool queued = false;     // ... started by Prefetch, in prefetch_queue_
    uint64_t last_used = 0;  // LRU clock
  };

  explicit AdapterRegistry(AdapterRegistryOptions options);

  absl::StatusOr<std::string> Canonical(absl::string_view id) const;
  // The entry of a canonical id, or NotFound naming it.
  absl::StatusOr<Entry*> FindLocked(const std::string& id);
  AdapterHandle MakeHandle(std::string id, int64_t version, std::string dir, LoraAdapter adapter);
  // Reads `dir` with its weights, compacted to `compaction` when it is set
  // and below 1 (`report` says how; nullopt otherwise).
  absl::StatusOr<LoraAdapter> ReadWeights(const std::string& dir,
                                          const std::optional<CompactionTarget>& compaction,
                                          std::optional<CompactionReport>* report) const;
  // Registers a validated adapter as the next version of `id` (budget
  // permitting); resident unless it was read as metadata only (`resident`
  // false: no bytes are taken, and it loads on first use).
  absl::StatusOr<AdapterInfo> InsertLocked(const std::string& id, const std::string& dir,
                                           LoraAdapter adapter,
                                           std::optional<CompactionReport> compaction,
                                           double load_seconds, bool resident = true);
  // Resolves an unregistered `id`, releasing the lock while reading files; OK
  // once it is registered, or once another caller's resolution of it ended
  // (the caller looks again either way).
  absl::Status ResolveLocked(std::unique_lock<std::mutex>& lock, const std::string& id);
  // Evicts unpinned, unused adapters (LRU first, never `keep`) until `need`
  // more bytes fit in the budget, `freed` bytes being released anyway; or
  // returns ResourceExhausted and evicts nothing.
  absl::Status MakeRoomLocked(size_t need, size_t freed, const std::string& keep,
                              const std::string& what);
  // Reloads an evicted adapter whose `loading` flag the caller set; releases
  // the lock while reading files. Returns null when the entry was replaced or
  // unloaded meanwhile.
  absl::StatusOr<AdapterHandle> ReloadLocked(std::unique_lock<std::mutex>& lock,
                                             const std::string& id);
  // Acquire of a canonical id; resolves an unregistered one only if `resolve`.
  // Returns with the lock held and the handle resident in its entry.
  absl::StatusOr<AdapterHandle> AcquireLocked(std::unique_lock<std::mutex>& lock,
                                              const std::string& id, bool resolve);
  void PrefetchWorker();

  const AdapterRegistryOptions options_;
  const std::shared_ptr<LiveCounter> live_;

  mutable std::mutex mu_;
  std::condition_variable load_done_;  // a reload finished (or the entry changed)
  std::condition_variable work_;       // prefetch queue or stop
  std::map<std::string, Entry> entries_;
  // Cached compositions by key; `resident` null once evicted.
  std::map<std::string, Entry> composed_;
  // Drops the compositions that have `id` as a component.
  void DropCompositionsLocked(const std::string& id);
  std::set<std::string> resolving_;  // ids being resolved; load_done_ tells when one ends
  AdapterTierStats host_stats_;
  uint64_t clock_ = 0;
  std::deque<std::string> prefetch_queue_;
  bool stop_ = false;
  std::thread worker_;  // started last, in the constructor
};

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_REGISTRY_H_
