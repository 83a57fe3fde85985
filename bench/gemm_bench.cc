// The CPU GEMM alone over a decoder's weight matrices, per storage dtype: a
// decode step's projections of a preset (every layer's q|k|v, o, gate|up and
// down, then lm_head), each matrix its own allocation so nothing stays in
// cache between steps, at several batch sizes. Prints the median time of a
// pass over all matrices, the weight bytes it reads, the bandwidth that
// makes (bytes / time) and the share of the host's read bandwidth.
//
//   gemm_bench --preset tinyllama-1.1b --dtypes float32,bfloat16,float16,int8 --rows 1,8
#include <algorithm>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"
#include "bench/bench_support.h"
#include "formats/model_config.h"
#include "kernels/backend.h"
#include "server/model/weight_dtype.h"

ABSL_FLAG(std::string, preset, "tinyllama-1.1b", "Dummy preset whose matrix shapes to use");
ABSL_FLAG(std::vector<std::string>, dtypes,
          std::vector<std::string>({"float32", "bfloat16", "float16", "int8"}),
          "Weight dtypes (as --dtype, or int8 for --quantization int8)");
ABSL_FLAG(std::vector<std::string>, rows, std::vector<std::string>({"1", "8"}),
          "Rows of x (tokens in the step)");
ABSL_FLAG(int32_t, passes, 7, "Passes measured per dtype and row count");
ABSL_FLAG(int32_t, threads, 0, "CPU threads (0 = all cores)");

namespace loraserve {
namespace {

struct Matrix {
  kernels::DeviceBuffer buffer;
  kernels::WeightView view;
};

absl::Status Run() {
  ASSIGN_OR_RETURN(const formats::ModelConfig config,
                   formats::DummyPreset(absl::GetFlag(FLAGS_preset)));
  const double read_bandwidth = bench::HostReadBandwidth(absl::GetFlag(FLAGS_threads));
  const int64_t hidden = config.hidden_size;
  const int64_t q_dim = config.num_attention_heads * config.head_dim;
  const int64_t kv_dim = config.num_key_value_heads * config.head_dim;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (rows, cols)
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    shapes.insert(shapes.end(), {{q_dim + 2 * kv_dim, hidden},
                                 {hidden, q_dim},
                                 {2 * config.intermediate_size, hidden},
                                 {hidden, config.intermediate_size}});
  }
  shapes.push_back({config.vocab_size, hidden});
  int64_t widest = 0;
  for (const auto& [rows, cols] : shapes) widest = std::max({widest, rows, cols});

  // Every dtype's matrices first, then passes that take the dtypes in turn:
  // the machine's bandwidth drifts, and interleaving gives each dtype the
  // same share of it.
  struct Stored {
    std::unique_ptr<kernels::Backend> backend;
    kernels::DType dtype;
    std::vector<Matrix> matrices;
    int64_t bytes = 0;
  };
  std::vector<Stored> stored;
  std::vector<float> values;
  for (const std::string& dtype_name : absl::GetFlag(FLAGS_dtypes)) {
    const bool int8 = dtype_name == "int8";
    Stored s;
    ASSIGN_OR_RETURN(s.dtype, model::ChooseWeightDType(int8 ? "auto" : dtype_name,
                                                       int8 ? "int8" : "none", config));
    ASSIGN_OR_RETURN(s.backend,
                     kernels::CreateCpuBackend(
                         {.num_threads = absl::GetFlag(FLAGS_threads), .weight_dtype = s.dtype}));
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> uniform(-0.03f, 0.03f);
    for (const auto& [rows, cols] : shapes) {
      values.resize(rows * cols);
      for (float& v : values) v = uniform(rng);
      Matrix m;
      ASSIGN_OR_RETURN(m.buffer, s.backend->Allocate(kernels::WeightBytes(s.dtype, rows, cols)));
      RETURN_IF_ERROR(s.backend->UploadWeight(m.buffer.data(), values.data(), kernels::DType::kF32,
                                              rows, cols));
      m.view = {m.buffer.data(), s.dtype, rows, cols};
      s.bytes += kernels::WeightBytes(s.dtype, rows, cols);
      s.matrices.push_back(std::move(m));
    }
    stored.push_back(std::move(s));
  }
  std::vector<std::string> results;
  for (const std::string& rows_text : absl::GetFlag(FLAGS_rows)) {
    const int64_t m = std::stoll(rows_text);
    values.assign(m * widest, 0.5f);
    // Host memory is device memory on the CPU: one x and y serve every backend.
    std::vector<float> x = values, y(values.size());
    std::vector<std::vector<double>> times(stored.size());
    for (int pass = 0; pass <= absl::GetFlag(FLAGS_passes); ++pass) {
      for (size_t d = 0; d < stored.size(); ++d) {
        const absl::Time start = absl::Now();
        for (const Matrix& w : stored[d].matrices) {
          RETURN_IF_ERROR(stored[d].backend->Linear(x.data(), w.view, m, y.data(), false));
        }
        if (pass > 0) times[d].push_back(absl::ToDoubleSeconds(absl::Now() - start));  // 0: warm-up
      }
    }
    for (size_t d = 0; d < stored.size(); ++d) {
      const double median = bench::Median(times[d]);
      const double bytes = static_cast<double>(stored[d].bytes);
      results.push_back(absl::StrCat(
          "{\"dtype\": \"", kernels::DTypeName(stored[d].dtype), "\", \"rows\": ", m,
          ", \"pass_ms\": ", median * 1e3, ", \"weight_gb\": ", bytes / 1e9, ", \"gb_per_s\": ",
          bytes / median / 1e9, ", \"of_read_bandwidth\": ", bytes / median / read_bandwidth, "}"));
    }
  }
  std::printf(
      "{\"bench\": \"gemm\", \"preset\": \"%s\", \"host_read_gb_per_s\": %.2f, \"results\": [\n  "
      "%s\n]}\n",
      absl::GetFlag(FLAGS_preset).c_str(), read_bandwidth / 1e9,
      absl::StrJoin(results, ",\n  ").c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  return loraserve::bench::BenchMain(argc, argv, "gemm_bench", loraserve::Run);
}
