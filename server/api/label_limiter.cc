#include "server/api/label_limiter.h"

namespace loraserve::api {

std::string LabelLimiter::Bound(absl::string_view value) {
  std::lock_guard<std::mutex> lock(mu_);
  if (seen_.contains(value)) return std::string(value);
  if (seen_.size() < max_values_) {
    seen_.emplace(value);
    return std::string(value);
  }
  return "other";
}

}  // namespace loraserve::api
