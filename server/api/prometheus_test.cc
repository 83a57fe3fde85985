#include "server/api/prometheus.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace loraserve::api::prometheus {
namespace {

using ::testing::HasSubstr;

TEST(PrometheusTest, CounterRendersHelpTypeAndSamples) {
  Registry registry;
  CounterFamily& requests =
      registry.AddCounter("requests_total", "Requests by RPC.", {"rpc", "code"});
  requests.Add({"Generate", "OK"});
  requests.Add({"Generate", "OK"}, 2);
  requests.Add({"Stats", "OK"}, 0.5);
  EXPECT_EQ(registry.Render(),
            "# HELP requests_total Requests by RPC.\n"
            "# TYPE requests_total counter\n"
            "requests_total{rpc=\"Generate\",code=\"OK\"} 3\n"
            "requests_total{rpc=\"Stats\",code=\"OK\"} 0.5\n");
}

TEST(PrometheusTest, CounterSetMirrorsATotal) {
  Registry registry;
  CounterFamily& steps = registry.AddCounter("steps_total", "Engine steps.", {});
  steps.Set({}, 41);
  steps.Set({}, 42);
  EXPECT_THAT(registry.Render(), HasSubstr("\nsteps_total 42\n"));
}

TEST(PrometheusTest, UnlabeledFamiliesStartAtZero) {
  Registry registry;
  registry.AddCounter("a_total", "A.", {});
  registry.AddGauge("b", "B.", {});
  registry.AddHistogram("c_seconds", "C.", {}, {1});
  EXPECT_EQ(registry.Render(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n"
            "# HELP b B.\n# TYPE b gauge\nb 0\n"
            "# HELP c_seconds C.\n# TYPE c_seconds histogram\n"
            "c_seconds_bucket{le=\"1\"} 0\nc_seconds_bucket{le=\"+Inf\"} 0\n"
            "c_seconds_sum 0\nc_seconds_count 0\n");
}

TEST(PrometheusTest, LabeledFamilyWithoutSamplesPrintsHelpAndType) {
  Registry registry;
  registry.AddGauge("adapter_bytes", "Bytes per adapter.", {"adapter"});
  EXPECT_EQ(registry.Render(),
            "# HELP adapter_bytes Bytes per adapter.\n"
            "# TYPE adapter_bytes gauge\n");
}

TEST(PrometheusTest, GaugeSetAddAndClear) {
  Registry registry;
  GaugeFamily& bytes = registry.AddGauge("kv_bytes", "KV bytes.", {"tier"});
  bytes.Set({"device"}, 1000000);
  bytes.Add({"device"}, -1);
  bytes.Add({"host"}, 2.25);
  EXPECT_THAT(registry.Render(), HasSubstr("kv_bytes{tier=\"device\"} 999999\n"
                                           "kv_bytes{tier=\"host\"} 2.25\n"));
  bytes.Clear();
  bytes.Set({"host"}, 1);
  EXPECT_EQ(registry.Render(),
            "# HELP kv_bytes KV bytes.\n# TYPE kv_bytes gauge\nkv_bytes{tier=\"host\"} 1\n");
}

TEST(PrometheusTest, ValuesFormatting) {
  Registry registry;
  GaugeFamily& gauge = registry.AddGauge("g", "G.", {"v"});
  gauge.Set({"big_integer"}, 1e15);
  gauge.Set({"negative"}, -3);
  gauge.Set({"tenth"}, 0.1);
  gauge.Set({"third"}, 1.0 / 3);
  gauge.Set({"tiny"}, 1e-300);
  gauge.Set({"huge"}, 1e300);
  gauge.Set({"pinf"}, std::numeric_limits<double>::infinity());
  gauge.Set({"ninf"}, -std::numeric_limits<double>::infinity());
  gauge.Set({"nan"}, std::nan(""));
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("g{v=\"big_integer\"} 1000000000000000\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"negative\"} -3\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"tenth\"} 0.1\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"third\"} 0.3333333333333333\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"tiny\"} 1e-300\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"huge\"} 1e+300\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"pinf\"} +Inf\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"ninf\"} -Inf\n"));
  EXPECT_THAT(text, HasSubstr("g{v=\"nan\"} NaN\n"));
}

TEST(PrometheusTest, EscapesLabelValuesAndHelp) {
  Registry registry;
  GaugeFamily& gauge =
      registry.AddGauge("escaped", "Backslash \\ and\nnewline; \"quotes\" stay.", {"path"});
  gauge.Set({"a\\b\"c\"\nd"}, 1);
  EXPECT_EQ(registry.Render(),
            "# HELP escaped Backslash \\\\ and\\nnewline; \"quotes\" stay.\n"
            "# TYPE escaped gauge\n"
            "escaped{path=\"a\\\\b\\\"c\\\"\\nd\"} 1\n");
}

TEST(PrometheusTest, LabelSetsAreSortedAndFamiliesKeepTheirOrder) {
  Registry registry;
  GaugeFamily& second = registry.AddGauge("z_first_added", "Z.", {"k"});
  CounterFamily& first = registry.AddCounter("a_second_added_total", "A.", {"x", "y"});
  second.Set({"b"}, 2);
  second.Set({"a"}, 1);
  second.Set({"c"}, 3);
  first.Add({"2", "a"});
  first.Add({"1", "b"});
  first.Add({"1", "a"});
  EXPECT_EQ(registry.Render(),
            "# HELP z_first_added Z.\n# TYPE z_first_added gauge\n"
            "z_first_added{k=\"a\"} 1\nz_first_added{k=\"b\"} 2\nz_first_added{k=\"c\"} 3\n"
            "# HELP a_second_added_total A.\n# TYPE a_second_added_total counter\n"
            "a_second_added_total{x=\"1\",y=\"a\"} 1\n"
            "a_second_added_total{x=\"1\",y=\"b\"} 1\n"
            "a_second_added_total{x=\"2\",y=\"a\"} 1\n");
}

TEST(PrometheusTest, HistogramObserveIsCumulative) {
  Registry registry;
  HistogramFamily& latency =
      registry.AddHistogram("latency_seconds", "Latency.", {"rpc"}, {0.1, 1, 2.5});
  latency.Observe({"Generate"}, 0.05);
  latency.Observe({"Generate"}, 0.1);  // on a bound: le is inclusive
  latency.Observe({"Generate"}, 2);
  latency.Observe({"Generate"}, 7);
  EXPECT_EQ(registry.Render(),
            "# HELP latency_seconds Latency.\n# TYPE latency_seconds histogram\n"
            "latency_seconds_bucket{rpc=\"Generate\",le=\"0.1\"} 2\n"
            "latency_seconds_bucket{rpc=\"Generate\",le=\"1\"} 2\n"
            "latency_seconds_bucket{rpc=\"Generate\",le=\"2.5\"} 3\n"
            "latency_seconds_bucket{rpc=\"Generate\",le=\"+Inf\"} 4\n"
            "latency_seconds_sum{rpc=\"Generate\"} 9.15\n"
            "latency_seconds_count{rpc=\"Generate\"} 4\n");
}

TEST(PrometheusTest, HistogramNanCountsOnlyInInf) {
  Registry registry;
  HistogramFamily& h = registry.AddHistogram("h", "H.", {}, {1});
  h.Observe({}, std::nan(""));
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr("h_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("h_sum NaN\nh_count 1\n"));
}

TEST(PrometheusTest, HistogramSetMirrorsPerBucketCounts) {
  Registry registry;
  HistogramFamily& loads = registry.AddHistogram("loads_seconds", "Loads.", {}, {0.5, 1});
  loads.Observe({}, 0.2);  // replaced wholesale by Set
  loads.Set({}, {3, 0, 2}, 12.5);
  EXPECT_EQ(registry.Render(),
            "# HELP loads_seconds Loads.\n# TYPE loads_seconds histogram\n"
            "loads_seconds_bucket{le=\"0.5\"} 3\n"
            "loads_seconds_bucket{le=\"1\"} 3\n"
            "loads_seconds_bucket{le=\"+Inf\"} 5\n"
            "loads_seconds_sum 12.5\n"
            "loads_seconds_count 5\n");
  loads.Set({}, {1, 2}, 1);      // one count short
  loads.Set({}, {1, -2, 0}, 1);  // negative
  EXPECT_EQ(registry.dropped_updates(), 2);
  EXPECT_THAT(registry.Render(), HasSubstr("loads_seconds_count 5\n"));
}

TEST(PrometheusTest, MismatchedLabelCountsAreDroppedNotFatal) {
  Registry registry;
  CounterFamily& counter = registry.AddCounter("c_total", "C.", {"a"});
  GaugeFamily& gauge = registry.AddGauge("g", "G.", {"a", "b"});
  HistogramFamily& histogram = registry.AddHistogram("h", "H.", {}, {1});
  counter.Add({});
  counter.Set({"x", "y"}, 1);
  counter.Add({"x"}, -1);  // counters only go up
  gauge.Set({"x"}, 1);
  gauge.Add({"x", "y", "z"}, 1);
  histogram.Observe({"x"}, 1);
  histogram.Set({"x"}, {0, 0}, 0);
  EXPECT_EQ(registry.dropped_updates(), 7);
  EXPECT_EQ(registry.Render(),
            "# HELP c_total C.\n# TYPE c_total counter\n"
            "# HELP g G.\n# TYPE g gauge\n"
            "# HELP h H.\n# TYPE h histogram\n"
            "h_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n");
}

TEST(PrometheusTest, InvalidFamiliesAbortWithAMessage) {
  Registry registry;
  registry.AddGauge("taken", "T.", {});
  EXPECT_DEATH(registry.AddCounter("requests", "R.", {}), "must end in \"_total\"");
  EXPECT_DEATH(registry.AddGauge("1abc", "R.", {}), "invalid metric name \"1abc\"");
  EXPECT_DEATH(registry.AddGauge("a-b", "R.", {}), "invalid metric name");
  EXPECT_DEATH(registry.AddGauge("taken", "T.", {}), "added twice");
  EXPECT_DEATH(registry.AddGauge("g", "G.", {"__reserved"}), "invalid label name \"__reserved\"");
  EXPECT_DEATH(registry.AddGauge("g", "G.", {"a:b"}), "invalid label name");
  EXPECT_DEATH(registry.AddGauge("g", "G.", {"a", "a"}), "\"a\" repeats");
  EXPECT_DEATH(registry.AddHistogram("h", "H.", {"le"}, {1}), "\"le\" is reserved");
  EXPECT_DEATH(registry.AddHistogram("h", "H.", {}, {1, 1}), "strictly ascending");
  EXPECT_DEATH(registry.AddHistogram("h", "H.", {}, {1, std::numeric_limits<double>::infinity()}),
               "finite");
  EXPECT_DEATH(ExponentialBuckets(0, 2, 3), "start > 0");
  // Colons are fine in metric names, and "le" on a gauge.
  registry.AddGauge("ns:rate", "R.", {"le"});
}

TEST(PrometheusTest, LabelLimiterPassesTheFirstValues) {
  LabelLimiter limiter(2);
  EXPECT_EQ(limiter.Bound("tenant-a"), "tenant-a");
  EXPECT_EQ(limiter.Bound("tenant-b"), "tenant-b");
  EXPECT_EQ(limiter.Bound("tenant-c"), "other");
  EXPECT_EQ(limiter.Bound("tenant-a"), "tenant-a");
  EXPECT_EQ(limiter.Bound("tenant-d"), "other");
}

TEST(PrometheusTest, ExponentialBuckets) {
  EXPECT_THAT(ExponentialBuckets(0.001, 10, 4), ::testing::ElementsAre(0.001, 0.01, 0.1, 1.0));
  EXPECT_THAT(ExponentialBuckets(1, 2, 1), ::testing::ElementsAre(1.0));
}

TEST(PrometheusTest, ConcurrentUpdatesWhileRendering) {
  Registry registry;
  CounterFamily& counter = registry.AddCounter("ops_total", "Ops.", {"thread"});
  GaugeFamily& gauge = registry.AddGauge("level", "Level.", {});
  HistogramFamily& histogram = registry.AddHistogram("op_seconds", "Op time.", {}, {0.5});
  LabelLimiter limiter(2);
  constexpr int kThreads = 4;
  constexpr int kUpdates = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const std::string label = limiter.Bound(absl::StrCat("t", t));
      for (int i = 0; i < kUpdates; ++i) {
        counter.Add({label});
        gauge.Add({}, 1);
        histogram.Observe({}, i % 2 == 0 ? 0.25 : 1);
      }
    });
  }
  std::thread scraper([&] {
    for (int i = 0; i < 200; ++i) {
      EXPECT_THAT(registry.Render(), HasSubstr("# TYPE op_seconds histogram\n"));
    }
  });
  for (std::thread& thread : threads) thread.join();
  scraper.join();
  const std::string text = registry.Render();
  EXPECT_THAT(text, HasSubstr(absl::StrCat("ops_total{thread=\"other\"} ", 2 * kUpdates, "\n")));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("\nlevel ", kThreads * kUpdates, "\n")));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("op_seconds_bucket{le=\"0.5\"} ",
                                           kThreads * kUpdates / 2, "\n")));
  EXPECT_THAT(text, HasSubstr(absl::StrCat("op_seconds_count ", kThreads * kUpdates, "\n")));
  EXPECT_EQ(registry.dropped_updates(), 0);
}

// Prometheus' own parser and linter accept what we write.
TEST(PrometheusTest, PromtoolAcceptsTheOutput) {
  constexpr char kPromtool[] = "/usr/bin/promtool";
  if (access(kPromtool, X_OK) != 0) {
    GTEST_SKIP() << kPromtool << " is absent (Debian package `prometheus`)";
  }
  Registry registry;
  CounterFamily& requests = registry.AddCounter(
      "loraserve_requests_total", "Requests by RPC and status code.", {"rpc", "code"});
  GaugeFamily& bytes =
      registry.AddGauge("loraserve_kv_bytes", "KV cache bytes by state.", {"state"});
  HistogramFamily& latency =
      registry.AddHistogram("loraserve_request_duration_seconds", "Request latency.", {"rpc"},
                            ExponentialBuckets(0.001, 4, 6));
  registry.AddGauge("loraserve_adapters_resident", "Adapters on the device.", {"tenant"});
  requests.Add({"Generate", "OK"}, 3);
  requests.Add({"Generate", "RESOURCE_EXHAUSTED"});
  requests.Add({"Adapters.Upload", "a \"quoted\\odd\"\nvalue"});
  bytes.Set({"used"}, 1 << 20);
  bytes.Set({"free"}, 0.5);
  latency.Observe({"Generate"}, 0.003);
  latency.Observe({"Generate"}, 100);
  latency.Set({"Stats"}, {1, 0, 0, 0, 0, 0, 2}, 42.25);

  const std::string path = ::testing::TempDir() + "/prometheus_test_promtool.txt";
  const std::string command = absl::StrCat(kPromtool, " check metrics > '", path, "' 2>&1");
  FILE* pipe = popen(command.c_str(), "w");
  ASSERT_NE(pipe, nullptr);
  const std::string text = registry.Render();
  fwrite(text.data(), 1, text.size(), pipe);
  const int status = pclose(pipe);
  std::ifstream output_file(path);
  std::stringstream output;
  output << output_file.rdbuf();
  std::remove(path.c_str());
  ASSERT_TRUE(WIFEXITED(status)) << output.str();
  EXPECT_EQ(WEXITSTATUS(status), 0) << output.str() << "\n" << text;
  EXPECT_EQ(output.str(), "") << text;
}

}  // namespace
}  // namespace loraserve::api::prometheus
