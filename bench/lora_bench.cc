// Decode step time with LoRA adapters, side by side with the base model.
//
//   lora_bench --model ../shared/models/aidreams-260k
//   lora_bench --preset tinyllama-1.1b --ranks 16 --adapter-counts 1,8 --batch 8
//
// For each rank, seeded random all-projection PEFT adapters are written to a
// temporary directory and loaded through the registry like users' adapters.
// Scenarios, each a batch of --batch requests decoding --decode-steps tokens:
//   base            no adapter
//   unmerged/N      requests spread round-robin over N distinct adapters
//   merged/1        one adapter, forced merged weights (--lora-mode merged)
//   hot-unmerged/N  3/4 of the requests on one adapter, the rest over N-1 others
//   hot-merged/N    the same batch on the hot adapter's merged weights, the
//                   others corrected by low-rank terms
// Prints one JSON object; ratio = step time / base step time.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "adapters/device_cache.h"
#include "adapters/dummy_adapter.h"
#include "adapters/registry.h"
#include "base/status_macros.h"
#include "bench/bench_support.h"
#include "kernels/backend.h"
#include "server/engine/engine.h"
#include "server/engine/kv_cache.h"
#include "server/model/llama_model.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model directory");
ABSL_FLAG(std::string, preset, "", "Dummy preset (random weights) instead of --model");
ABSL_FLAG(std::vector<std::string>, ranks, std::vector<std::string>({"8", "16", "64"}),
          "LoRA ranks");
ABSL_FLAG(std::vector<std::string>, adapter_counts, std::vector<std::string>({"1", "8", "32"}),
          "Numbers of distinct adapters in the batch");
ABSL_FLAG(int32_t, batch, 32, "Requests decoding together");
ABSL_FLAG(int32_t, prompt_tokens, 8, "Prompt length of every request");
ABSL_FLAG(int32_t, decode_steps, 8, "Decode steps measured per scenario");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores)");
ABSL_FLAG(std::string, dtype, "auto", "Weight dtype: auto, float32, bfloat16 or float16");
ABSL_FLAG(std::string, quantization, "none", "none, or int8 (weight-only)");

namespace loraserve {
namespace {

struct Setup {
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<model::LlamaModel> model;
  std::unique_ptr<engine::KvCache> cache;
  std::unique_ptr<adapters::DeviceAdapterCache> device;
};

// Median decode step (ms) of `batch` requests, request i on adapters[i]
// (null: base), under `options`.
absl::StatusOr<double> DecodeStepMs(Setup& setup, const std::vector<adapters::AdapterHandle>& per_request,
                                    const engine::EngineOptions& options) {
  engine::Engine engine(setup.model.get(), nullptr, setup.cache.get(), setup.device.get(), options);
  std::mt19937 rng(0);
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(
                                                      setup.model->config().vocab_size - 1));
  for (const adapters::AdapterHandle& adapter : per_request) {
    engine::GenerationRequest r;
    for (int t = 0; t < absl::GetFlag(FLAGS_prompt_tokens); ++t) r.prompt_ids.push_back(token(rng));
    r.max_tokens = absl::GetFlag(FLAGS_decode_steps) + 2;
    r.ignore_eos = true;
    r.sampling.temperature = 0.0f;
    r.adapter = adapter;
    RETURN_IF_ERROR(engine.Add(r, [](const engine::TokenEvent&) {}).status());
  }
  RETURN_IF_ERROR(engine.Step());  // prefill
  RETURN_IF_ERROR(engine.Step());  // first decode: merges happen here, not measured
  std::vector<double> steps;
  while (engine.HasWork()) {
    const absl::Time start = absl::Now();
    RETURN_IF_ERROR(engine.Step());
    steps.push_back(absl::ToDoubleSeconds(absl::Now() - start) * 1e3);
  }
  return bench::Median(steps);
}

absl::Status Run() {
  Setup setup;
  ASSIGN_OR_RETURN(bench::BenchModel loaded,
                   bench::LoadCpuBenchModel({.preset = absl::GetFlag(FLAGS_preset),
                                             .dir = absl::GetFlag(FLAGS_model),
                                             .threads = absl::GetFlag(FLAGS_threads),
                                             .dtype = absl::GetFlag(FLAGS_dtype),
                                             .quantization = absl::GetFlag(FLAGS_quantization)}));
  setup.backend = std::move(loaded.backend);
  setup.model = std::move(loaded.model);
  const std::string& name = loaded.name;
  const int32_t batch = absl::GetFlag(FLAGS_batch);
  ASSIGN_OR_RETURN(setup.cache,
                   engine::KvCache::Create(setup.backend.get(), setup.model->kv_shape(), 16,
                                           int64_t{1} << 30));
  setup.device = std::make_unique<adapters::DeviceAdapterCache>(setup.backend.get(),
                                                                int64_t{8} << 30);
  const std::string dir = (std::filesystem::temp_directory_path() /
                           absl::StrCat("loraserve_lora_bench_", ::getpid()))
                              .string();
  std::vector<std::string> rows;
  auto row = [&](int rank, const std::string& scenario, int adapters, double ms, double base_ms) {
    rows.push_back(absl::StrCat("{\"rank\": ", rank, ", \"scenario\": \"", scenario,
                                "\", \"adapters\": ", adapters, ", \"decode_step_ms\": ", ms,
                                ", \"tokens_per_s\": ", batch * 1e3 / ms,
                                ", \"ratio_vs_base\": ", ms / base_ms, "}"));
  };
  const std::vector<adapters::AdapterHandle> no_adapters(batch);
  engine::EngineOptions unmerged{.max_batch_tokens = 8192,
                                 .lora_mode = adapters::LoraMode::kUnmerged};
  ASSIGN_OR_RETURN(const double base_ms, DecodeStepMs(setup, no_adapters, unmerged));
  row(0, "base", 0, base_ms, base_ms);

  int max_count = 1;
  for (const std::string& c : absl::GetFlag(FLAGS_adapter_counts)) max_count = std::max(max_count, std::stoi(c));
  for (const std::string& rank_text : absl::GetFlag(FLAGS_ranks)) {
    const int rank = std::stoi(rank_text);
    ASSIGN_OR_RETURN(auto registry, adapters::AdapterRegistry::Create(
                                        {.base = setup.model->adapter_shape(),
                                         .limits = {.max_rank = std::max(64, rank)}}));
    std::vector<adapters::AdapterHandle> handles;
    for (int i = 0; i < max_count; ++i) {
      const std::string adapter_dir = absl::StrCat(dir, "/r", rank, "_", i);
      RETURN_IF_ERROR(adapters::WriteDummyAdapter(adapter_dir, setup.model->adapter_shape(),
                                                  {.rank = rank, .alpha = 2.0 * rank,
                                                   .seed = static_cast<uint64_t>(1000 * rank + i)}));
      const std::string id = absl::StrCat("bench/r", rank, "-", i);
      RETURN_IF_ERROR(registry->Load(id, adapter_dir).status());
      ASSIGN_OR_RETURN(adapters::AdapterHandle handle, registry->Acquire(id));
      handles.push_back(std::move(handle));
    }
    for (const std::string& count_text : absl::GetFlag(FLAGS_adapter_counts)) {
      const int count = std::stoi(count_text);
      std::vector<adapters::AdapterHandle> spread(batch), hot(batch);
      for (int i = 0; i < batch; ++i) {
        spread[i] = handles[i % count];
        hot[i] = (i % 4 != 3 || count == 1) ? handles[0] : handles[1 + (i / 4) % (count - 1)];
      }
      ASSIGN_OR_RETURN(double ms, DecodeStepMs(setup, spread, unmerged));
      row(rank, "unmerged", count, ms, base_ms);
      if (count == 1) {
        engine::EngineOptions merged = unmerged;
        merged.lora_mode = adapters::LoraMode::kMerged;
        ASSIGN_OR_RETURN(ms, DecodeStepMs(setup, spread, merged));
        row(rank, "merged", count, ms, base_ms);
        continue;
      }
      ASSIGN_OR_RETURN(ms, DecodeStepMs(setup, hot, unmerged));
      row(rank, "hot-unmerged", count, ms, base_ms);
      engine::EngineOptions hot_merged = unmerged;
      hot_merged.lora_mode = adapters::LoraMode::kAuto;
      hot_merged.merged_cache_bytes = int64_t{16} << 30;
      hot_merged.merged_min_batch_share = 0.5;
      ASSIGN_OR_RETURN(ms, DecodeStepMs(setup, hot, hot_merged));
      row(rank, "hot-merged", count, ms, base_ms);
    }
  }
  std::filesystem::remove_all(dir);
  std::printf("{\"bench\": \"lora\", \"model\": \"%s\", \"batch\": %d, \"results\": [\n  %s\n]}\n",
              name.c_str(), batch, absl::StrJoin(rows, ",\n  ").c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  return loraserve::bench::BenchMain(argc, argv, "lora_bench", loraserve::Run);
}
