// Counts of observed durations (or any values) in fixed buckets: the data of
// a Prometheus histogram kept by a module that must not know about metrics
// (the adapter registry's loads, the device cache's uploads). The API layer
// mirrors it into its metrics registry.
//
// Not thread-safe: the owner guards it with the lock that guards its other
// stats.
//
// Example:
//   BucketCounts loads(kLatencyBucketsSeconds);
//   loads.Observe(0.004);  // counts[1] == 1 (0.001 < 0.004 <= 0.005)
#ifndef LORASERVE_BASE_BUCKET_COUNTS_H_
#define LORASERVE_BASE_BUCKET_COUNTS_H_

#include <algorithm>
#include <cstdint>
#include <vector>

namespace loraserve {

// Upper bounds from a millisecond to a minute: adapter loads and uploads.
inline const std::vector<double>& LatencyBucketsSeconds() {
  static const std::vector<double> bounds = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                             0.5,   1,     2.5,  5,     10,   30,  60};
  return bounds;
}

struct BucketCounts {
  BucketCounts() : BucketCounts(LatencyBucketsSeconds()) {}
  explicit BucketCounts(std::vector<double> upper_bounds)
      : upper_bounds(std::move(upper_bounds)), counts(this->upper_bounds.size() + 1, 0) {}

  // Adds `value` to the first bucket whose upper bound is >= value, or to the
  // overflow bucket (the last count).
  void Observe(double value) {
    const auto bucket = std::lower_bound(upper_bounds.begin(), upper_bounds.end(), value);
    ++counts[bucket - upper_bounds.begin()];
    sum += value;
  }
  int64_t total() const {
    int64_t n = 0;
    for (int64_t c : counts) n += c;
    return n;
  }

  std::vector<double> upper_bounds;  // ascending
  std::vector<int64_t> counts;       // per bucket (not cumulative), then the overflow
  double sum = 0;
};

}  // namespace loraserve

#endif  // LORASERVE_BASE_BUCKET_COUNTS_H_
