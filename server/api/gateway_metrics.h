// The metrics of the HTTP gateway, exposed at GET /metrics.
//
// Two sources: the gateway records each HTTP request it serves (counts,
// tokens, latencies), and at each scrape it mirrors the server's state from
// Inference.Stats and Adapters.List (running/waiting requests, KV blocks,
// adapter tiers, memory pools and their budgets), so the same numbers come out
// whether the gateway runs inside `loraserve serve` or alone in front of a
// replica (`loraserve gateway`).
//
// Cardinality: tenants come from the operator's key file (bounded by it);
// adapter label values go through a LabelLimiter: the first
// `max_adapter_labels` distinct adapters get their own label value, later
// ones share "other" (and loraserve_adapter_resident counts them there).
//
// Ownership: one object made by the gateway's owner; thread-safe (request
// threads record, the scrape thread renders).
//
// Example:
//   GatewayMetrics metrics({.max_adapter_labels = 64});
//   metrics.RecordRequest({.adapter = "acme/bot", .tenant = "acme", .status = 200, ...});
//   std::string text = metrics.Render(&stats, &adapters);
#ifndef LORASERVE_SERVER_API_GATEWAY_METRICS_H_
#define LORASERVE_SERVER_API_GATEWAY_METRICS_H_

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>

#include "loraserve/v1/adapters.pb.h"
#include "loraserve/v1/inference.pb.h"
#include "server/api/prometheus.h"

namespace loraserve::api {

struct GatewayMetricsOptions {
  size_t max_adapter_labels = 64;
};

// One finished HTTP request.
struct RequestRecord {
  // Canonical id, "" for the base model; unset when the request failed
  // before its model was resolved (label "none").
  std::optional<std::string> adapter;
  std::string tenant;
  int http_status = 200;
  int64_t prompt_tokens = 0;
  int64_t generation_tokens = 0;
  std::optional<double> ttft_seconds = std::nullopt;  // absent when no token came
  std::optional<double> tpot_seconds = std::nullopt;  // absent with fewer than two tokens
  double duration_seconds = 0;
};

class GatewayMetrics {
 public:
  explicit GatewayMetrics(GatewayMetricsOptions options);

  void RecordRequest(const RequestRecord& record);
  // The text exposition: request metrics, and the server's state from
  // `stats` and `adapters` (null when the server could not be asked:
  // loraserve_up is 0 then and the mirrored families keep their last values).
  std::string Render(const v1::StatsResponse* stats, const v1::ListAdaptersResponse* adapters);

 private:
  std::string AdapterLabel(const std::optional<std::string>& adapter);
  void Mirror(const v1::StatsResponse& stats, const v1::ListAdaptersResponse& adapters);

  std::mutex mu_;         // guards label_limiter_
  std::mutex render_mu_;  // one scrape at a time (Mirror clears and refills gauges)
  prometheus::LabelLimiter label_limiter_;
  prometheus::Registry registry_;
  prometheus::CounterFamily& requests_;
  prometheus::CounterFamily& prompt_tokens_;
  prometheus::CounterFamily& generation_tokens_;
  prometheus::HistogramFamily& ttft_;
  prometheus::HistogramFamily& tpot_;
  prometheus::HistogramFamily& duration_;
  prometheus::GaugeFamily& up_;
  prometheus::GaugeFamily& running_;
  prometheus::GaugeFamily& waiting_;
  prometheus::GaugeFamily& kv_blocks_used_;
  prometheus::GaugeFamily& kv_blocks_total_;
  prometheus::GaugeFamily& adapters_registered_;
  prometheus::GaugeFamily& adapter_resident_;
  prometheus::GaugeFamily& memory_;
  prometheus::GaugeFamily& memory_budget_;
  prometheus::CounterFamily& adapter_loads_;
  prometheus::CounterFamily& adapter_evictions_;
  prometheus::HistogramFamily& adapter_load_seconds_;
  prometheus::CounterFamily& merges_;
  prometheus::CounterFamily& merged_steps_;
  prometheus::CounterFamily& graph_steps_;
  prometheus::CounterFamily& graph_fallbacks_;
  prometheus::CounterFamily& preemptions_;
  prometheus::CounterFamily& prefix_cached_tokens_;
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_GATEWAY_METRICS_H_
