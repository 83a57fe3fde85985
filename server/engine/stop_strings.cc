#include "server/engine/stop_strings.h"

#include <algorithm>

#include "absl/strings/match.h"

namespace loraserve::engine {

StopStringFilter::StopStringFilter(std::vector<std::string> stop) : stop_(std::move(stop)) {
  stop_.erase(std::remove(stop_.begin(), stop_.end(), std::string()), stop_.end());
}

StopStringFilter::Result StopStringFilter::Feed(absl::string_view delta) {
  pending_.append(delta.data(), delta.size());
  Result result;
  size_t first_stop = std::string::npos;
  for (const std::string& s : stop_) first_stop = std::min(first_stop, pending_.find(s));
  if (first_stop != std::string::npos) {
    result.text = pending_.substr(0, first_stop);
    result.stopped = true;
    pending_.clear();
    return result;
  }
  // Hold back the longest tail that is a proper prefix of some stop string.
  size_t hold = 0;
  for (const std::string& s : stop_) {
    for (size_t len = std::min(s.size() - 1, pending_.size()); len > hold; --len) {
      if (absl::EndsWith(pending_, absl::string_view(s).substr(0, len))) {
        hold = len;
        break;
      }
    }
  }
  result.text = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return result;
}

std::string StopStringFilter::Flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace loraserve::engine
