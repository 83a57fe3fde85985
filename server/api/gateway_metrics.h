// The metrics of the HTTP gateway, exposed at GET /metrics, on prometheus-cpp.
//
// Two sources: the gateway records each HTTP request it serves (counts,
// tokens, latencies), and at each scrape it mirrors the server's state from
// Inference.Stats and Adapters.List (running/waiting requests, KV blocks,
// adapter tiers, memory pools and their budgets), so the same numbers come out
// whether the gateway runs inside `loraserve serve` or alone in front of a
// replica (`loraserve gateway`).
//
// Beside loraserve's own names, the scrape carries the model-server protocol
// of the Kubernetes Gateway API Inference Extension under the names its
// endpoint picker reads by default for vLLM: vllm:num_requests_waiting,
// vllm:num_requests_running, vllm:kv_cache_usage_perc (and the older
// vllm:gpu_cache_usage_perc), vllm:lora_requests_info (labels
// running_lora_adapters, waiting_lora_adapters, max_lora; value: the Unix
// time of the snapshot) and vllm:cache_config_info (block_size,
// num_gpu_blocks).
//
// Cardinality: tenants come from the operator's key file (bounded by it);
// adapter label values go through a LabelLimiter: the first
// `max_adapter_labels` distinct adapters get their own label value, later
// ones share "other" (and loraserve_adapter_resident counts them there). The
// LoRA info gauge has one series, whose label values list at most the
// adapters of max_running_requests requests.
//
// Ownership: one object made by main and passed to the gateway, which must
// not outlive it; thread-safe (request threads record, the scrape thread
// renders).
//
// Example:
//   GatewayMetrics metrics({.max_adapter_labels = 64});
//   metrics.RecordRequest({.adapter = "acme/bot", .tenant = "acme", .status = 200, ...});
//   std::string text = metrics.Render(&stats, &adapters);
#ifndef LORASERVE_SERVER_API_GATEWAY_METRICS_H_
#define LORASERVE_SERVER_API_GATEWAY_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "loraserve/v1/adapters.pb.h"
#include "loraserve/v1/inference.pb.h"
#include "server/api/label_limiter.h"

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
  GatewayMetrics(const GatewayMetrics&) = delete;
  GatewayMetrics& operator=(const GatewayMetrics&) = delete;

  void RecordRequest(const RequestRecord& record);
  // The text exposition (format 0.0.4): request metrics, and the server's
  // state from `stats` and `adapters` (null when the server could not be
  // asked: loraserve_up is 0 then and the mirrored families keep their last
  // values).
  std::string Render(const v1::StatsResponse* stats, const v1::ListAdaptersResponse* adapters);

 private:
  using CounterFamily = prometheus::Family<prometheus::Counter>;
  using GaugeFamily = prometheus::Family<prometheus::Gauge>;
  using HistogramFamily = prometheus::Family<prometheus::Histogram>;

  std::string AdapterLabel(const std::optional<std::string>& adapter);
  void Mirror(const v1::StatsResponse& stats, const v1::ListAdaptersResponse& adapters);
  void MirrorProtocol(const v1::StatsResponse& stats);

  std::mutex render_mu_;  // one scrape at a time (Mirror replaces series)
  LabelLimiter label_limiter_;
  prometheus::Registry registry_;
  CounterFamily& requests_;
  CounterFamily& prompt_tokens_;
  CounterFamily& generation_tokens_;
  HistogramFamily& ttft_;
  HistogramFamily& tpot_;
  HistogramFamily& duration_;
  GaugeFamily& up_;
  GaugeFamily& running_;
  GaugeFamily& waiting_;
  GaugeFamily& kv_blocks_used_;
  GaugeFamily& kv_blocks_total_;
  GaugeFamily& adapters_registered_;
  GaugeFamily& adapter_resident_;
  GaugeFamily& memory_;
  GaugeFamily& memory_budget_;
  CounterFamily& adapter_loads_;
  CounterFamily& adapter_evictions_;
  HistogramFamily& adapter_load_seconds_;
  CounterFamily& merges_;
  CounterFamily& merge_failures_;
  CounterFamily& merged_steps_;
  CounterFamily& graph_steps_;
  CounterFamily& graph_fallbacks_;
  CounterFamily& preemptions_;
  CounterFamily& prefix_cached_tokens_;
  // The inference gateway's model-server protocol (see the file comment).
  GaugeFamily& protocol_waiting_;
  GaugeFamily& protocol_running_;
  GaugeFamily& protocol_kv_usage_;
  GaugeFamily& protocol_gpu_cache_usage_;
  GaugeFamily& protocol_lora_info_;
  GaugeFamily& protocol_cache_config_;
  // Series replaced wholesale at each scrape (guarded by render_mu_):
  // unloaded adapters leave the residency gauge, and the info gauges keep
  // only their current label values.
  std::vector<prometheus::Gauge*> resident_series_;
  prometheus::Gauge* lora_info_series_ = nullptr;
  prometheus::Gauge* cache_config_series_ = nullptr;
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_GATEWAY_METRICS_H_
