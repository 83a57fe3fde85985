#include "bench/bench_support.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#include "absl/flags/parse.h"
#include "base/flag_names.h"
#include "base/status_macros.h"
#include "server/model/weight_dtype.h"

namespace loraserve::bench {

absl::StatusOr<BenchModel> LoadCpuBenchModel(const BenchModelOptions& options) {
  BenchModel loaded;
  loaded.name = options.preset.empty() ? options.dir : options.preset;
  ASSIGN_OR_RETURN(const formats::ModelConfig config, options.preset.empty()
                                                          ? formats::LoadModelConfig(options.dir)
                                                          : formats::DummyPreset(options.preset));
  ASSIGN_OR_RETURN(const kernels::DType weight_dtype,
                   model::ChooseWeightDType(options.dtype, options.quantization, config));
  ASSIGN_OR_RETURN(loaded.backend, kernels::CreateCpuBackend({.num_threads = options.threads,
                                                              .weight_dtype = weight_dtype}));
  if (options.preset.empty()) {
    ASSIGN_OR_RETURN(loaded.model, model::LlamaModel::Load(loaded.backend.get(), options.dir, {}));
  } else {
    ASSIGN_OR_RETURN(loaded.model,
                     model::LlamaModel::CreateDummy(loaded.backend.get(), config, 0, {}));
  }
  return loaded;
}

double DecodeStepBytes(const kernels::Backend& backend, const model::LlamaModel& model,
                       int32_t batch, int32_t context, double adapter_bytes) {
  const formats::ModelConfig& config = model.config();
  const model::KvShape kv = model.kv_shape();
  const double embedding =
      config.tie_word_embeddings
          ? 0.0
          : static_cast<double>(kernels::WeightBytes(backend.WeightDType(kernels::DType::kF32),
                                                     config.vocab_size, config.hidden_size));
  const double kv_bytes = static_cast<double>(kv.num_layers) * batch * context * kv.num_kv_heads *
                          kv.head_dim * 2 *
                          static_cast<double>(kernels::DTypeSize(backend.KvCacheDType()));
  const double logits = static_cast<double>(batch) * config.vocab_size * sizeof(float);
  return static_cast<double>(model.weight_bytes()) - embedding + kv_bytes + adapter_bytes + logits;
}

namespace {

// The sum of `words` words (a multiple of 32) read in 64-byte (or 32-byte)
// loads with four independent sums: on a core whose bandwidth is bounded by
// the misses it keeps in flight, word-wide loads reach only half of what the
// GEMM kernels' vector loads do (measured on the 2-core Xeon VM: 12-22 GB/s
// against 30), which made the floor too low and of_floor above 1.
__attribute__((target("avx512f"))) uint64_t SumWordsAvx512(const uint64_t* p, size_t words) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  for (size_t i = 0; i < words; i += 32) {
    a = _mm512_add_epi64(a, _mm512_loadu_si512(p + i));
    b = _mm512_add_epi64(b, _mm512_loadu_si512(p + i + 8));
    c = _mm512_add_epi64(c, _mm512_loadu_si512(p + i + 16));
    d = _mm512_add_epi64(d, _mm512_loadu_si512(p + i + 24));
  }
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a, b), _mm512_add_epi64(c, d)));
}

__attribute__((target("avx2"))) uint64_t SumWordsAvx2(const uint64_t* p, size_t words) {
  const auto load = [p](size_t i) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
  };
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i < words; i += 32) {
    a = _mm256_add_epi64(a, _mm256_add_epi64(load(i), load(i + 4)));
    b = _mm256_add_epi64(b, _mm256_add_epi64(load(i + 8), load(i + 12)));
    c = _mm256_add_epi64(c, _mm256_add_epi64(load(i + 16), load(i + 20)));
    d = _mm256_add_epi64(d, _mm256_add_epi64(load(i + 24), load(i + 28)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

}  // namespace

double HostReadBandwidth(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  constexpr size_t kWords = (size_t{1} << 30) / sizeof(uint64_t);
  const std::vector<uint64_t> buffer(kWords, 1);
  __builtin_cpu_init();
  const auto sum_words = __builtin_cpu_supports("avx512f") ? SumWordsAvx512 : SumWordsAvx2;
  // Shares of whole 32-word runs; the last thread takes the rest.
  const size_t runs = kWords / 32;
  double best = 0.0;
  for (int pass = 0; pass < 5; ++pass) {
    std::vector<uint64_t> sums(threads);
    std::vector<std::thread> workers;
    const auto start = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, t] {
        const size_t begin = runs / threads * t * 32;
        const size_t end = t + 1 == threads ? kWords : runs / threads * (t + 1) * 32;
        sums[t] = sum_words(buffer.data() + begin, end - begin);
      });
    }
    for (std::thread& worker : workers) worker.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    // The sums are checked so that the reads cannot be optimised away.
    uint64_t total = 0;
    for (uint64_t sum : sums) total += sum;
    if (total != kWords) return 0.0;
    best = std::max(best, static_cast<double>(kWords * sizeof(uint64_t)) / seconds);
  }
  return best;
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0.0 : values[values.size() / 2];
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0.0;
  std::sort(values.begin(), values.end());
  return values[std::min(values.size() - 1, static_cast<size_t>(p * (values.size() - 1) + 0.5))];
}

int BenchMain(int argc, char** argv, const char* name, absl::Status (*run)()) {
  std::vector<std::string> normalized = DashesToUnderscores(argc, argv);
  std::vector<char*> normalized_argv = ArgvOf(normalized);
  absl::ParseCommandLine(static_cast<int>(normalized_argv.size()), normalized_argv.data());
  const absl::Status status = run();
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", name, status.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace loraserve::bench
