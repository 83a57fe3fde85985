#include "adapters/merge_policy.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace loraserve::adapters {

absl::StatusOr<LoraMode> ParseLoraMode(absl::string_view text) {
  if (text == "auto") return LoraMode::kAuto;
  if (text == "unmerged") return LoraMode::kUnmerged;
  if (text == "merged") return LoraMode::kMerged;
  return absl::InvalidArgumentError(
      absl::StrCat("--lora-mode must be auto, unmerged or merged, got '", text, "'"));
}

MergePolicy::MergePolicy(MergePolicyOptions options) : options_(options) {}

std::optional<std::string> MergePolicy::Choose(
    const std::map<std::string, int64_t>& mergeable_tokens, int64_t total_tokens) {
  if (options_.mode == LoraMode::kUnmerged) return std::nullopt;
  ++step_;
  window_.push_back(mergeable_tokens);
  if (static_cast<int32_t>(window_.size()) > options_.window_steps) window_.pop_front();
  if (mergeable_tokens.empty() || total_tokens <= 0) return std::nullopt;
  // The first of equals in hash order: a choice that does not depend on the batch's order.
  const auto best =
      std::max_element(mergeable_tokens.begin(), mergeable_tokens.end(),
                       [](const auto& a, const auto& b) { return a.second < b.second; });
  const double share_now = static_cast<double>(best->second) / static_cast<double>(total_tokens);
  if (options_.mode == LoraMode::kMerged) {
    if (share_now != 1.0) return std::nullopt;
  } else {
    if (options_.cache_bytes <= 0 || share_now < options_.min_batch_share) return std::nullopt;
    if (!IsCached(best->first)) {
      int64_t window_total = 0, window_best = 0;
      for (const auto& step : window_) {
        for (const auto& [hash, n] : step) {
          window_total += n;
          if (hash == best->first) window_best += n;
        }
      }
      if (static_cast<double>(window_best) < options_.threshold * window_total) {
        return std::nullopt;
      }
    }
  }
  if (auto it = cached_.find(best->first); it != cached_.end()) it->second.last_used_step = step_;
  return best->first;
}

MergePolicy::Room MergePolicy::MakeRoom(int64_t bytes) {
  Room room;
  while (!cached_.empty() && cached_bytes_ + bytes > options_.cache_bytes) {
    auto lru = std::min_element(cached_.begin(), cached_.end(), [](const auto& a, const auto& b) {
      return a.second.last_used_step < b.second.last_used_step;
    });
    room.evict.push_back(lru->first);
    cached_bytes_ -= lru->second.bytes;
    cached_.erase(lru);
  }
  room.fits = options_.mode == LoraMode::kMerged || bytes <= options_.cache_bytes - cached_bytes_;
  return room;
}

void MergePolicy::Insert(const std::string& hash, int64_t bytes) {
  Cached& cached = cached_[hash];
  cached_bytes_ += bytes - cached.bytes;
  cached.bytes = bytes;
  cached.last_used_step = step_;
}

void MergePolicy::Clear() {
  cached_.clear();
  cached_bytes_ = 0;
}

}  // namespace loraserve::adapters
