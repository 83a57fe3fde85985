// Metrics in the Prometheus text exposition format (version 0.0.4), written
// here because prometheus-cpp is not packaged for the systems we build on.
//
// A Registry owns metric families: counters, gauges and histograms, each with
// a fixed list of label names. Families are added at start-up and never
// removed, so the references Add* returns stay valid for the registry's life.
// main makes the one Registry and passes it to whoever records metrics; there
// is no global instance.
//
// Threading: every method may be called from any thread. API threads update
// families while the scrape thread calls Render(); each family has its own
// lock, held only for a map lookup and an add.
//
// Errors: a bad metric name, label name, bucket list or a duplicate family is
// a programming error found at start-up, so Add* prints what was wrong to
// stderr and aborts. An update whose label values do not match the family's
// label names (or a negative counter delta) never aborts: it is ignored and
// counted in Registry::dropped_updates().
//
// Example:
//   Registry registry;
//   CounterFamily& requests = registry.AddCounter(
//       "loraserve_requests_total", "Requests by RPC and code.", {"rpc", "code"});
//   HistogramFamily& loads = registry.AddHistogram(
//       "loraserve_adapter_load_seconds", "Adapter load time.", {},
//       ExponentialBuckets(0.001, 2, 16));
//   requests.Add({"Generate", "OK"});
//   loads.Observe({}, 0.25);
//   std::string body = registry.Render();  // serve with
//   // Content-Type: text/plain; version=0.0.4
#ifndef LORASERVE_SERVER_API_PROMETHEUS_H_
#define LORASERVE_SERVER_API_PROMETHEUS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace loraserve::api::prometheus {

// Label values, in the order of the family's label names.
using Labels = std::vector<std::string>;

// What the three kinds of family share: name, help, label names, and the
// check that an update's label values fit them. Families without label names
// start with their one sample at zero, so the series exists before the first
// update.
class Family {
 public:
  virtual ~Family() = default;
  Family(const Family&) = delete;
  Family& operator=(const Family&) = delete;

  const std::string& name() const { return name_; }

 protected:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::atomic<int64_t>* dropped_updates);

  // True when `values` has one value per label name; otherwise counts a
  // dropped update and returns false.
  bool Accepts(const Labels& values) const;
  void CountDropped() const { dropped_updates_->fetch_add(1, std::memory_order_relaxed); }

  const std::vector<std::string>& label_names() const { return label_names_; }

 private:
  friend class Registry;

  virtual absl::string_view type() const = 0;
  // Appends this family's sample lines (not HELP/TYPE) to `out`, label sets
  // in sorted order.
  virtual void AppendSamples(std::string* out) const = 0;

  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
  std::atomic<int64_t>* const dropped_updates_;  // owned by the Registry
};

class CounterFamily : public Family {
 public:
  // Adds `delta` (>= 0) to the label set's count.
  void Add(const Labels& values, double delta = 1);
  // Sets the count to `total`, for totals kept elsewhere by a monotonic
  // source (the engine's step count) and mirrored before each scrape.
  void Set(const Labels& values, double total);

 private:
  friend class Registry;
  using Family::Family;

  absl::string_view type() const override { return "counter"; }
  void AppendSamples(std::string* out) const override;

  mutable absl::Mutex mu_;
  std::map<Labels, double> values_ ABSL_GUARDED_BY(mu_);
};

class GaugeFamily : public Family {
 public:
  void Set(const Labels& values, double value);
  // Adds `delta` (either sign); a new label set starts at zero.
  void Add(const Labels& values, double delta);
  // Drops every label set, for a gauge refreshed wholesale at each scrape
  // (per-adapter residency), so label sets that went away stop being exported.
  void Clear();

 private:
  friend class Registry;
  using Family::Family;

  absl::string_view type() const override { return "gauge"; }
  void AppendSamples(std::string* out) const override;

  mutable absl::Mutex mu_;
  std::map<Labels, double> values_ ABSL_GUARDED_BY(mu_);
};

class HistogramFamily : public Family {
 public:
  // Counts `value` in the first bucket whose upper bound is >= value (NaN and
  // values above every bound in the +Inf bucket only) and adds it to the sum.
  void Observe(const Labels& values, double value);
  // Mirrors a histogram kept elsewhere (base/bucket_counts.h): per-bucket,
  // non-cumulative counts aligned with the family's upper bounds, then one
  // overflow count; and the sum. A count list of the wrong length or with a
  // negative count is dropped.
  void Set(const Labels& values, const std::vector<int64_t>& bucket_counts, double sum);

 private:
  friend class Registry;
  HistogramFamily(std::string name, std::string help, std::vector<std::string> label_names,
                  std::vector<double> upper_bounds, std::atomic<int64_t>* dropped_updates);

  absl::string_view type() const override { return "histogram"; }
  void AppendSamples(std::string* out) const override;

  struct Data {
    std::vector<int64_t> counts;  // per bucket (not cumulative), then the overflow
    double sum = 0;
  };
  Data& DataFor(const Labels& values) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::vector<double> upper_bounds_;  // strictly ascending, finite

  mutable absl::Mutex mu_;
  std::map<Labels, Data> data_ ABSL_GUARDED_BY(mu_);
};

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Each Add* aborts with a message when `name` is not a valid metric name
  // ([a-zA-Z_:][a-zA-Z0-9_:]*) or is already taken, or a label name is not
  // [a-zA-Z_][a-zA-Z0-9_]*, starts with "__" or repeats. Counter names must
  // end in "_total"; histograms may not use the label name "le", and their
  // upper bounds must be finite and strictly ascending (the +Inf bucket is
  // implied).
  CounterFamily& AddCounter(std::string name, std::string help,
                            std::vector<std::string> label_names);
  GaugeFamily& AddGauge(std::string name, std::string help, std::vector<std::string> label_names);
  HistogramFamily& AddHistogram(std::string name, std::string help,
                                std::vector<std::string> label_names,
                                std::vector<double> upper_bounds);

  // Every family in the order it was added, in the text exposition format.
  std::string Render() const;

  // Updates ignored because their label values did not fit the family, or
  // their values were invalid (a negative counter delta).
  int64_t dropped_updates() const { return dropped_updates_.load(std::memory_order_relaxed); }

 private:
  // Aborts unless `name` is new and valid and `label_names` are valid.
  void CheckNewFamily(const std::string& name, const std::vector<std::string>& label_names)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Family>> families_ ABSL_GUARDED_BY(mu_);
  std::atomic<int64_t> dropped_updates_{0};
};

// Bounds a label's cardinality: the first `max_values` distinct values pass
// through, later ones become "other". Keeps a tenant- or adapter-named label
// from growing the scrape without limit. Thread-safe.
class LabelLimiter {
 public:
  explicit LabelLimiter(size_t max_values) : max_values_(max_values) {}

  std::string Bound(absl::string_view value);

 private:
  const size_t max_values_;
  absl::Mutex mu_;
  absl::flat_hash_set<std::string> seen_ ABSL_GUARDED_BY(mu_);
};

// `count` upper bounds start, start*factor, start*factor^2, ... Aborts unless
// start > 0, factor > 1 and count >= 1 (called at start-up).
std::vector<double> ExponentialBuckets(double start, double factor, int count);

}  // namespace loraserve::api::prometheus

#endif  // LORASERVE_SERVER_API_PROMETHEUS_H_
