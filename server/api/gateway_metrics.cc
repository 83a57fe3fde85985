#include "server/api/gateway_metrics.h"

#include <prometheus/text_serializer.h>

#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "base/bucket_counts.h"
#include "server/api/openai_protocol.h"

namespace loraserve::api {
namespace {

constexpr char kBase[] = "base";
constexpr char kUnresolved[] = "none";  // the request failed before its model was known

// `count` upper bounds start, start·factor, start·factor², ...
prometheus::Histogram::BucketBoundaries ExponentialBuckets(double start, double factor, int count) {
  prometheus::Histogram::BucketBoundaries bounds;
  for (double bound = start; static_cast<int>(bounds.size()) < count; bound *= factor) {
    bounds.push_back(bound);
  }
  return bounds;
}

// The request histograms' bounds, made once rather than at every request.
const prometheus::Histogram::BucketBoundaries& TtftBuckets() {
  static const prometheus::Histogram::BucketBoundaries bounds = ExponentialBuckets(0.005, 2, 15);
  return bounds;
}
const prometheus::Histogram::BucketBoundaries& TpotBuckets() {
  static const prometheus::Histogram::BucketBoundaries bounds = ExponentialBuckets(0.001, 2, 14);
  return bounds;
}
const prometheus::Histogram::BucketBoundaries& DurationBuckets() {
  static const prometheus::Histogram::BucketBoundaries bounds = ExponentialBuckets(0.01, 2, 15);
  return bounds;
}

// The share of KV cache blocks in use, 0 to 1 (0 without a pool).
double KvUsage(const v1::StatsResponse& stats) {
  return stats.kv_blocks_total() > 0 ? static_cast<double>(stats.kv_blocks_used()) /
                                           static_cast<double>(stats.kv_blocks_total())
                                     : 0.0;
}

prometheus::Family<prometheus::Counter>& Counter(prometheus::Registry& registry,
                                                 const std::string& name, const std::string& help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(registry);
}

prometheus::Family<prometheus::Gauge>& Gauge(prometheus::Registry& registry,
                                             const std::string& name, const std::string& help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(registry);
}

prometheus::Family<prometheus::Histogram>& Histogram(prometheus::Registry& registry,
                                                     const std::string& name,
                                                     const std::string& help) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(registry);
}

// A counter that mirrors a total the server keeps. A smaller total means the
// server restarted behind a standalone gateway: the series starts again, as
// a Prometheus counter reset.
void MirrorCounter(prometheus::Family<prometheus::Counter>& family,
                   const prometheus::Labels& labels, double total) {
  prometheus::Counter* counter = &family.Add(labels);
  if (total < counter->Value()) {
    family.Remove(counter);
    counter = &family.Add(labels);
  }
  counter->Increment(total - counter->Value());
}

// A histogram that mirrors one the server keeps (base/bucket_counts.h: counts
// per bucket, then the overflow), replaced whole.
void MirrorHistogram(prometheus::Family<prometheus::Histogram>& family,
                     const prometheus::Labels& labels, const v1::Histogram& histogram) {
  const std::vector<double>& bounds = LatencyBucketsSeconds();
  // A server built with other bounds cannot be mirrored into these.
  if (histogram.counts_size() != static_cast<int>(bounds.size()) + 1) return;
  family.Remove(&family.Add(labels, bounds));
  family.Add(labels, bounds)
      .ObserveMultiple({histogram.counts().begin(), histogram.counts().end()}, histogram.sum());
}

// The gauge series of `family` with `labels`, replacing `*series` (the one
// set before, or null).
prometheus::Gauge& ReplaceSeries(prometheus::Family<prometheus::Gauge>& family,
                                 const prometheus::Labels& labels, prometheus::Gauge** series) {
  if (*series != nullptr) family.Remove(*series);
  *series = &family.Add(labels);
  return **series;
}

// Adapter ids as clients name them (the `model` of their requests), comma
// separated as vLLM writes them.
std::string AdapterList(const google::protobuf::RepeatedPtrField<std::string>& ids) {
  std::vector<std::string> shown;
  for (const std::string& id : ids) shown.push_back(DisplayAdapterId(id));
  return absl::StrJoin(shown, ",");
}

}  // namespace

GatewayMetrics::GatewayMetrics(GatewayMetricsOptions options)
    : label_limiter_(options.max_adapter_labels),
      requests_(Counter(registry_, "loraserve_requests_total",
                        "HTTP inference requests by adapter, tenant and HTTP status")),
      prompt_tokens_(Counter(registry_, "loraserve_prompt_tokens_total",
                             "Prompt tokens of finished requests")),
      generation_tokens_(Counter(registry_, "loraserve_generation_tokens_total",
                                 "Generated tokens of finished requests")),
      ttft_(Histogram(registry_, "loraserve_time_to_first_token_seconds",
                      "From the request's arrival to its first token")),
      tpot_(Histogram(registry_, "loraserve_time_per_output_token_seconds",
                      "Mean time between a request's tokens after the first")),
      duration_(Histogram(registry_, "loraserve_request_duration_seconds",
                          "From the request's arrival to its last byte")),
      up_(Gauge(registry_, "loraserve_up",
                "1 when the inference server answered this scrape's Stats call")),
      running_(Gauge(registry_, "loraserve_requests_running", "Requests decoding now")),
      waiting_(Gauge(registry_, "loraserve_requests_waiting",
                     "Requests queued for admission or waiting in the engine")),
      kv_blocks_used_(Gauge(registry_, "loraserve_kv_blocks_used", "KV cache blocks in use")),
      // Not "_total": promtool's lint reserves that suffix for counters.
      kv_blocks_total_(
          Gauge(registry_, "loraserve_kv_blocks_capacity", "KV cache blocks in the pool")),
      adapters_registered_(
          Gauge(registry_, "loraserve_adapters_registered", "Adapter ids known to the server")),
      adapter_resident_(Gauge(registry_, "loraserve_adapter_resident",
                              "Adapters resident in a tier (1 each; the \"other\" label counts "
                              "adapters past the label limit)")),
      memory_(Gauge(registry_, "loraserve_memory_bytes", "Bytes held now, by memory pool")),
      memory_budget_(Gauge(registry_, "loraserve_memory_budget_bytes",
                           "Byte budget of each memory pool (0: unlimited)")),
      adapter_loads_(
          Counter(registry_, "loraserve_adapter_loads_total",
                  "Adapter loads into a tier (host: from disk; device: uploads from host)")),
      adapter_evictions_(Counter(registry_, "loraserve_adapter_evictions_total",
                                 "Adapters evicted from a tier for room")),
      adapter_load_seconds_(Histogram(registry_, "loraserve_adapter_load_seconds",
                                      "Duration of adapter loads into a tier")),
      merges_(Counter(registry_, "loraserve_merges_total",
                      "Merged weight sets built (an adapter folded into the base)")),
      merge_failures_(Counter(registry_, "loraserve_merge_failures_total",
                              "Merges that failed (no memory for the set): the unmerged path "
                              "served those steps")),
      merged_steps_(Counter(registry_, "loraserve_merged_steps_total",
                            "Engine steps that ran on merged weights")),
      graph_steps_(Counter(registry_, "loraserve_graph_steps_total",
                           "Decode steps launched as a recorded CUDA graph")),
      graph_fallbacks_(Counter(
          registry_, "loraserve_graph_fallbacks_total",
          "Decode steps a recorded CUDA graph could not take (run operation by operation)")),
      preemptions_(Counter(registry_, "loraserve_preemptions_total",
                           "Requests preempted for KV blocks (recomputed later)")),
      prefix_cached_tokens_(Counter(registry_, "loraserve_prefix_cached_tokens_total",
                                    "Prompt tokens whose KV came from the prefix cache")),
      protocol_waiting_(Gauge(registry_, "vllm:num_requests_waiting",
                              "Inference gateway protocol: requests waiting "
                              "(loraserve_requests_waiting)")),
      protocol_running_(Gauge(registry_, "vllm:num_requests_running",
                              "Inference gateway protocol: requests running "
                              "(loraserve_requests_running)")),
      protocol_kv_usage_(Gauge(registry_, "vllm:kv_cache_usage_perc",
                               "Inference gateway protocol: fraction of KV cache blocks in use "
                               "(0 to 1)")),
      protocol_gpu_cache_usage_(Gauge(registry_, "vllm:gpu_cache_usage_perc",
                                      "The same fraction under vLLM's older name")),
      protocol_lora_info_(Gauge(registry_, "vllm:lora_requests_info",
                                "Inference gateway protocol: adapters of running and waiting "
                                "requests and the most one batch can hold; the value is the "
                                "Unix time of the snapshot")),
      protocol_cache_config_(Gauge(registry_, "vllm:cache_config_info",
                                   "Inference gateway protocol: KV cache block size in tokens "
                                   "and blocks in the pool")) {
  // Series without labels exist from the start, at zero.
  for (GaugeFamily* family :
       {&up_, &running_, &waiting_, &kv_blocks_used_, &kv_blocks_total_, &adapters_registered_,
        &protocol_waiting_, &protocol_running_, &protocol_kv_usage_, &protocol_gpu_cache_usage_}) {
    family->Add({});
  }
  for (CounterFamily* family : {&merges_, &merge_failures_, &merged_steps_, &graph_steps_, &graph_fallbacks_,
                                &preemptions_, &prefix_cached_tokens_}) {
    family->Add({});
  }
}

std::string GatewayMetrics::AdapterLabel(const std::optional<std::string>& adapter) {
  if (!adapter) return kUnresolved;
  if (adapter->empty()) return kBase;
  return label_limiter_.Bound(DisplayAdapterId(*adapter));
}

void GatewayMetrics::RecordRequest(const RequestRecord& record) {
  const std::string adapter = AdapterLabel(record.adapter);
  requests_
      .Add({{"adapter", adapter},
            {"tenant", record.tenant},
            {"status", absl::StrCat(record.http_status)}})
      .Increment();
  const prometheus::Labels by_tenant = {{"adapter", adapter}, {"tenant", record.tenant}};
  prompt_tokens_.Add(by_tenant).Increment(static_cast<double>(record.prompt_tokens));
  generation_tokens_.Add(by_tenant).Increment(static_cast<double>(record.generation_tokens));
  const prometheus::Labels by_adapter = {{"adapter", adapter}};
  if (record.ttft_seconds) {
    ttft_.Add(by_adapter, TtftBuckets()).Observe(*record.ttft_seconds);
  }
  if (record.tpot_seconds) {
    tpot_.Add(by_adapter, TpotBuckets()).Observe(*record.tpot_seconds);
  }
  duration_.Add(by_adapter, DurationBuckets()).Observe(record.duration_seconds);
}

void GatewayMetrics::Mirror(const v1::StatsResponse& stats,
                            const v1::ListAdaptersResponse& adapters) {
  running_.Add({}).Set(static_cast<double>(stats.running()));
  waiting_.Add({}).Set(static_cast<double>(stats.waiting()));
  kv_blocks_used_.Add({}).Set(static_cast<double>(stats.kv_blocks_used()));
  kv_blocks_total_.Add({}).Set(static_cast<double>(stats.kv_blocks_total()));
  adapters_registered_.Add({}).Set(static_cast<double>(stats.host_adapters_registered()));

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
  for (prometheus::Gauge* series : resident_series_) adapter_resident_.Remove(series);
  resident_series_.clear();
  for (const auto& [labels, count] : resident) {
    prometheus::Gauge& series =
        adapter_resident_.Add({{"adapter", labels.first}, {"tier", labels.second}});
    series.Set(count);
    resident_series_.push_back(&series);
  }

  const v1::ServerInfo& server = stats.server();
  const auto set_pool = [this](const char* pool, double bytes, int64_t budget) {
    memory_.Add({{"pool", pool}}).Set(bytes);
    memory_budget_.Add({{"pool", pool}}).Set(static_cast<double>(budget));
  };
  set_pool("weights", static_cast<double>(server.weight_bytes()), server.weight_bytes());
  set_pool("kv_cache", static_cast<double>(stats.kv_cache_bytes()) * KvUsage(stats),
           stats.kv_cache_bytes());
  set_pool("adapters_host", static_cast<double>(stats.host_adapter_bytes()),
           stats.host_adapter_budget_bytes());
  set_pool("adapters_device", static_cast<double>(stats.device_adapter_bytes()),
           stats.device_adapter_budget_bytes());
  set_pool("merged_weights", static_cast<double>(stats.merged_bytes()),
           stats.merged_cache_budget_bytes());

  for (const auto& [tier, loads, evictions, seconds] :
       {std::tuple<const char*, int64_t, int64_t, const v1::Histogram*>{
            "host", stats.host_adapter_loads(), stats.host_adapter_evictions(),
            &stats.host_load_seconds()},
        {"device", stats.device_adapter_uploads(), stats.device_adapter_evictions(),
         &stats.device_upload_seconds()}}) {
    MirrorCounter(adapter_loads_, {{"tier", tier}}, static_cast<double>(loads));
    MirrorCounter(adapter_evictions_, {{"tier", tier}}, static_cast<double>(evictions));
    MirrorHistogram(adapter_load_seconds_, {{"tier", tier}}, *seconds);
  }
  MirrorCounter(merges_, {}, static_cast<double>(stats.merges()));
  MirrorCounter(merge_failures_, {}, static_cast<double>(stats.merge_failures()));
  MirrorCounter(merged_steps_, {}, static_cast<double>(stats.merged_steps()));
  MirrorCounter(graph_steps_, {}, static_cast<double>(stats.graph_steps()));
  MirrorCounter(graph_fallbacks_, {}, static_cast<double>(stats.graph_fallbacks()));
  MirrorCounter(preemptions_, {}, static_cast<double>(stats.preemptions()));
  MirrorCounter(prefix_cached_tokens_, {}, static_cast<double>(stats.prefix_cached_tokens()));
  MirrorProtocol(stats);
}

void GatewayMetrics::MirrorProtocol(const v1::StatsResponse& stats) {
  protocol_waiting_.Add({}).Set(static_cast<double>(stats.waiting()));
  protocol_running_.Add({}).Set(static_cast<double>(stats.running()));
  const double kv_usage = KvUsage(stats);
  protocol_kv_usage_.Add({}).Set(kv_usage);
  protocol_gpu_cache_usage_.Add({}).Set(kv_usage);
  ReplaceSeries(protocol_lora_info_,
                {{"running_lora_adapters", AdapterList(stats.running_adapters())},
                 {"waiting_lora_adapters", AdapterList(stats.waiting_adapters())},
                 {"max_lora", absl::StrCat(stats.max_adapters())}},
                &lora_info_series_)
      .Set(absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()));
  ReplaceSeries(protocol_cache_config_,
                {{"block_size", absl::StrCat(stats.server().kv_block_tokens())},
                 {"num_gpu_blocks", absl::StrCat(stats.kv_blocks_total())}},
                &cache_config_series_)
      .Set(1);
}

std::string GatewayMetrics::Render(const v1::StatsResponse* stats,
                                   const v1::ListAdaptersResponse* adapters) {
  std::lock_guard<std::mutex> lock(render_mu_);
  const bool answered = stats != nullptr && adapters != nullptr;
  up_.Add({}).Set(answered ? 1 : 0);
  if (answered) Mirror(*stats, *adapters);
  return prometheus::TextSerializer().Serialize(registry_.Collect());
}

}  // namespace loraserve::api
