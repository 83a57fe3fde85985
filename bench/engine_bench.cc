// Prefill and decode throughput of the engine at several batch sizes.
//
//   engine_bench --model ../shared/models/aidreams-260k --batch-sizes 1,8,32
//   engine_bench --preset tinyllama-1.1b --batch-sizes 1,8 --prompt-tokens 32
//
// For each batch size B, B requests with random prompts of --prompt-tokens
// tokens are added at once: the first step prefills them all (prefill
// tokens/s), the following --decode-tokens steps decode one token each
// (decode tokens/s = B / median step time). Prints one JSON object.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "bench/bench_support.h"
#include "kernels/backend.h"
#include "server/engine/engine.h"
#include "server/engine/kv_cache.h"
#include "server/model/llama_model.h"

ABSL_FLAG(std::string, model, "", "Hugging Face model directory");
ABSL_FLAG(std::string, preset, "", "Dummy preset (random weights) instead of --model");
ABSL_FLAG(std::vector<std::string>, batch_sizes, std::vector<std::string>({"1", "8", "32"}),
          "Batch sizes to measure");
ABSL_FLAG(int32_t, prompt_tokens, 32, "Prompt length of every request");
ABSL_FLAG(int32_t, decode_tokens, 16, "Decode steps measured per batch size");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores)");
ABSL_FLAG(std::string, dtype, "auto", "Weight dtype: auto, float32, bfloat16 or float16");
ABSL_FLAG(std::string, quantization, "none", "none, or int8 (weight-only)");
ABSL_FLAG(int64_t, kv_cache_bytes, int64_t{2} << 30, "Bytes of KV cache");

namespace loraserve {
namespace {

absl::Status Run() {
  const double read_bandwidth = bench::HostReadBandwidth(absl::GetFlag(FLAGS_threads));
  ASSIGN_OR_RETURN(bench::BenchModel loaded,
                   bench::LoadCpuBenchModel({.preset = absl::GetFlag(FLAGS_preset),
                                             .dir = absl::GetFlag(FLAGS_model),
                                             .threads = absl::GetFlag(FLAGS_threads),
                                             .dtype = absl::GetFlag(FLAGS_dtype),
                                             .quantization = absl::GetFlag(FLAGS_quantization)}));
  kernels::Backend* backend = loaded.backend.get();
  model::LlamaModel* llama = loaded.model.get();
  const std::string& name = loaded.name;
  ASSIGN_OR_RETURN(auto cache, engine::KvCache::Create(backend, llama->kv_shape(), 16,
                                                       absl::GetFlag(FLAGS_kv_cache_bytes)));
  const int32_t prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  const int32_t decode_tokens = absl::GetFlag(FLAGS_decode_tokens);
  std::mt19937 rng(0);
  std::uniform_int_distribution<int32_t> token(3, static_cast<int32_t>(
                                                      llama->config().vocab_size - 1));
  std::vector<std::string> rows;
  for (const std::string& b : absl::GetFlag(FLAGS_batch_sizes)) {
    const int batch = std::stoi(b);
    engine::Engine engine(
        llama, nullptr, cache.get(), nullptr,
        {.max_batch_tokens = std::max(2048, batch * prompt_tokens), .max_running_requests = batch});
    for (int i = 0; i < batch; ++i) {
      engine::GenerationRequest r;
      for (int t = 0; t < prompt_tokens; ++t) r.prompt_ids.push_back(token(rng));
      r.max_tokens = decode_tokens + 1;
      r.ignore_eos = true;
      r.sampling.temperature = 0.0f;
      RETURN_IF_ERROR(engine.Add(r, [](const engine::TokenEvent&) {}).status());
    }
    absl::Time start = absl::Now();
    RETURN_IF_ERROR(engine.Step());
    const double prefill_s = absl::ToDoubleSeconds(absl::Now() - start);
    std::vector<double> steps;
    while (engine.HasWork()) {
      start = absl::Now();
      RETURN_IF_ERROR(engine.Step());
      steps.push_back(absl::ToDoubleSeconds(absl::Now() - start));
    }
    const double step_s = bench::Median(steps);
    // The median step reads about half of the decoded tokens' cache too.
    const double moved =
        bench::DecodeStepBytes(*backend, *llama, batch, prompt_tokens + decode_tokens / 2, 0.0);
    const double floor_s = moved / read_bandwidth;
    rows.push_back(absl::StrCat(
        "{\"batch\": ", batch, ", \"prefill_tokens_per_s\": ", batch * prompt_tokens / prefill_s,
        ", \"decode_step_ms_median\": ", step_s * 1e3,
        ", \"decode_tokens_per_s\": ", batch / step_s, ", \"moved_gb\": ", moved / 1e9,
        ", \"floor_ms\": ", floor_s * 1e3, ", \"of_floor\": ", floor_s / step_s, "}"));
  }
  std::printf(
      "{\"bench\": \"engine\", \"model\": \"%s\", \"weight_dtype\": \"%s\", \"parameters\": %lld, "
      "\"weight_bytes\": %lld, "
      "\"host_read_gb_per_s\": %.2f, \"prompt_tokens\": %d, \"decode_steps\": %d, "
      "\"results\": [\n  %s\n]}\n",
      name.c_str(), kernels::DTypeName(backend->WeightDType(kernels::DType::kF32)),
      static_cast<long long>(formats::ParameterCount(llama->config())),
      static_cast<long long>(llama->weight_bytes()), read_bandwidth / 1e9, prompt_tokens,
      decode_tokens, absl::StrJoin(rows, ",\n  ").c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  return loraserve::bench::BenchMain(argc, argv, "engine_bench", loraserve::Run);
}
