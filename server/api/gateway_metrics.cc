#include "server/api/gateway_metrics.h"

#include <map>
#include <set>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/bucket_counts.h"
#include "server/api/openai_protocol.h"

namespace loraserve::api {
namespace {

constexpr char kBase[] = "base";
constexpr char kUnresolved[] = "none";  // the request failed before its model was known

std::vector<int64_t> Counts(const v1::Histogram& histogram) {
  return {histogram.counts().begin(), histogram.counts().end()};
}

}  // namespace

GatewayMetrics::GatewayMetrics(GatewayMetricsOptions options)
    : label_limiter_(options.max_adapter_labels),
      requests_(registry_.AddCounter("loraserve_requests_total",
                                     "HTTP inference requests by adapter, tenant and HTTP status",
                                     {"adapter", "tenant", "status"})),
      prompt_tokens_(registry_.AddCounter("loraserve_prompt_tokens_total",
                                          "Prompt tokens of finished requests",
                                          {"adapter", "tenant"})),
      generation_tokens_(registry_.AddCounter("loraserve_generation_tokens_total",
                                              "Generated tokens of finished requests",
                                              {"adapter", "tenant"})),
      ttft_(registry_.AddHistogram("loraserve_time_to_first_token_seconds",
                                   "From the request's arrival to its first token", {"adapter"},
                                   prometheus::ExponentialBuckets(0.005, 2, 15))),
      tpot_(registry_.AddHistogram("loraserve_time_per_output_token_seconds",
                                   "Mean time between a request's tokens after the first",
                                   {"adapter"}, prometheus::ExponentialBuckets(0.001, 2, 14))),
      duration_(registry_.AddHistogram("loraserve_request_duration_seconds",
                                       "From the request's arrival to its last byte", {"adapter"},
                                       prometheus::ExponentialBuckets(0.01, 2, 15))),
      up_(registry_.AddGauge("loraserve_up",
                             "1 when the inference server answered this scrape's Stats call", {})),
      running_(registry_.AddGauge("loraserve_requests_running", "Requests decoding now", {})),
      waiting_(registry_.AddGauge("loraserve_requests_waiting",
                                  "Requests queued for admission or waiting in the engine", {})),
      kv_blocks_used_(registry_.AddGauge("loraserve_kv_blocks_used", "KV cache blocks in use", {})),
      // Not "_total": promtool's lint reserves that suffix for counters.
      kv_blocks_total_(
          registry_.AddGauge("loraserve_kv_blocks_capacity", "KV cache blocks in the pool", {})),
      adapters_registered_(registry_.AddGauge("loraserve_adapters_registered",
                                              "Adapter ids known to the server", {})),
      adapter_resident_(registry_.AddGauge(
          "loraserve_adapter_resident",
          "Adapters resident in a tier (1 each; the \"other\" label counts adapters past the "
          "label limit)",
          {"adapter", "tier"})),
      memory_(
          registry_.AddGauge("loraserve_memory_bytes", "Bytes held now, by memory pool", {"pool"})),
      memory_budget_(registry_.AddGauge("loraserve_memory_budget_bytes",
                                        "Byte budget of each memory pool (0: unlimited)",
                                        {"pool"})),
      adapter_loads_(registry_.AddCounter(
          "loraserve_adapter_loads_total",
          "Adapter loads into a tier (host: from disk; device: uploads from host)", {"tier"})),
      adapter_evictions_(registry_.AddCounter("loraserve_adapter_evictions_total",
                                              "Adapters evicted from a tier for room", {"tier"})),
      adapter_load_seconds_(registry_.AddHistogram("loraserve_adapter_load_seconds",
                                                   "Duration of adapter loads into a tier",
                                                   {"tier"}, LatencyBucketsSeconds())),
      merges_(registry_.AddCounter("loraserve_merges_total",
                                   "Merged weight sets built (an adapter folded into the base)",
                                   {})),
      merged_steps_(registry_.AddCounter("loraserve_merged_steps_total",
                                         "Engine steps that ran on merged weights", {})),
      graph_steps_(registry_.AddCounter("loraserve_graph_steps_total",
                                        "Decode steps launched as a recorded CUDA graph", {})),
      graph_fallbacks_(registry_.AddCounter(
          "loraserve_graph_fallbacks_total",
          "Decode steps a recorded CUDA graph could not take (run operation by operation)", {})),
      preemptions_(registry_.AddCounter("loraserve_preemptions_total",
                                        "Requests preempted for KV blocks (recomputed later)", {})),
      prefix_cached_tokens_(
          registry_.AddCounter("loraserve_prefix_cached_tokens_total",
                               "Prompt tokens whose KV came from the prefix cache", {})) {}

std::string GatewayMetrics::AdapterLabel(const std::optional<std::string>& adapter) {
  if (!adapter) return kUnresolved;
  if (adapter->empty()) return kBase;
  std::lock_guard<std::mutex> lock(mu_);
  return label_limiter_.Bound(DisplayAdapterId(*adapter));
}

void GatewayMetrics::RecordRequest(const RequestRecord& record) {
  const std::string adapter = AdapterLabel(record.adapter);
  requests_.Add({adapter, record.tenant, absl::StrCat(record.http_status)});
  prompt_tokens_.Add({adapter, record.tenant}, static_cast<double>(record.prompt_tokens));
  generation_tokens_.Add({adapter, record.tenant}, static_cast<double>(record.generation_tokens));
  if (record.ttft_seconds) ttft_.Observe({adapter}, *record.ttft_seconds);
  if (record.tpot_seconds) tpot_.Observe({adapter}, *record.tpot_seconds);
  duration_.Observe({adapter}, record.duration_seconds);
}

void GatewayMetrics::Mirror(const v1::StatsResponse& stats,
                            const v1::ListAdaptersResponse& adapters) {
  running_.Set({}, static_cast<double>(stats.running()));
  waiting_.Set({}, static_cast<double>(stats.waiting()));
  kv_blocks_used_.Set({}, static_cast<double>(stats.kv_blocks_used()));
  kv_blocks_total_.Set({}, static_cast<double>(stats.kv_blocks_total()));
  adapters_registered_.Set({}, static_cast<double>(stats.host_adapters_registered()));

  // Residency per adapter label; a device copy is keyed by content hash, so
  // every id with that hash counts as resident there.
  const std::set<std::string> device_hashes(stats.device_resident_hashes().begin(),
                                            stats.device_resident_hashes().end());
  std::map<std::pair<std::string, std::string>, double> resident;
  for (const v1::AdapterInfo& info : adapters.adapters()) {
    const std::string label = AdapterLabel(info.id());
    resident[{label, "host"}] += info.resident_host() ? 1 : 0;
    resident[{label, "device"}] += device_hashes.count(info.content_hash()) > 0 ? 1 : 0;
  }
  adapter_resident_.Clear();  // unloaded adapters disappear
  for (const auto& [labels, count] : resident) {
    adapter_resident_.Set({labels.first, labels.second}, count);
  }

  const v1::ServerInfo& server = stats.server();
  memory_.Set({"weights"}, static_cast<double>(server.weight_bytes()));
  memory_.Set({"kv_cache"}, stats.kv_blocks_total() > 0
                                ? static_cast<double>(stats.kv_cache_bytes()) *
                                      stats.kv_blocks_used() / stats.kv_blocks_total()
                                : 0);
  memory_.Set({"adapters_host"}, static_cast<double>(stats.host_adapter_bytes()));
  memory_.Set({"adapters_device"}, static_cast<double>(stats.device_adapter_bytes()));
  memory_.Set({"merged_weights"}, static_cast<double>(stats.merged_bytes()));
  memory_budget_.Set({"weights"}, static_cast<double>(server.weight_bytes()));
  memory_budget_.Set({"kv_cache"}, static_cast<double>(stats.kv_cache_bytes()));
  memory_budget_.Set({"adapters_host"}, static_cast<double>(stats.host_adapter_budget_bytes()));
  memory_budget_.Set({"adapters_device"}, static_cast<double>(stats.device_adapter_budget_bytes()));
  memory_budget_.Set({"merged_weights"}, static_cast<double>(stats.merged_cache_budget_bytes()));

  adapter_loads_.Set({"host"}, static_cast<double>(stats.host_adapter_loads()));
  adapter_loads_.Set({"device"}, static_cast<double>(stats.device_adapter_uploads()));
  adapter_evictions_.Set({"host"}, static_cast<double>(stats.host_adapter_evictions()));
  adapter_evictions_.Set({"device"}, static_cast<double>(stats.device_adapter_evictions()));
  for (const auto& [tier, histogram] :
       {std::pair<const char*, const v1::Histogram*>{"host", &stats.host_load_seconds()},
        {"device", &stats.device_upload_seconds()}}) {
    // A server built with other bounds cannot be mirrored into these.
    if (histogram->counts_size() == static_cast<int>(LatencyBucketsSeconds().size()) + 1) {
      adapter_load_seconds_.Set({tier}, Counts(*histogram), histogram->sum());
    }
  }
  merges_.Set({}, static_cast<double>(stats.merges()));
  merged_steps_.Set({}, static_cast<double>(stats.merged_steps()));
  graph_steps_.Set({}, static_cast<double>(stats.graph_steps()));
  graph_fallbacks_.Set({}, static_cast<double>(stats.graph_fallbacks()));
  preemptions_.Set({}, static_cast<double>(stats.preemptions()));
  prefix_cached_tokens_.Set({}, static_cast<double>(stats.prefix_cached_tokens()));
}

std::string GatewayMetrics::Render(const v1::StatsResponse* stats,
                                   const v1::ListAdaptersResponse* adapters) {
  std::lock_guard<std::mutex> lock(render_mu_);
  up_.Set({}, stats != nullptr && adapters != nullptr ? 1 : 0);
  if (stats != nullptr && adapters != nullptr) Mirror(*stats, *adapters);
  return registry_.Render();
}

}  // namespace loraserve::api
