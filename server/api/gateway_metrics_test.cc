#include "server/api/gateway_metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

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
      HasSubstr(R"(loraserve_requests_total{adapter="ocean",tenant="alpha",status="200"} 1)"));
  EXPECT_THAT(
      text, HasSubstr(R"(loraserve_requests_total{adapter="base",tenant="beta",status="400"} 1)"));
  EXPECT_THAT(
      text, HasSubstr(R"(loraserve_requests_total{adapter="none",tenant="beta",status="401"} 1)"));
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
              HasSubstr(R"(loraserve_requests_total{adapter="other",tenant="t",status="200"} 2)"));
  EXPECT_THAT(text, Not(HasSubstr(R"(adapter="t/c")")));
  EXPECT_THAT(text, HasSubstr(R"(loraserve_adapter_resident{adapter="other",tier="host"} 2)"));
}

}  // namespace
}  // namespace loraserve::api
