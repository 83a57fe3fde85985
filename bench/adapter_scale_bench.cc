// What registering many adapters costs: writes --adapters seeded random PEFT
// adapters (tiny by default: rank 2 on q_proj and v_proj of --preset's shapes)
// into --dir, registers them all as `loraserve serve --lazy-adapter-load`
// does (config and safetensors header only), and reports the start-up time,
// the resident memory each registered adapter adds, listing them in pages,
// and the first use of --first-uses of them (which reads their weights).
// The same --eager-sample adapters loaded with their weights give the
// per-adapter cost of an eager start-up beside it.
//
//   adapter_scale_bench --adapters 10000 --preset tiny
//   adapter_scale_bench --adapters 1000 --dir /tmp/adapters1k --keep   # for a server
//
// Prints one JSON object.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "adapters/adapter_sources.h"
#include "adapters/dummy_adapter.h"
#include "adapters/registry.h"
#include "base/status_macros.h"
#include "bench/bench_support.h"
#include "formats/model_config.h"

ABSL_FLAG(int32_t, adapters, 10000, "Adapters to write and register");
ABSL_FLAG(std::string, preset, "tiny", "Dummy preset whose shapes the adapters take");
ABSL_FLAG(int32_t, rank, 2, "Rank of every adapter");
ABSL_FLAG(std::vector<std::string>, modules, std::vector<std::string>({"q_proj", "v_proj"}),
          "Modules each adapter adapts");
ABSL_FLAG(std::string, dir, "", "Where to write them (default: a fresh temporary folder)");
ABSL_FLAG(bool, keep, false, "Keep --dir afterwards (to serve it)");
ABSL_FLAG(int32_t, first_uses, 100, "Adapters acquired after registration (weights read)");
ABSL_FLAG(int32_t, eager_sample, 200, "Adapters loaded with their weights, for comparison");

namespace loraserve {
namespace {

namespace fs = std::filesystem;

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// This process's resident set, in bytes.
int64_t RssBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

absl::StatusOr<std::unique_ptr<adapters::AdapterRegistry>> MakeRegistry(
    const adapters::BaseModelShape& shape) {
  return adapters::AdapterRegistry::Create(
      {.base = shape, .limits = {.max_rank = absl::GetFlag(FLAGS_rank)}});
}

absl::Status Run() {
  const int32_t count = absl::GetFlag(FLAGS_adapters);
  ASSIGN_OR_RETURN(formats::ModelConfig config, formats::DummyPreset(absl::GetFlag(FLAGS_preset)));
  const adapters::BaseModelShape shape = adapters::LlamaBaseShape(
      config.num_hidden_layers, config.hidden_size, config.intermediate_size,
      config.num_attention_heads, config.num_key_value_heads, config.head_dim);
  std::string root = absl::GetFlag(FLAGS_dir);
  if (root.empty()) {
    root = (fs::temp_directory_path() / absl::StrCat("loraserve_scale_", getpid())).string();
  }
  auto start = std::chrono::steady_clock::now();
  for (int32_t i = 0; i < count; ++i) {
    RETURN_IF_ERROR(adapters::WriteDummyAdapter(absl::StrFormat("%s/a%05d", root, i), shape,
                                                {.rank = absl::GetFlag(FLAGS_rank),
                                                 .alpha = 2.0 * absl::GetFlag(FLAGS_rank),
                                                 .target_modules = absl::GetFlag(FLAGS_modules),
                                                 .seed = static_cast<uint64_t>(i)}));
  }
  const double write_seconds = SecondsSince(start);

  ASSIGN_OR_RETURN(auto registry, MakeRegistry(shape));
  const int64_t rss_before = RssBytes();
  start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(adapters::LoadAdapterDir(*registry, root, adapters::StartupLoad::kLazy));
  const double register_seconds = SecondsSince(start);
  const int64_t rss_registered = RssBytes();
  const adapters::AdapterRegistryStats registered = registry->stats();

  start = std::chrono::steady_clock::now();
  int64_t listed = 0, pages = 0;
  for (std::string after;;) {
    const std::vector<adapters::AdapterInfo> page = registry->List(after, 100);
    if (page.empty()) break;
    listed += static_cast<int64_t>(page.size());
    ++pages;
    after = page.back().id;
  }
  const double list_seconds = SecondsSince(start);

  const int32_t first_uses = std::min(absl::GetFlag(FLAGS_first_uses), count);
  std::vector<double> first_use_ms;
  for (int32_t i = 0; i < first_uses; ++i) {
    start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(adapters::AdapterHandle handle,
                     registry->Acquire(absl::StrFormat("a%05d", i)));
    first_use_ms.push_back(SecondsSince(start) * 1e3);
  }
  const adapters::AdapterRegistryStats used = registry->stats();

  // The same adapters read eagerly, in a registry of their own.
  const int32_t sample = std::min(absl::GetFlag(FLAGS_eager_sample), count);
  ASSIGN_OR_RETURN(auto eager, MakeRegistry(shape));
  const int64_t rss_eager_before = RssBytes();
  start = std::chrono::steady_clock::now();
  for (int32_t i = 0; i < sample; ++i) {
    const std::string id = absl::StrFormat("a%05d", i);
    RETURN_IF_ERROR(eager->Load(id, absl::StrCat(root, "/", id)).status());
  }
  const double eager_seconds = SecondsSince(start);
  const int64_t rss_eager = RssBytes();

  if (!absl::GetFlag(FLAGS_keep)) fs::remove_all(root);
  std::printf(
      "{\"adapters\": %d, \"preset\": \"%s\", \"rank\": %d, \"write_s\": %.2f,\n"
      " \"lazy\": {\"register_s\": %.3f, \"per_adapter_us\": %.1f, \"registered\": %lld,"
      " \"resident\": %lld, \"host_bytes\": %zu, \"rss_per_adapter_bytes\": %.0f},\n"
      " \"list\": {\"pages_of_100\": %lld, \"listed\": %lld, \"total_ms\": %.2f},\n"
      " \"first_use\": {\"count\": %d, \"p50_ms\": %.3f, \"p99_ms\": %.3f,"
      " \"host_bytes_after\": %zu, \"weight_bytes_per_adapter\": %zu},\n"
      " \"eager\": {\"count\": %d, \"per_adapter_us\": %.1f, \"rss_per_adapter_bytes\": %.0f}}\n",
      count, absl::GetFlag(FLAGS_preset).c_str(), absl::GetFlag(FLAGS_rank), write_seconds,
      register_seconds, register_seconds * 1e6 / count,
      static_cast<long long>(registered.registered), static_cast<long long>(registered.resident),
      registered.host_bytes, static_cast<double>(rss_registered - rss_before) / count,
      static_cast<long long>(pages), static_cast<long long>(listed), list_seconds * 1e3, first_uses,
      bench::Percentile(first_use_ms, 0.5), bench::Percentile(first_use_ms, 0.99), used.host_bytes,
      first_uses > 0 ? used.host_bytes / first_uses : 0, sample,
      sample > 0 ? eager_seconds * 1e6 / sample : 0.0,
      sample > 0 ? static_cast<double>(rss_eager - rss_eager_before) / sample : 0.0);
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  return loraserve::bench::BenchMain(argc, argv, "adapter_scale_bench", loraserve::Run);
}
