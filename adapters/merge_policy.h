// When a step runs on a merged weight set (W + s·B·A for one adapter), and
// which merged sets stay cached: the traffic window, the merge threshold and a
// byte-budgeted LRU keyed by adapter content hash.
//
// Each step the engine reports its tokens (per content hash, for requests
// whose adapter may run merged, and in all); Choose names the adapter the step
// should run merged on, or none. For an adapter not cached yet the engine asks
// MakeRoom, drops the sets it names, builds the new set and Inserts it.
//
// Pure bookkeeping: no weights, no device. Not thread-safe; the engine's
// thread alone calls it.
//
// Example:
//   MergePolicy policy({.mode = LoraMode::kAuto, .cache_bytes = 1 << 30});
//   if (std::optional<std::string> hash = policy.Choose(tokens, total)) {
//     if (!policy.IsCached(*hash)) {
//       MergePolicy::Room room = policy.MakeRoom(bytes);  // drop room.evict, then build
//       if (room.fits) policy.Insert(*hash, bytes);
//     }
//   }
#ifndef LORASERVE_ADAPTERS_MERGE_POLICY_H_
#define LORASERVE_ADAPTERS_MERGE_POLICY_H_

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace loraserve::adapters {

enum class LoraMode {
  kAuto,      // merge adapters that dominate recent traffic, within the budget
  kUnmerged,  // always one base GEMM plus per-adapter LoRA segments
  kMerged,    // a batch whose requests all use one adapter runs on merged weights
};
// "auto", "unmerged" or "merged" (--lora-mode).
absl::StatusOr<LoraMode> ParseLoraMode(absl::string_view text);

struct MergePolicyOptions {
  LoraMode mode = LoraMode::kAuto;
  int64_t cache_bytes = 0;    // merged sets held at most; 0 disables merging in auto mode
  double threshold = 0.5;     // auto: an adapter's share of the window's tokens to merge it
  int32_t window_steps = 32;  // steps that share is measured over
  // auto: the least share of a step's tokens the merged adapter must have for
  // the step to run on merged weights (the rest get low-rank corrections).
  double min_batch_share = 1.0;
};

class MergePolicy {
 public:
  explicit MergePolicy(MergePolicyOptions options);

  // Records one step: `mergeable_tokens` by content hash, `total_tokens` of
  // the whole step. Returns the content hash to run this step merged on (the
  // adapter with most tokens in it), or nullopt for the unmerged path:
  // always in unmerged mode; in merged mode unless that adapter has every
  // token of the step; in auto mode unless it has `min_batch_share` of the
  // step and, when not cached yet, `threshold` of the window. A cached set it
  // names counts as used by this step.
  std::optional<std::string> Choose(const std::map<std::string, int64_t>& mergeable_tokens,
                                    int64_t total_tokens);
  bool IsCached(const std::string& hash) const { return cached_.count(hash) != 0; }

  // Room for a new set of `bytes`: the cached sets to drop, least recently
  // used first, now forgotten here; `fits` is false when even then it would
  // pass the budget (merged mode fits anyway: the step needs that set).
  struct Room {
    std::vector<std::string> evict;
    bool fits = false;
  };
  Room MakeRoom(int64_t bytes);
  // The set for `hash` is built and cached (used by this step).
  void Insert(const std::string& hash, int64_t bytes);
  // Every cached set is dropped (the engine needs their device memory).
  void Clear();
  int64_t cached_bytes() const { return cached_bytes_; }

 private:
  struct Cached {
    int64_t bytes = 0;
    int64_t last_used_step = 0;
  };
  const MergePolicyOptions options_;
  int64_t step_ = 0;                                   // steps recorded, the LRU clock
  std::deque<std::map<std::string, int64_t>> window_;  // per step: content hash -> tokens
  std::map<std::string, Cached> cached_;               // content hash -> its set
  int64_t cached_bytes_ = 0;
};

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_MERGE_POLICY_H_
