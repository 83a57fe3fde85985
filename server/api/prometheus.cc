#include "server/api/prometheus.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace loraserve::api::prometheus {
namespace {

// Misconfigured metrics are found at start-up; there is no caller that could
// recover, so say what was wrong and stop.
[[noreturn]] void Fatal(const std::string& message) {
  std::fprintf(stderr, "prometheus: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

bool IsValidMetricName(absl::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    const bool digit = c >= '0' && c <= '9';
    if (!alpha && !(digit && i > 0)) return false;
  }
  return true;
}

bool IsValidLabelName(absl::string_view name) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    const bool digit = c >= '0' && c <= '9';
    if (!alpha && !(digit && i > 0)) return false;
  }
  return true;
}

// Integers print as integers ("1000000", not "1e+06", which a shortest
// round-trip formatter would choose); other values print in the shortest form
// that parses back to the same double.
void AppendValue(double value, std::string* out) {
  if (std::isnan(value)) {
    out->append("NaN");
  } else if (std::isinf(value)) {
    out->append(value > 0 ? "+Inf" : "-Inf");
  } else if (value == std::trunc(value) && std::fabs(value) < 9.2e18) {
    absl::StrAppend(out, static_cast<int64_t>(value));
  } else {
    char buffer[32];
    const std::to_chars_result result = std::to_chars(buffer, buffer + sizeof(buffer), value);
    out->append(buffer, result.ptr);
  }
}

std::string FormatValue(double value) {
  std::string text;
  AppendValue(value, &text);
  return text;
}

// HELP text escapes backslash and newline; label values also escape the
// double quote that would end them.
void AppendEscaped(absl::string_view text, bool escape_quote, std::string* out) {
  for (const char c : text) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '"' && escape_quote) {
      out->append("\\\"");
    } else {
      out->push_back(c);
    }
  }
}

// One sample line: name+suffix, the label pairs (plus `le` for histogram
// buckets when `le` is non-empty), the value.
void AppendSample(absl::string_view name, absl::string_view suffix,
                  const std::vector<std::string>& label_names, const Labels& values,
                  absl::string_view le, absl::string_view value, std::string* out) {
  absl::StrAppend(out, name, suffix);
  if (!label_names.empty() || !le.empty()) {
    out->push_back('{');
    for (size_t i = 0; i < label_names.size(); ++i) {
      if (i > 0) out->push_back(',');
      absl::StrAppend(out, label_names[i], "=\"");
      AppendEscaped(values[i], /*escape_quote=*/true, out);
      out->push_back('"');
    }
    if (!le.empty()) {
      if (!label_names.empty()) out->push_back(',');
      absl::StrAppend(out, "le=\"", le, "\"");
    }
    out->push_back('}');
  }
  absl::StrAppend(out, " ", value, "\n");
}

}  // namespace

Family::Family(std::string name, std::string help, std::vector<std::string> label_names,
               std::atomic<int64_t>* dropped_updates)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      dropped_updates_(dropped_updates) {}

bool Family::Accepts(const Labels& values) const {
  if (values.size() == label_names_.size()) return true;
  CountDropped();
  return false;
}

void CounterFamily::Add(const Labels& values, double delta) {
  if (!Accepts(values)) return;
  if (!(delta >= 0)) {  // also catches NaN
    CountDropped();
    return;
  }
  absl::MutexLock lock(&mu_);
  values_[values] += delta;
}

void CounterFamily::Set(const Labels& values, double total) {
  if (!Accepts(values)) return;
  if (!(total >= 0)) {
    CountDropped();
    return;
  }
  absl::MutexLock lock(&mu_);
  values_[values] = total;
}

void CounterFamily::AppendSamples(std::string* out) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [labels, value] : values_) {
    AppendSample(name(), "", label_names(), labels, "", FormatValue(value), out);
  }
}

void GaugeFamily::Set(const Labels& values, double value) {
  if (!Accepts(values)) return;
  absl::MutexLock lock(&mu_);
  values_[values] = value;
}

void GaugeFamily::Add(const Labels& values, double delta) {
  if (!Accepts(values)) return;
  absl::MutexLock lock(&mu_);
  values_[values] += delta;
}

void GaugeFamily::Clear() {
  absl::MutexLock lock(&mu_);
  values_.clear();
}

void GaugeFamily::AppendSamples(std::string* out) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [labels, value] : values_) {
    AppendSample(name(), "", label_names(), labels, "", FormatValue(value), out);
  }
}

HistogramFamily::HistogramFamily(std::string name, std::string help,
                                 std::vector<std::string> label_names,
                                 std::vector<double> upper_bounds,
                                 std::atomic<int64_t>* dropped_updates)
    : Family(std::move(name), std::move(help), std::move(label_names), dropped_updates),
      upper_bounds_(std::move(upper_bounds)) {}

HistogramFamily::Data& HistogramFamily::DataFor(const Labels& values) {
  Data& data = data_[values];
  if (data.counts.empty()) data.counts.assign(upper_bounds_.size() + 1, 0);
  return data;
}

void HistogramFamily::Observe(const Labels& values, double value) {
  if (!Accepts(values)) return;
  // NaN compares false with every bound; it belongs in +Inf only.
  const size_t bucket = std::isnan(value)
                            ? upper_bounds_.size()
                            : std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) -
                                  upper_bounds_.begin();
  absl::MutexLock lock(&mu_);
  Data& data = DataFor(values);
  ++data.counts[bucket];
  data.sum += value;
}

void HistogramFamily::Set(const Labels& values, const std::vector<int64_t>& bucket_counts,
                          double sum) {
  if (!Accepts(values)) return;
  const bool negative = std::any_of(bucket_counts.begin(), bucket_counts.end(),
                                    [](int64_t count) { return count < 0; });
  if (bucket_counts.size() != upper_bounds_.size() + 1 || negative) {
    CountDropped();
    return;
  }
  absl::MutexLock lock(&mu_);
  Data& data = data_[values];
  data.counts = bucket_counts;
  data.sum = sum;
}

void HistogramFamily::AppendSamples(std::string* out) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [labels, data] : data_) {
    int64_t cumulative = 0;
    for (size_t i = 0; i < upper_bounds_.size(); ++i) {
      cumulative += data.counts[i];
      AppendSample(name(), "_bucket", label_names(), labels, FormatValue(upper_bounds_[i]),
                   absl::StrCat(cumulative), out);
    }
    cumulative += data.counts.back();
    AppendSample(name(), "_bucket", label_names(), labels, "+Inf", absl::StrCat(cumulative), out);
    AppendSample(name(), "_sum", label_names(), labels, "", FormatValue(data.sum), out);
    AppendSample(name(), "_count", label_names(), labels, "", absl::StrCat(cumulative), out);
  }
}

void Registry::CheckNewFamily(const std::string& name,
                              const std::vector<std::string>& label_names) {
  if (!IsValidMetricName(name)) {
    Fatal(absl::StrCat("invalid metric name \"", name, "\": expected [a-zA-Z_:][a-zA-Z0-9_:]*"));
  }
  for (const std::unique_ptr<Family>& family : families_) {
    if (family->name() == name) Fatal(absl::StrCat("metric \"", name, "\" is added twice"));
  }
  for (size_t i = 0; i < label_names.size(); ++i) {
    const std::string& label = label_names[i];
    if (!IsValidLabelName(label) || absl::string_view(label).substr(0, 2) == "__") {
      Fatal(absl::StrCat("metric \"", name, "\": invalid label name \"", label,
                         "\": expected [a-zA-Z_][a-zA-Z0-9_]* not starting with \"__\""));
    }
    if (std::find(label_names.begin(), label_names.begin() + i, label) != label_names.begin() + i) {
      Fatal(absl::StrCat("metric \"", name, "\": label name \"", label, "\" repeats"));
    }
  }
}

CounterFamily& Registry::AddCounter(std::string name, std::string help,
                                    std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewFamily(name, label_names);
  if (!absl::EndsWith(name, "_total")) {
    Fatal(absl::StrCat("counter \"", name, "\": counter names must end in \"_total\""));
  }
  auto* family = new CounterFamily(std::move(name), std::move(help), std::move(label_names),
                                   &dropped_updates_);
  families_.emplace_back(family);
  if (family->label_names().empty()) family->Set({}, 0);
  return *family;
}

GaugeFamily& Registry::AddGauge(std::string name, std::string help,
                                std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewFamily(name, label_names);
  auto* family =
      new GaugeFamily(std::move(name), std::move(help), std::move(label_names), &dropped_updates_);
  families_.emplace_back(family);
  if (family->label_names().empty()) family->Set({}, 0);
  return *family;
}

HistogramFamily& Registry::AddHistogram(std::string name, std::string help,
                                        std::vector<std::string> label_names,
                                        std::vector<double> upper_bounds) {
  absl::MutexLock lock(&mu_);
  CheckNewFamily(name, label_names);
  if (std::find(label_names.begin(), label_names.end(), "le") != label_names.end()) {
    Fatal(absl::StrCat("histogram \"", name, "\": \"le\" is reserved for bucket bounds"));
  }
  for (size_t i = 0; i < upper_bounds.size(); ++i) {
    if (!std::isfinite(upper_bounds[i]) || (i > 0 && !(upper_bounds[i - 1] < upper_bounds[i]))) {
      Fatal(absl::StrCat("histogram \"", name, "\": upper bounds must be finite and strictly ",
                         "ascending, got [", absl::StrJoin(upper_bounds, ", "), "]"));
    }
  }
  const size_t buckets = upper_bounds.size() + 1;
  auto* family = new HistogramFamily(std::move(name), std::move(help), std::move(label_names),
                                     std::move(upper_bounds), &dropped_updates_);
  families_.emplace_back(family);
  if (family->label_names().empty()) family->Set({}, std::vector<int64_t>(buckets, 0), 0);
  return *family;
}

std::string Registry::Render() const {
  std::string out;
  absl::MutexLock lock(&mu_);
  for (const std::unique_ptr<Family>& family : families_) {
    out.append("# HELP ").append(family->name()).push_back(' ');
    AppendEscaped(family->help_, /*escape_quote=*/false, &out);
    absl::StrAppend(&out, "\n# TYPE ", family->name(), " ", family->type(), "\n");
    family->AppendSamples(&out);
  }
  return out;
}

std::string LabelLimiter::Bound(absl::string_view value) {
  absl::MutexLock lock(&mu_);
  if (seen_.contains(value)) return std::string(value);
  if (seen_.size() < max_values_) {
    seen_.emplace(value);
    return std::string(value);
  }
  return "other";
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  if (!(start > 0) || !(factor > 1) || count < 1) {
    Fatal(absl::StrCat("ExponentialBuckets(", start, ", ", factor, ", ", count,
                       "): expected start > 0, factor > 1, count >= 1"));
  }
  std::vector<double> bounds;
  bounds.reserve(count);
  double bound = start;
  for (int i = 0; i < count; ++i) {
    bounds.push_back(bound);
    bound *= factor;
  }
  return bounds;
}

}  // namespace loraserve::api::prometheus
