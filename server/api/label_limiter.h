// Bounds a metric label's cardinality: the first `max_values` distinct values
// pass through, later ones become "other". Keeps a tenant- or adapter-named
// label from growing the scrape without limit.
//
// Threading: thread-safe.
//
// Example:
//   LabelLimiter adapters(64);
//   family.Add({{"adapter", adapters.Bound(id)}}).Increment();
#ifndef LORASERVE_SERVER_API_LABEL_LIMITER_H_
#define LORASERVE_SERVER_API_LABEL_LIMITER_H_

#include <cstddef>
#include <mutex>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/string_view.h"

namespace loraserve::api {

class LabelLimiter {
 public:
  explicit LabelLimiter(size_t max_values) : max_values_(max_values) {}

  std::string Bound(absl::string_view value);

 private:
  const size_t max_values_;
  // std::mutex, not absl::Mutex: TSan cannot see Debian's uninstrumented libabsl lock.
  std::mutex mu_;
  absl::flat_hash_set<std::string> seen_;  // guarded by mu_
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_LABEL_LIMITER_H_
