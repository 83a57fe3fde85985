// Decode step time on the CUDA backend, base model vs many adapters vs merged
// weights, with the bytes a step must move against a copy-bandwidth ceiling
// measured on the same GPU.
//
//   cuda_decode_bench                       # llama-3-8b preset, batches 1,16,64
//   cuda_decode_bench --preset tinyllama-1.1b --batches 8 --adapters 8
//   cuda_decode_bench --cpu_dry_run --preset tiny   # the bench's own logic, no GPU
//
// Scenarios for each batch size B (every request decodes one token per step
// after a prefill of --context tokens):
//   base      no adapter
//   lora      request i on adapter i % --adapters (min(B, adapters) distinct),
//             rank --rank, all seven projections, unmerged (segmented kernels)
//   hot       every request on adapter 0, unmerged (one segment of B rows)
//   merged    every request on adapter 0, run on its merged weights
// "moved" counts the bytes a step must read or write at least once: weights
// (the embedding table only for the gathered rows), the KV cache read by
// attention, the distinct adapters' A and B, and the logits; "ceiling" is
// moved / copy bandwidth (a device-to-device copy, read + write). A step ends
// as the engine's do: sampling on the device (--temperature, --top_p), only
// token ids back to the host. step_ms is with decode steps launched as CUDA
// graphs (the server's default), eager_ms the same steps launched operation
// by operation. Prints one table (and nothing else on stdout).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "adapters/device_adapter.h"
#include "adapters/dummy_adapter.h"
#include "adapters/lora_adapter.h"
#include "base/status_macros.h"
#include "bench/bench_support.h"
#include "formats/model_config.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"

ABSL_FLAG(std::string, preset, "llama-3-8b", "Dummy model preset (random weights)");
ABSL_FLAG(std::vector<std::string>, batches, std::vector<std::string>({"1", "16", "64"}),
          "Batch sizes (requests decoding together)");
ABSL_FLAG(int32_t, adapters, 64, "Distinct adapters for the lora scenario");
ABSL_FLAG(int32_t, rank, 16, "Rank of every adapter");
ABSL_FLAG(int32_t, context, 128, "Prompt tokens of every request before the decode steps");
ABSL_FLAG(int32_t, steps, 10, "Timed decode steps per scenario (after 2 warm-up steps)");
ABSL_FLAG(int32_t, device, 0, "CUDA device");
ABSL_FLAG(double, temperature, 0.8, "Sampling temperature of every request (0 = greedy)");
ABSL_FLAG(double, top_p, 0.95, "Top-p of every request (1 = off)");
ABSL_FLAG(bool, cpu_dry_run, false,
          "Run on the CPU backend: checks the benchmark itself on a machine without a GPU "
          "(the times say nothing about the GPU)");

namespace loraserve {
namespace {

constexpr int32_t kBlockSize = 16;
constexpr int32_t kWarmupSteps = 2;
// Adapters written and parsed at once while the bench prepares them.
constexpr unsigned kParallelAdapterLoads = 16;

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Device-to-device copy bandwidth in bytes/s, counting bytes read + written.
absl::StatusOr<double> CopyBandwidth(kernels::Backend& backend) {
  // 2 GiB on a GPU (far past its caches); a dry run only needs the number.
  const size_t bytes = absl::GetFlag(FLAGS_cpu_dry_run) ? size_t{64} << 20 : size_t{2} << 30;
  ASSIGN_OR_RETURN(kernels::DeviceBuffer src, backend.Allocate(bytes));
  ASSIGN_OR_RETURN(kernels::DeviceBuffer dst, backend.Allocate(bytes));
  // Random-looking contents, not zeros (see the device notes: zeros can be faster).
  std::vector<uint32_t> pattern(size_t{1} << 20);
  std::mt19937 rng(1);
  for (uint32_t& v : pattern) v = rng();
  for (size_t off = 0; off < bytes; off += pattern.size() * 4) {
    RETURN_IF_ERROR(backend.CopyToDevice(static_cast<char*>(src.data()) + off, pattern.data(),
                                         pattern.size() * 4));
  }
  RETURN_IF_ERROR(backend.CopyOnDevice(dst.data(), src.data(), bytes));  // warm-up
  RETURN_IF_ERROR(backend.Synchronize());
  std::vector<double> rates;
  for (int i = 0; i < 5; ++i) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < 4; ++r)
      RETURN_IF_ERROR(backend.CopyOnDevice(dst.data(), src.data(), bytes));
    RETURN_IF_ERROR(backend.Synchronize());
    rates.push_back(4.0 * 2.0 * static_cast<double>(bytes) / Seconds(start));
  }
  return bench::Median(rates);
}

// The paged KV cache for `max_batch` sequences of `tokens_per_seq` tokens.
struct KvCache {
  std::vector<kernels::DeviceBuffer> buffers;
  model::KvCacheView view;
  int32_t blocks_per_seq = 0;
};

absl::StatusOr<KvCache> MakeKvCache(kernels::Backend& backend, const model::KvShape& shape,
                                    int32_t max_batch, int32_t tokens_per_seq) {
  KvCache cache;
  cache.blocks_per_seq = (tokens_per_seq + kBlockSize - 1) / kBlockSize;
  const int32_t num_blocks = max_batch * cache.blocks_per_seq;
  cache.view.layout = {num_blocks, kBlockSize, static_cast<int32_t>(shape.num_kv_heads),
                       static_cast<int32_t>(shape.head_dim), backend.KvCacheDType()};
  const auto bytes = static_cast<size_t>(kernels::KvPoolBytes(cache.view.layout));
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    ASSIGN_OR_RETURN(kernels::DeviceBuffer k, backend.Allocate(bytes));
    ASSIGN_OR_RETURN(kernels::DeviceBuffer v, backend.Allocate(bytes));
    cache.view.k.push_back(k.data());
    cache.view.v.push_back(v.data());
    cache.buffers.push_back(std::move(k));
    cache.buffers.push_back(std::move(v));
  }
  return cache;
}

// A step of `batch` sequences: tokens [first, first + count) of each
// (count = 1 for decode), sequence s in blocks s * blocks_per_seq onwards.
model::ForwardInput MakeStep(int32_t batch, int32_t first, int32_t count, int32_t blocks_per_seq,
                             int32_t vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> token(3, vocab - 1);
  model::ForwardInput in;
  in.max_blocks_per_seq = blocks_per_seq;
  in.query_start.push_back(0);
  for (int32_t s = 0; s < batch; ++s) {
    for (int32_t pos = first; pos < first + count; ++pos) {
      in.tokens.push_back(token(rng));
      in.positions.push_back(pos);
      in.slot_mapping.push_back((s * blocks_per_seq + pos / kBlockSize) * kBlockSize +
                                pos % kBlockSize);
    }
    // Logits of each sequence's last token, as the engine asks for.
    in.logit_rows.push_back(static_cast<int32_t>(in.tokens.size()) - 1);
    in.query_start.push_back(static_cast<int32_t>(in.tokens.size()));
    in.context_lens.push_back(first + count);
    for (int32_t b = 0; b < blocks_per_seq; ++b) in.block_tables.push_back(s * blocks_per_seq + b);
  }
  return in;
}

// Median wall time (ms) of a decode step and its sampling, after a prefill
// and warm-up steps, with or without step graphs.
absl::StatusOr<double> DecodeStepMs(model::LlamaModel& model, const KvCache& cache, int32_t batch,
                                    const std::vector<model::AdapterChoice>& adapters,
                                    const model::MergedWeights* merged, bool graphs) {
  model.set_step_graphs(graphs);
  const int32_t context = absl::GetFlag(FLAGS_context);
  const int32_t vocab = static_cast<int32_t>(model.config().vocab_size);
  model::ForwardInput prefill = MakeStep(batch, 0, context, cache.blocks_per_seq, vocab, 1);
  prefill.adapters = adapters;
  prefill.merged = merged;
  RETURN_IF_ERROR(model.ForwardOnDevice(prefill, cache.view).status());
  std::vector<kernels::SamplingRow> rows(batch);
  for (kernels::SamplingRow& row : rows) {
    row.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
    row.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  }
  std::vector<kernels::SampledToken> sampled(batch);
  std::mt19937_64 rng(3);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  std::vector<double> ms;
  const int32_t steps = absl::GetFlag(FLAGS_steps);
  for (int32_t i = 0; i < kWarmupSteps + steps; ++i) {
    model::ForwardInput step = MakeStep(batch, context + i, 1, cache.blocks_per_seq, vocab, 2 + i);
    step.adapters = adapters;
    step.merged = merged;
    for (kernels::SamplingRow& row : rows) row.uniform = uniform(rng);
    const auto start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(const float* logits, model.ForwardOnDevice(step, cache.view));
    // Sample returns once the token ids reached the host: the step is complete.
    RETURN_IF_ERROR(model.backend()->Sample(logits, batch, vocab, rows.data(), sampled.data()));
    if (i >= kWarmupSteps) ms.push_back(Seconds(start) * 1e3);
  }
  return bench::Median(ms);
}

absl::Status Run() {
  ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend,
                   absl::GetFlag(FLAGS_cpu_dry_run)
                       ? kernels::CreateCpuBackend({})
                       : kernels::CreateCudaBackend({.device = absl::GetFlag(FLAGS_device)}));
  std::vector<int32_t> batches;
  for (const std::string& b : absl::GetFlag(FLAGS_batches)) batches.push_back(std::stoi(b));
  const int32_t max_batch = *std::max_element(batches.begin(), batches.end());
  const int32_t context = absl::GetFlag(FLAGS_context);
  const int32_t rank = absl::GetFlag(FLAGS_rank);
  const int32_t num_adapters = absl::GetFlag(FLAGS_adapters);

  ASSIGN_OR_RETURN(const double copy_bw, CopyBandwidth(*backend));
  std::fprintf(stderr, "copy bandwidth %.0f GB/s (read + write)\n", copy_bw / 1e9);

  auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(formats::ModelConfig config, formats::DummyPreset(absl::GetFlag(FLAGS_preset)));
  ASSIGN_OR_RETURN(std::unique_ptr<model::LlamaModel> model,
                   model::LlamaModel::CreateDummy(backend.get(), config, 0, {}));
  std::fprintf(stderr, "model %s: %.2f GB of weights in %.1f s\n",
               absl::GetFlag(FLAGS_preset).c_str(), model->weight_bytes() / 1e9, Seconds(start));

  // Adapters are written in PEFT format and loaded like users' ones, a few
  // at a time in parallel (writing and parsing dominate; the GPU machine has
  // the cores) so that neither disk nor host memory holds them all; uploads
  // go one by one.
  start = std::chrono::steady_clock::now();
  const std::string dir =
      (std::filesystem::temp_directory_path() / absl::StrCat("loraserve_cuda_bench_", ::getpid()))
          .string();
  const int32_t parallel = static_cast<int32_t>(
      std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, kParallelAdapterLoads));
  std::vector<std::unique_ptr<adapters::DeviceAdapter>> device_adapters;
  for (int32_t first = 0; first < num_adapters; first += parallel) {
    const int32_t count = std::min(parallel, num_adapters - first);
    std::vector<absl::StatusOr<adapters::LoraAdapter>> hosts(count);  // each set by its loader
    std::vector<std::thread> loaders;
    for (int32_t k = 0; k < count; ++k) {
      loaders.emplace_back([&, k] {
        const std::string own = absl::StrCat(dir, "_", first + k);
        absl::Status written = adapters::WriteDummyAdapter(
            own, model->adapter_shape(),
            {.rank = rank, .alpha = 2.0 * rank, .seed = static_cast<uint64_t>(100 + first + k)});
        hosts[k] = written.ok() ? adapters::LoadLoraAdapter(own, model->adapter_shape(),
                                                            {.max_rank = std::max(64, rank)})
                                : written;
        std::filesystem::remove_all(own);
      });
    }
    for (std::thread& loader : loaders) loader.join();
    for (absl::StatusOr<adapters::LoraAdapter>& host : hosts) {
      if (!host.ok()) return host.status();
      ASSIGN_OR_RETURN(std::unique_ptr<adapters::DeviceAdapter> device,
                       adapters::DeviceAdapter::Upload(backend.get(), *host));
      device_adapters.push_back(std::move(device));
    }
  }
  const double adapter_bytes = device_adapters.empty() ? 0.0 : device_adapters[0]->bytes();
  std::fprintf(stderr, "%d adapters of %.0f MB in %.1f s\n", num_adapters, adapter_bytes / 1e6,
               Seconds(start));

  std::unique_ptr<model::MergedWeights> merged;
  if (!device_adapters.empty()) {
    start = std::chrono::steady_clock::now();
    ASSIGN_OR_RETURN(merged, model->Merge({device_adapters[0].get(), 1.0f}));
    RETURN_IF_ERROR(backend->Synchronize());
    std::fprintf(stderr, "merged weights (%.2f GB) in %.2f s\n", merged->bytes() / 1e9,
                 Seconds(start));
  }
  ASSIGN_OR_RETURN(KvCache cache, MakeKvCache(*backend, model->kv_shape(), max_batch,
                                              context + kWarmupSteps + absl::GetFlag(FLAGS_steps)));

  // Bytes a decode step must move, per the header comment, with the KV
  // cache a timed step reads halfway through the timed steps.
  const int32_t timed_context = context + kWarmupSteps + absl::GetFlag(FLAGS_steps) / 2 + 1;
  const auto moved = [&](int32_t batch, int32_t distinct) {
    return bench::DecodeStepBytes(*backend, *model, batch, timed_context, distinct * adapter_bytes);
  };

  std::printf("%-6s %-10s %10s %10s %10s %11s %8s %9s %9s\n", "batch", "scenario", "step_ms",
              "tok/s", "moved_GB", "ceiling_ms", "of_ceil", "vs_base", "eager_ms");
  for (const int32_t batch : batches) {
    double base_ms = 0.0;
    // Measures one scenario with and without step graphs and prints its row.
    const auto row = [&](const std::string& scenario,
                         const std::vector<model::AdapterChoice>& adapters,
                         const model::MergedWeights* merged, int32_t distinct) -> absl::Status {
      ASSIGN_OR_RETURN(const double ms,
                       DecodeStepMs(*model, cache, batch, adapters, merged, /*graphs=*/true));
      ASSIGN_OR_RETURN(const double eager_ms,
                       DecodeStepMs(*model, cache, batch, adapters, merged, /*graphs=*/false));
      const double bytes = moved(batch, distinct);
      const double ceiling_ms = bytes / copy_bw * 1e3;
      if (base_ms == 0.0) base_ms = ms;
      std::printf("%-6d %-10s %10.3f %10.1f %10.2f %11.3f %7.0f%% %8.2fx %9.3f\n", batch,
                  scenario.c_str(), ms, batch * 1e3 / ms, bytes / 1e9, ceiling_ms,
                  100.0 * ceiling_ms / ms, ms / base_ms, eager_ms);
      std::fflush(stdout);
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(row("base", {}, nullptr, 0));
    if (device_adapters.empty()) continue;
    std::vector<model::AdapterChoice> spread, hot;
    for (int32_t i = 0; i < batch; ++i) {
      spread.push_back({device_adapters[i % num_adapters].get(), 1.0f});
      hot.push_back({device_adapters[0].get(), 1.0f});
    }
    const int32_t distinct = std::min(batch, num_adapters);
    RETURN_IF_ERROR(row(absl::StrCat("lora/", distinct), spread, nullptr, distinct));
    if (distinct > 1) RETURN_IF_ERROR(row("hot", hot, nullptr, 1));
    RETURN_IF_ERROR(row("merged", hot, merged.get(), 0));
  }
  std::fprintf(stderr, "step graphs: %lld steps launched as graphs, %lld fell back to eager\n",
               static_cast<long long>(model->step_graph_stats().graph_steps),
               static_cast<long long>(model->step_graph_stats().eager_fallbacks));
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  return loraserve::bench::BenchMain(argc, argv, "cuda_decode_bench", loraserve::Run);
}
