#include "server/api/gateway_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/bucket_counts.h"

namespace loraserve::api {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

v1::AdapterInfo Adapter(const std::string& id, const std::string& hash, bool host) {
  v1::AdapterInfo info;
  info.set_id(id);
  info.set_content_hash(hash);
  info.set_resident_host(host);
  return info;
}

TEST(GatewayMetricsTest, RecordsRequestsByAdapterTenantAndStatus) {
  GatewayMetrics metrics({});
  metrics.RecordRequest({.adapter = "default/ocean",
                         .tenant = "alpha",
                         .http_status = 200,
                         .prompt_tokens = 5,
                         .generation_tokens = 7,
                         .ttft_seconds = 0.02,
                         .tpot_seconds = 0.004,
                         .duration_seconds = 0.05});
  metrics.RecordRequest({.adapter = "", .tenant = "beta", .http_status = 400});
  metrics.RecordRequest({.adapter = std::nullopt, .tenant = "beta", .http_status = 401});
  const std::string text = metrics.Render(nullptr, nullptr);
  EXPECT_THAT(
      text,
      HasSubstr(R"(loraserve_requests_total{adapter="ocean",status="200",tenant="alpha"} 1)"));
  EXPECT_THAT(
      text, HasSubstr(R"(loraserve_requests_total{adapter="base",status="400",tenant="beta"} 1)"));
  EXPECT_THAT(
      text, HasSubstr(R"(loraserve_requests_total{adapter="none",status="401",tenant="beta"} 1)"));
  EXPECT_THAT(text,
              HasSubstr(R"(loraserve_prompt_tokens_total{adapter="ocean",tenant="alpha"} 5)"));
  EXPECT_THAT(text,
              HasSubstr(R"(loraserve_generation_tokens_total{adapter="ocean",tenant="alpha"} 7)"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_time_to_first_token_seconds_count{adapter="ocean"} 1)"));
  EXPECT_THAT(text, HasSubstr("loraserve_up 0"));
}

TEST(GatewayMetricsTest, MirrorsTheServersStateAndDeviceResidencyByContentHash) {
  GatewayMetrics metrics({});
  v1::StatsResponse stats;
  stats.set_running(3);
  stats.set_kv_blocks_used(10);
  stats.set_kv_blocks_total(40);
  stats.set_kv_cache_bytes(4000);
  stats.add_device_resident_hashes("h1");
  stats.set_host_adapter_loads(4);
  stats.set_merges(2);
  stats.set_merge_failures(1);
  stats.set_graph_steps(7);
  stats.set_graph_fallbacks(1);
  BucketCounts loads;
  loads.Observe(0.003);
  stats.mutable_host_load_seconds()->mutable_upper_bounds()->Assign(loads.upper_bounds.begin(),
                                                                    loads.upper_bounds.end());
  stats.mutable_host_load_seconds()->mutable_counts()->Assign(loads.counts.begin(),
                                                              loads.counts.end());
  stats.mutable_host_load_seconds()->set_sum(loads.sum);
  stats.mutable_server()->set_weight_bytes(1000);
  v1::ListAdaptersResponse adapters;
  // Two ids with one content hash share one device copy: both count as resident.
  *adapters.add_adapters() = Adapter("default/ocean", "h1", true);
  *adapters.add_adapters() = Adapter("acme/ocean-copy", "h1", false);
  const std::string text = metrics.Render(&stats, &adapters);
  EXPECT_THAT(text, HasSubstr("loraserve_up 1"));
  EXPECT_THAT(text, HasSubstr("loraserve_requests_running 3"));
  EXPECT_THAT(text, HasSubstr("loraserve_kv_blocks_used 10"));
  EXPECT_THAT(text, HasSubstr("loraserve_kv_blocks_capacity 40"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_memory_bytes{pool="kv_cache"} 1000)"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_memory_bytes{pool="weights"} 1000)"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_adapter_resident{adapter="ocean",tier="device"} 1)"));
  EXPECT_THAT(
      text, HasSubstr(R"(loraserve_adapter_resident{adapter="acme/ocean-copy",tier="device"} 1)"));
  EXPECT_THAT(text,
              HasSubstr(R"(loraserve_adapter_resident{adapter="acme/ocean-copy",tier="host"} 0)"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_adapter_loads_total{tier="host"} 4)"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_adapter_load_seconds_count{tier="host"} 1)"));
  EXPECT_THAT(text, HasSubstr("loraserve_merges_total 2"));
  EXPECT_THAT(text, HasSubstr("loraserve_merge_failures_total 1"));
  EXPECT_THAT(text, HasSubstr("loraserve_graph_steps_total 7"));
  EXPECT_THAT(text, HasSubstr("loraserve_graph_fallbacks_total 1"));

  // An unloaded adapter disappears from the residency gauge at the next scrape.
  adapters.mutable_adapters()->RemoveLast();
  EXPECT_THAT(metrics.Render(&stats, &adapters), Not(HasSubstr("ocean-copy")));
}

TEST(GatewayMetricsTest, BoundsAdapterLabels) {
  GatewayMetrics metrics({.max_adapter_labels = 2});
  for (const char* id : {"t/a", "t/b", "t/c", "t/d"}) {
    metrics.RecordRequest({.adapter = id, .tenant = "t", .http_status = 200});
  }
  v1::StatsResponse stats;
  v1::ListAdaptersResponse adapters;
  for (const char* id : {"t/a", "t/b", "t/c", "t/d"}) {
    *adapters.add_adapters() = Adapter(id, id, true);
  }
  const std::string text = metrics.Render(&stats, &adapters);
  EXPECT_THAT(text,
              HasSubstr(R"(loraserve_requests_total{adapter="other",status="200",tenant="t"} 2)"));
  EXPECT_THAT(text, Not(HasSubstr(R"(adapter="t/c")")));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_adapter_resident{adapter="other",tier="host"} 2)"));
}

TEST(GatewayMetricsTest, ExposesEveryFamilyWithItsType) {
  GatewayMetrics metrics({});
  metrics.RecordRequest({.adapter = "default/ocean",
                         .tenant = "alpha",
                         .http_status = 200,
                         .prompt_tokens = 3,
                         .generation_tokens = 4,
                         .ttft_seconds = 0.01,
                         .tpot_seconds = 0.002,
                         .duration_seconds = 0.03});
  v1::StatsResponse stats;
  stats.set_kv_blocks_total(8);
  stats.mutable_host_load_seconds()->mutable_counts()->Resize(
      static_cast<int>(LatencyBucketsSeconds().size()) + 1, 0);
  *stats.mutable_device_upload_seconds() = stats.host_load_seconds();
  v1::ListAdaptersResponse adapters;
  *adapters.add_adapters() = Adapter("default/ocean", "h1", true);
  const std::string text = metrics.Render(&stats, &adapters);
  for (const auto& [name, type] : std::vector<std::pair<std::string, std::string>>{
           {"loraserve_requests_total", "counter"},
           {"loraserve_prompt_tokens_total", "counter"},
           {"loraserve_generation_tokens_total", "counter"},
           {"loraserve_time_to_first_token_seconds", "histogram"},
           {"loraserve_time_per_output_token_seconds", "histogram"},
           {"loraserve_request_duration_seconds", "histogram"},
           {"loraserve_up", "gauge"},
           {"loraserve_requests_running", "gauge"},
           {"loraserve_requests_waiting", "gauge"},
           {"loraserve_kv_blocks_used", "gauge"},
           {"loraserve_kv_blocks_capacity", "gauge"},
           {"loraserve_adapters_registered", "gauge"},
           {"loraserve_adapter_resident", "gauge"},
           {"loraserve_memory_bytes", "gauge"},
           {"loraserve_memory_budget_bytes", "gauge"},
           {"loraserve_adapter_loads_total", "counter"},
           {"loraserve_adapter_evictions_total", "counter"},
           {"loraserve_adapter_load_seconds", "histogram"},
           {"loraserve_merges_total", "counter"},
           {"loraserve_merge_failures_total", "counter"},
           {"loraserve_merged_steps_total", "counter"},
           {"loraserve_graph_steps_total", "counter"},
           {"loraserve_graph_fallbacks_total", "counter"},
           {"loraserve_preemptions_total", "counter"},
           {"loraserve_prefix_cached_tokens_total", "counter"},
           {"vllm:num_requests_waiting", "gauge"},
           {"vllm:num_requests_running", "gauge"},
           {"vllm:kv_cache_usage_perc", "gauge"},
           {"vllm:gpu_cache_usage_perc", "gauge"},
           {"vllm:lora_requests_info", "gauge"},
           {"vllm:cache_config_info", "gauge"},
       }) {
    EXPECT_THAT(text, HasSubstr(absl::StrCat("# TYPE ", name, " ", type, "\n"))) << name;
  }
  // Histograms: cumulative buckets ending in +Inf, a sum and a count.
  EXPECT_THAT(
      text,
      HasSubstr(R"(loraserve_time_to_first_token_seconds_bucket{adapter="ocean",le="0.01"} 1)"));
  EXPECT_THAT(
      text,
      HasSubstr(R"(loraserve_time_to_first_token_seconds_bucket{adapter="ocean",le="+Inf"} 1)"));
  EXPECT_THAT(text,
              HasSubstr(R"(loraserve_time_to_first_token_seconds_sum{adapter="ocean"} 0.01)"));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_adapter_load_seconds_count{tier="device"} 0)"));
}

TEST(GatewayMetricsTest, SpeaksTheInferenceGatewayProtocol) {
  GatewayMetrics metrics({});
  v1::StatsResponse stats;
  stats.set_running(3);
  stats.set_waiting(2);
  stats.set_kv_blocks_used(10);
  stats.set_kv_blocks_total(40);
  stats.mutable_server()->set_kv_block_tokens(16);
  stats.add_running_adapters("default/ocean");
  stats.add_running_adapters("acme/bot");
  stats.add_waiting_adapters("default/robot");
  stats.set_max_adapters(8);
  const v1::ListAdaptersResponse adapters;
  const double before = absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch());
  const std::string text = metrics.Render(&stats, &adapters);
  EXPECT_THAT(text, HasSubstr("\nvllm:num_requests_running 3\n"));
  EXPECT_THAT(text, HasSubstr("\nvllm:num_requests_waiting 2\n"));
  EXPECT_THAT(text, HasSubstr("\nvllm:kv_cache_usage_perc 0.25\n"));
  EXPECT_THAT(text, HasSubstr("\nvllm:gpu_cache_usage_perc 0.25\n"));
  EXPECT_THAT(text, HasSubstr(R"(vllm:cache_config_info{block_size="16",num_gpu_blocks="40"} 1)"));
  // Adapters by the names clients send; the value is the snapshot's time.
  const std::string prefix =
      R"(vllm:lora_requests_info{max_lora="8",running_lora_adapters="ocean,acme/bot",)"
      R"(waiting_lora_adapters="robot"} )";
  const size_t at = text.find(prefix);
  ASSERT_NE(at, std::string::npos) << text;
  const double stamp = std::stod(text.substr(at + prefix.size()));
  EXPECT_GE(stamp, before - 1);
  EXPECT_LE(stamp, before + 60);

  // One series: when the batch drains, the lists empty and the old ones go.
  stats.clear_running_adapters();
  stats.clear_waiting_adapters();
  const std::string drained = metrics.Render(&stats, &adapters);
  EXPECT_THAT(
      drained,
      HasSubstr(
          R"(vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""} )"));
  EXPECT_THAT(drained, Not(HasSubstr("ocean,acme/bot")));
}

TEST(GatewayMetricsTest, MirroredCountersFollowAServerRestart) {
  GatewayMetrics metrics({});
  v1::StatsResponse stats;
  const v1::ListAdaptersResponse adapters;
  stats.set_merges(5);
  EXPECT_THAT(metrics.Render(&stats, &adapters), HasSubstr("\nloraserve_merges_total 5\n"));
  stats.set_merges(7);
  EXPECT_THAT(metrics.Render(&stats, &adapters), HasSubstr("\nloraserve_merges_total 7\n"));
  // A restarted server counts from zero again: a counter reset, not a negative step.
  stats.set_merges(1);
  EXPECT_THAT(metrics.Render(&stats, &adapters), HasSubstr("\nloraserve_merges_total 1\n"));
  // Without an answer from the server the mirrored values stay.
  const std::string down = metrics.Render(nullptr, nullptr);
  EXPECT_THAT(down, HasSubstr("\nloraserve_up 0\n"));
  EXPECT_THAT(down, HasSubstr("\nloraserve_merges_total 1\n"));
}

TEST(GatewayMetricsTest, RecordsWhileAnotherThreadScrapes) {
  GatewayMetrics metrics({.max_adapter_labels = 2});
  constexpr int kThreads = 4;
  constexpr int kRequests = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kRequests; ++i) {
        metrics.RecordRequest({.adapter = absl::StrCat("t/a", t),
                               .tenant = "t",
                               .http_status = 200,
                               .duration_seconds = 0.01});
      }
    });
  }
  v1::StatsResponse stats;
  const v1::ListAdaptersResponse adapters;
  std::thread scraper([&] {
    for (int i = 0; i < 100; ++i) {
      EXPECT_THAT(metrics.Render(&stats, &adapters),
                  HasSubstr("# TYPE vllm:lora_requests_info gauge"));
    }
  });
  for (std::thread& thread : threads) thread.join();
  scraper.join();
  const std::string text = metrics.Render(&stats, &adapters);
  // Two adapters keep their label, two share "other": 4 · kRequests in all.
  EXPECT_THAT(text, HasSubstr(absl::StrCat(
                        R"(loraserve_requests_total{adapter="other",status="200",tenant="t"} )",
                        2 * kRequests, "\n")));
}

}  // namespace
}  // namespace loraserve::api
