// Every tensor op on every backend against the CPU reference (float32
// weights), as one table of op cases in the manner of llama.cpp's
// test-backend-ops: each case makes seeded inputs, runs one call (or a short
// sequence) on the backend under test and on the reference, and compares
// each output with its own error bound. Inputs are what the backend under
// test holds (weights, LoRA matrices and KV cache history rounded to its
// dtypes), so that only the computation differs; outputs are poisoned with
// NaN first, and NaN never passes.
//
// The backends: the CPU at another thread count and with bf16, f16 and int8
// weights (run everywhere), and CUDA with bf16 and float32 weights (skipped,
// saying why, without a GPU). Sampling compares tokens, not floats, and has
// its own parity test (kernels/cuda/cuda_backend_test.cc).

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/support/backend_test_util.h"
#include "tests/support/side_by_side.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using test_support::Download;
using test_support::DownloadAs;
using test_support::Poisoned;
using test_support::RandomVector;
using test_support::RelativeError;
using test_support::RoundTo;
using test_support::Upload;
using test_support::UploadLora;
using test_support::UploadWeight;
using test_support::Weight;
using test_support::WeightValues;

// How close an output must come to the reference's.
enum class Tolerance {
  kExact,    // a gather or copy of held values
  kFloat32,  // float32 arithmetic in another order
  kGemm,     // a GEMM: the backend's operand rounding (BackendConfig::gemm_bound)
  kStored,   // a result stored in the weight dtype (BackendConfig::stored_bound)
};

// A backend under test and the bounds its dtypes earn against the float32
// CPU.
struct BackendConfig {
  std::string name;
  std::function<absl::StatusOr<std::unique_ptr<Backend>>()> make;
  double gemm_bound;    // the GEMM rounds its operands (CUDA: input rows to bf16)
  double stored_bound;  // a merged weight rounded to the storage dtype
};

std::vector<BackendConfig> Backends() {
  const auto cpu = [](int threads, DType dtype) {
    return [=] { return CreateCpuBackend({.num_threads = threads, .weight_dtype = dtype}); };
  };
  // CPU GEMMs widen the held weights and sum in float32: only the order
  // differs, except int8, whose VNNI GEMM quantizes the input rows too.
  return {
      {"cpu_f32_3_threads", cpu(3, DType::kF32), 1e-5, 1e-5},
      {"cpu_bf16", cpu(2, DType::kBF16), 1e-5, 1e-2},
      {"cpu_f16", cpu(2, DType::kF16), 1e-5, 2e-3},
      {"cpu_q8", cpu(2, DType::kQ8), 2e-2, 2e-2},
      {"cuda_bf16", [] { return CreateCudaBackend({}); }, 1e-2, 1e-2},
      {"cuda_f32", [] { return CreateCudaBackend({.weight_dtype = DType::kF32}); }, 1e-5, 1e-5},
  };
}

double BoundFor(Tolerance tolerance, const BackendConfig& config) {
  switch (tolerance) {
    case Tolerance::kExact:
      return 0.0;
    case Tolerance::kFloat32:
      return 1e-5;
    case Tolerance::kGemm:
      return config.gemm_bound;
    case Tolerance::kStored:
      return config.stored_bound;
  }
  return 0.0;
}

struct Output {
  std::string name;
  std::vector<float> values;
  Tolerance tolerance;
};

// One op case: `run` computes on `backend` from inputs as `held_by` holds
// them (the backend under test: `backend` itself, or the reference) and
// returns the outputs to compare.
struct OpCase {
  std::string name;
  std::function<std::vector<Output>(Backend& backend, Backend& held_by)> run;
};

// `w` on `backend` holding what `held_by` holds of it.
Weight HeldWeight(Backend& backend, Backend& held_by, const std::vector<float>& w, int64_t rows,
                  int64_t cols) {
  if (&backend == &held_by) return UploadWeight(backend, w, rows, cols);
  return UploadWeight(backend, WeightValues(held_by, UploadWeight(held_by, w, rows, cols)), rows,
                      cols);
}

// LoRA matrices on `backend` holding what `held_by` holds of them.
DeviceBuffer HeldLora(Backend& backend, Backend& held_by, const std::vector<float>& m) {
  return UploadLora(backend, RoundTo(held_by.LoraDType(), m));
}

void AddLinearCases(std::vector<OpCase>& cases) {
  const int64_t n = 96, k = 160;
  for (const int64_t m : {1, 7, 64, 300}) {
    for (const bool accumulate : {false, true}) {
      cases.push_back(
          {absl::StrCat("Linear_m", m, accumulate ? "_accumulate" : ""),
           [=](Backend& be, Backend& held_by) {
             const Weight w = HeldWeight(be, held_by, RandomVector(n * k, 1, -0.1f, 0.1f), n, k);
             DeviceBuffer x = Upload(be, RandomVector(m * k, 2 + m));
             DeviceBuffer y =
                 accumulate ? Upload(be, RandomVector(m * n, 3 + m)) : Poisoned(be, m * n);
             EXPECT_OK(be.Linear(x.as<float>(), w.view, m, y.as<float>(), accumulate));
             return std::vector<Output>{{"y", Download(be, y, m * n), Tolerance::kGemm}};
           }});
    }
  }
}

void AddFusedGemmCases(std::vector<OpCase>& cases) {
  const int64_t dim = 160, rows = 96;
  for (const int64_t n : {1, 7, 64}) {
    cases.push_back(
        {absl::StrCat("RmsNormLinear_n", n), [=](Backend& be, Backend& held_by) {
           const Weight w =
               HeldWeight(be, held_by, RandomVector(rows * dim, 5, -0.1f, 0.1f), rows, dim);
           DeviceBuffer norm = Upload(be, RandomVector(dim, 6, 0.5f, 1.5f));
           DeviceBuffer x = Upload(be, RandomVector(n * dim, 7 + n, -2.0f, 2.0f));
           DeviceBuffer h = Poisoned(be, n * dim), y = Poisoned(be, n * rows);
           EXPECT_OK(be.RmsNormLinear(x.as<float>(), norm.as<float>(), n, dim, 1e-5f, h.as<float>(),
                                      w.view, y.as<float>()));
           return std::vector<Output>{{"h", Download(be, h, n * dim), Tolerance::kFloat32},
                                      {"y", Download(be, y, n * rows), Tolerance::kGemm}};
         }});
  }
  // In place (h = x), as the model's final norm runs.
  cases.push_back(
      {"RmsNormLinear_in_place", [=](Backend& be, Backend& held_by) {
         const int64_t n = 5;
         const Weight w =
             HeldWeight(be, held_by, RandomVector(rows * dim, 5, -0.1f, 0.1f), rows, dim);
         DeviceBuffer norm = Upload(be, RandomVector(dim, 6, 0.5f, 1.5f));
         DeviceBuffer x = Upload(be, RandomVector(n * dim, 8, -2.0f, 2.0f));
         DeviceBuffer y = Poisoned(be, n * rows);
         EXPECT_OK(be.RmsNormLinear(x.as<float>(), norm.as<float>(), n, dim, 1e-6f, x.as<float>(),
                                    w.view, y.as<float>()));
         return std::vector<Output>{{"h", Download(be, x, n * dim), Tolerance::kFloat32},
                                    {"y", Download(be, y, n * rows), Tolerance::kGemm}};
       }});
  for (const int64_t n : {1, 7, 64}) {
    cases.push_back(
        {absl::StrCat("SiluMulLinear_n", n), [=](Backend& be, Backend& held_by) {
           const Weight w =
               HeldWeight(be, held_by, RandomVector(rows * dim, 8, -0.1f, 0.1f), rows, dim);
           DeviceBuffer gate_up = Upload(be, RandomVector(n * 2 * dim, 9 + n, -3, 3));
           DeviceBuffer act = Poisoned(be, n * dim);
           DeviceBuffer y = Upload(be, RandomVector(n * rows, 10 + n));
           EXPECT_OK(be.SiluMulLinear(gate_up.as<float>(), n, dim, act.as<float>(), w.view,
                                      y.as<float>(), /*accumulate=*/true));
           return std::vector<Output>{{"act", Download(be, act, n * dim), Tolerance::kFloat32},
                                      {"y", Download(be, y, n * rows), Tolerance::kGemm}};
         }});
  }
}

void AddEmbeddingCase(std::vector<OpCase>& cases) {
  cases.push_back(
      {"Embedding", [](Backend& be, Backend& held_by) {
         const int64_t vocab = 50, hidden = 72;
         const std::vector<int32_t> ids = {0, 49, 3, 3, 17, 25, 48};
         const int64_t n = static_cast<int64_t>(ids.size());
         const Weight table =
             HeldWeight(be, held_by, RandomVector(vocab * hidden, 6), vocab, hidden);
         DeviceBuffer d_ids = Upload(be, ids), y = Poisoned(be, n * hidden);
         EXPECT_OK(be.Embedding(d_ids.as<int32_t>(), n, table.view, y.as<float>()));
         // A gather of held values is exact.
         return std::vector<Output>{{"y", Download(be, y, n * hidden), Tolerance::kExact}};
       }});
}

// Ops on float32 activations only: the same on every weight dtype.
void AddElementwiseCases(std::vector<OpCase>& cases) {
  const int64_t n = 13, dim = 300;
  // `op` gets [x, other, weight, gate_up] and the output (`init`, or NaN).
  const auto add =
      [&](const char* name, bool init_from_x,
          std::function<absl::Status(Backend&, float*, float*, float*, float*, float*)> op) {
        cases.push_back(
            {name, [=](Backend& be, Backend&) {
               DeviceBuffer x = Upload(be, RandomVector(n * dim, 8));
               DeviceBuffer other = Upload(be, RandomVector(n * dim, 9));
               DeviceBuffer weight = Upload(be, RandomVector(dim, 10, 0.5f, 1.5f));
               DeviceBuffer gate_up = Upload(be, RandomVector(n * 2 * dim, 11, -6, 6));
               DeviceBuffer out =
                   init_from_x ? Upload(be, RandomVector(n * dim, 8)) : Poisoned(be, n * dim);
               EXPECT_OK(op(be, x.as<float>(), other.as<float>(), weight.as<float>(),
                            gate_up.as<float>(), out.as<float>()));
               return std::vector<Output>{{"out", Download(be, out, n * dim), Tolerance::kFloat32}};
             }});
      };
  add("RmsNorm", false, [=](Backend& be, float* x, float*, float* w, float*, float* out) {
    return be.RmsNorm(x, w, n, dim, 1e-5f, out);
  });
  add("RmsNorm_in_place", true, [=](Backend& be, float*, float*, float* w, float*, float* out) {
    return be.RmsNorm(out, w, n, dim, 1e-6f, out);
  });
  add("Add", true, [=](Backend& be, float*, float* other, float*, float*, float* out) {
    return be.Add(out, other, n * dim);
  });
  add("AddBias", true, [=](Backend& be, float*, float*, float* w, float*, float* out) {
    return be.AddBias(out, w, n, dim);
  });
  add("SiluMul", false, [=](Backend& be, float*, float*, float*, float* gate_up, float* out) {
    return be.SiluMul(gate_up, n, dim, out);
  });
  add("CopyOnDevice", false, [=](Backend& be, float* x, float*, float*, float*, float* out) {
    return be.CopyOnDevice(out, x, n * dim * sizeof(float));
  });
}

// q and k side by side in one buffer, as the model's fused q|k|v rows hold
// them, with NaN columns after that must stay NaN. Angles up to 32000 rad:
// cos/sin of the same float32 angle, both accurate.
void AddRopeCases(std::vector<OpCase>& cases) {
  for (const float scaling : {1.0f, 0.75f}) {
    cases.push_back(
        {absl::StrCat("Rope_scaling_", scaling == 1.0f ? "1" : "0_75"), [=](Backend& be, Backend&) {
           const int64_t tokens = 9;
           const int32_t heads = 6, kv_heads = 2, head_dim = 64;
           const std::vector<int32_t> positions = {0, 1, 2, 17, 100, 511, 2047, 4095, 32000};
           std::vector<float> inv_freq(head_dim / 2);
           for (int i = 0; i < head_dim / 2; ++i) {
             inv_freq[i] = 1.0f / std::pow(500000.0f, 2.0f * i / head_dim);
           }
           const int64_t q_width = heads * head_dim, k_width = kv_heads * head_dim;
           const std::vector<float> q = RandomVector(tokens * q_width, 12);
           const std::vector<float> k = RandomVector(tokens * k_width, 13);
           const std::vector<float> fused =
               test_support::SideBySide(tokens, {{&q, q_width}, {&k, k_width}}, 5);
           const int64_t ld = q_width + k_width + 5;
           DeviceBuffer qk = Upload(be, fused), pos = Upload(be, positions),
                        freq = Upload(be, inv_freq);
           EXPECT_OK(be.Rope(qk.as<float>(), ld, qk.as<float>() + q_width, ld, pos.as<int32_t>(),
                             tokens, heads, kv_heads, {freq.as<float>(), head_dim, scaling}));
           const std::vector<float> rotated = Download(be, qk, fused.size());
           for (int64_t t = 0; t < tokens; ++t) {
             EXPECT_TRUE(std::isnan(rotated[t * ld + ld - 1]));
           }
           return std::vector<Output>{
               {"q", test_support::ColumnSlice(rotated, tokens, ld, 0, q_width),
                Tolerance::kFloat32},
               {"k", test_support::ColumnSlice(rotated, tokens, ld, q_width, k_width),
                Tolerance::kFloat32}};
         }});
  }
}

// Three sequences in one step: a fresh prefill, a decode over a long cached
// context, and a chunk of a prefill whose start is cached; grouped-query
// heads; q, k and v read from fused q|k|v rows. The cache starts full of
// random history and is in each backend's KvCacheDType; history and the new
// keys and values are rounded to the held cache's dtype first, so both
// caches hold the same numbers: the written cache is exact and attention
// agrees to float32 accuracy.
void AddAttentionCases(std::vector<OpCase>& cases) {
  for (const int32_t head_dim : {32, 64, 128, 256}) {
    cases.push_back(
        {absl::StrCat("WriteKv_PagedAttention_head_dim_", head_dim),
         [=](Backend& be, Backend& held_by) {
           const DType held = held_by.KvCacheDType();
           const auto as_held = [&](const std::vector<float>& v) { return RoundTo(held, v); };
           const int32_t heads = 8, kv_heads = 2, block_size = 16, blocks_per_seq = 20,
                         num_seqs = 3, tokens = 10;
           const std::vector<int32_t> query_start = {0, 5, 6, 10};
           const std::vector<int32_t> context_lens = {5, 300, 24};
           const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 299, 20, 21, 22, 23};
           const KvLayout layout{num_seqs * blocks_per_seq, block_size, kv_heads, head_dim,
                                 be.KvCacheDType()};
           // Blocks of sequence s, in a shuffled order.
           std::vector<int32_t> block_tables(num_seqs * blocks_per_seq);
           for (int32_t i = 0; i < num_seqs * blocks_per_seq; ++i) {
             block_tables[i] = (i * 37 + 11) % (num_seqs * blocks_per_seq);
           }
           std::vector<int32_t> slot_mapping(tokens);
           for (int32_t s = 0; s < num_seqs; ++s) {
             for (int32_t t = query_start[s]; t < query_start[s + 1]; ++t) {
               slot_mapping[t] =
                   block_tables[s * blocks_per_seq + positions[t] / block_size] * block_size +
                   positions[t] % block_size;
             }
           }
           const size_t cache_floats =
               static_cast<size_t>(layout.num_blocks) * block_size * kv_heads * head_dim;
           const auto upload_cache = [&](const std::vector<float>& values) {
             return test_support::UploadAs(be, layout.dtype, as_held(values));
           };
           DeviceBuffer k_cache = upload_cache(RandomVector(cache_floats, 14));
           DeviceBuffer v_cache = upload_cache(RandomVector(cache_floats, 15));
           const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
           const std::vector<float> q = RandomVector(tokens * q_width, 16, -2, 2);
           const std::vector<float> k = as_held(RandomVector(tokens * kv_width, 17, -2, 2));
           const std::vector<float> v = as_held(RandomVector(tokens * kv_width, 18));
           const int64_t ld = q_width + 2 * kv_width + 3;
           DeviceBuffer qkv =
               Upload(be, test_support::SideBySide(
                              tokens, {{&q, q_width}, {&k, kv_width}, {&v, kv_width}}, 3));
           DeviceBuffer d_qs = Upload(be, query_start), d_cl = Upload(be, context_lens),
                        d_bt = Upload(be, block_tables), d_sm = Upload(be, slot_mapping),
                        d_pos = Upload(be, positions);
           const AttentionBatch batch{
               num_seqs,           tokens,         d_qs.as<int32_t>(), d_cl.as<int32_t>(),
               d_bt.as<int32_t>(), blocks_per_seq, d_sm.as<int32_t>(), d_pos.as<int32_t>()};
           const float* dq = qkv.as<float>();
           DeviceBuffer out = Poisoned(be, tokens * q_width);
           EXPECT_OK(be.WriteKv(dq + q_width, dq + q_width + kv_width, ld, batch, layout,
                                k_cache.data(), v_cache.data()));
           EXPECT_OK(be.PagedAttention(dq, ld, batch, layout, heads, k_cache.data(), v_cache.data(),
                                       out.as<float>()));
           return std::vector<Output>{
               {"out", Download(be, out, tokens * q_width), Tolerance::kFloat32},
               {"k_cache", DownloadAs(be, k_cache, layout.dtype, cache_floats), Tolerance::kExact}};
         }});
  }
}

// Ranks differ per segment; one segment is empty; rows 30..39 have no
// adapter; the last segment covers rows of two others again, as the
// correction for merged weights does. Columns beyond `out` and rows without
// a segment must stay as they were. Two shapes: rows a CUDA kernel reads 16
// bytes at a time (in, out multiples of 8) and rows it reads element by
// element, for each of the shrink and the expand.
void AddLoraCases(std::vector<OpCase>& cases) {
  struct Shape {
    const char* name;
    int64_t in, out, ldy;
  };
  for (const Shape& shape : {Shape{"LoraShrink_LoraExpand", 200, 150, 170},
                             Shape{"LoraShrink_LoraExpand_odd_in", 203, 160, 168}}) {
    cases.push_back(
        {shape.name, [shape](Backend& be, Backend& held_by) {
           const int64_t in = shape.in, out = shape.out, ldy = shape.ldy, tokens = 40;
           struct Spec {
             int32_t start, end, rank;
             float scale;
           };
           const std::vector<Spec> specs = {{0, 1, 16, 2.0f},    {1, 2, 4, 0.5f},
                                            {2, 2, 8, 1.0f},     {2, 22, 8, 1.0f},
                                            {22, 30, 64, -1.5f}, {3, 25, 4, -0.75f}};
           std::vector<DeviceBuffer> keep;
           std::vector<LoraSegment> segments;
           for (size_t i = 0; i < specs.size(); ++i) {
             keep.push_back(HeldLora(be, held_by, RandomVector(specs[i].rank * in, 20 + i)));
             keep.push_back(HeldLora(be, held_by, RandomVector(specs[i].rank * out, 40 + i)));
             segments.push_back({specs[i].start, specs[i].end, keep[keep.size() - 2].data(),
                                 keep.back().data(), specs[i].rank, specs[i].scale});
           }
           const int32_t num = static_cast<int32_t>(segments.size());
           const int64_t t_floats = LoraIntermediateSize(segments.data(), num);
           const std::vector<float> y0 = RandomVector(tokens * ldy, 21);
           DeviceBuffer x = Upload(be, RandomVector(tokens * in, 19));
           DeviceBuffer y = Upload(be, y0), t = Poisoned(be, t_floats);
           EXPECT_OK(be.LoraShrink(x.as<float>(), in, segments.data(), num, t.as<float>()));
           EXPECT_OK(be.LoraExpand(t.as<float>(), segments.data(), num, out, y.as<float>(), ldy));
           const std::vector<float> y_out = Download(be, y, tokens * ldy);
           for (int64_t row = 0; row < tokens; ++row) {
             for (int64_t col = out; col < ldy; ++col) {
               EXPECT_EQ(y_out[row * ldy + col], y0[row * ldy + col]);
             }
           }
           for (int64_t i = 30 * ldy; i < tokens * ldy; ++i) EXPECT_EQ(y_out[i], y0[i]);
           return std::vector<Output>{{"t", Download(be, t, t_floats), Tolerance::kFloat32},
                                      {"y", y_out, Tolerance::kFloat32}};
         }});
  }
}

// The merged copy (stored in the weight dtype) and the golden copy, which
// must be untouched; both read back through the held values.
void AddMergeCase(std::vector<OpCase>& cases) {
  cases.push_back(
      {"MergeLora", [](Backend& be, Backend& held_by) {
         const int64_t rows = 96, cols = 80;
         const int32_t rank = 12;
         const Weight base =
             HeldWeight(be, held_by, RandomVector(rows * cols, 60, -0.1f, 0.1f), rows, cols);
         DeviceBuffer a = HeldLora(be, held_by, RandomVector(rank * cols, 61, -0.1f, 0.1f));
         DeviceBuffer bt = HeldLora(be, held_by, RandomVector(rank * rows, 62, -0.1f, 0.1f));
         Weight merged;
         absl::StatusOr<DeviceBuffer> buffer =
             be.Allocate(WeightBytes(base.view.dtype, rows, cols));
         EXPECT_OK(buffer);
         if (!buffer.ok()) return std::vector<Output>{};
         merged.buffer = *std::move(buffer);
         merged.view = {merged.buffer.data(), base.view.dtype, rows, cols};
         EXPECT_OK(be.MergeLora(base.view, a.data(), bt.data(), rank, 0.7f, merged.buffer.data()));
         std::vector<Output> outputs = {{"merged", WeightValues(be, merged), Tolerance::kStored}};
         // DoRA's merge: each row of the sum scaled.
         DeviceBuffer row_scale = Upload(be, RandomVector(rows, 63, 0.5f, 1.5f));
         EXPECT_OK(be.MergeLora(base.view, a.data(), bt.data(), rank, 0.7f, merged.buffer.data(),
                                row_scale.as<float>()));
         outputs.push_back({"merged_row_scaled", WeightValues(be, merged), Tolerance::kStored});
         outputs.push_back({"base", WeightValues(be, base), Tolerance::kExact});
         return outputs;
       }});
}

// DoRA's per-adapter column scales over runs of rows of a wider output; rows
// outside every segment and columns beyond `cols` stay as they were.
void AddScaleColumnsCase(std::vector<OpCase>& cases) {
  cases.push_back({"ScaleColumns", [](Backend& be, Backend&) {
                     const int64_t cols = 70, ldy = 90, tokens = 12;
                     DeviceBuffer s1 = Upload(be, RandomVector(cols, 71, 0.5f, 1.5f));
                     DeviceBuffer s2 = Upload(be, RandomVector(cols, 72, 0.5f, 1.5f));
                     const std::vector<ColumnScaleSegment> segments = {
                         {0, 3, s1.as<float>()}, {3, 3, s2.as<float>()}, {5, 11, s2.as<float>()}};
                     DeviceBuffer y = Upload(be, RandomVector(tokens * ldy, 73));
                     EXPECT_OK(be.ScaleColumns(y.as<float>(), ldy, cols, segments.data(),
                                               static_cast<int32_t>(segments.size())));
                     return std::vector<Output>{
                         {"y", Download(be, y, tokens * ldy), Tolerance::kExact}};
                   }});
}

std::vector<OpCase> OpCases() {
  std::vector<OpCase> cases;
  AddLinearCases(cases);
  AddFusedGemmCases(cases);
  AddEmbeddingCase(cases);
  AddElementwiseCases(cases);
  AddRopeCases(cases);
  AddAttentionCases(cases);
  AddLoraCases(cases);
  AddMergeCase(cases);
  AddScaleColumnsCase(cases);
  return cases;
}

struct Param {
  BackendConfig backend;
  OpCase op;
};

std::vector<Param> Params() {
  std::vector<Param> params;
  for (const BackendConfig& backend : Backends()) {
    for (const OpCase& op : OpCases()) params.push_back({backend, op});
  }
  return params;
}

// What ctest and failure messages show of a case: its name, not its bytes.
void PrintTo(const Param& param, std::ostream* os) {
  *os << param.backend.name << "/" << param.op.name;
}

class BackendParityTest : public ::testing::TestWithParam<Param> {};

TEST_P(BackendParityTest, MatchesTheCpuReference) {
  const Param& param = GetParam();
  absl::StatusOr<std::unique_ptr<Backend>> under_test = param.backend.make();
  if (!under_test.ok()) GTEST_SKIP() << under_test.status().message();
  absl::StatusOr<std::unique_ptr<Backend>> reference = CreateCpuBackend({.num_threads = 2});
  ASSERT_OK(reference);
  Backend& be = **under_test;
  const std::vector<Output> got = param.op.run(be, be);
  const std::vector<Output> want = param.op.run(**reference, be);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(got[i].name);
    const double bound = BoundFor(got[i].tolerance, param.backend);
    const double error = RelativeError(got[i].values, want[i].values);
    if (bound == 0.0) {
      EXPECT_EQ(error, 0.0);
    } else {
      EXPECT_LE(error, bound);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(EveryOpOnEveryBackend, BackendParityTest, ::testing::ValuesIn(Params()),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return info.param.backend.name + "_" + info.param.op.name;
                         });

}  // namespace
}  // namespace loraserve::kernels
