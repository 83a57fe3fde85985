// The CPU backend with weights stored as bf16, f16 or int8 (kQ8)
// (CpuBackendOptions::weight_dtype): each op that reads weights against the
// same op over float32 weights holding the widened values (bit for bit: the
// GEMM widens as it reads and sums in the same order), and against a double
// reference over the unrounded weights within the bound the rounding of the
// weights alone implies. LoRA weights are bf16 beside narrowed weights.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/quantization.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::HasSubstr;

constexpr DType kNarrowDTypes[] = {DType::kBF16, DType::kF16, DType::kQ8};

std::vector<float> RandomFloats(size_t count, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> values(count);
  for (float& v : values) v = dist(rng);
  return values;
}

std::unique_ptr<Backend> CpuBackendOf(DType weight_dtype, int threads = 2) {
  absl::StatusOr<std::unique_ptr<Backend>> backend =
      CreateCpuBackend({.num_threads = threads, .weight_dtype = weight_dtype});
  EXPECT_OK(backend);
  return *std::move(backend);
}

DeviceBuffer UploadBytes(Backend& backend, const void* host, size_t bytes) {
  absl::StatusOr<DeviceBuffer> buffer = backend.Allocate(std::max<size_t>(bytes, 1));
  EXPECT_OK(buffer);
  EXPECT_OK(backend.CopyToDevice(buffer->data(), host, bytes));
  return *std::move(buffer);
}

template <typename T>
DeviceBuffer Upload(Backend& backend, const std::vector<T>& host) {
  return UploadBytes(backend, host.data(), host.size() * sizeof(T));
}

std::vector<float> Download(Backend& backend, const void* device, size_t count) {
  std::vector<float> host(count);
  EXPECT_OK(backend.CopyToHost(host.data(), device, count * sizeof(float)));
  return host;
}

// A [rows, cols] weight matrix as `backend` stores it.
struct Weight {
  DeviceBuffer buffer;
  WeightView view;
};

Weight UploadWeight(Backend& backend, const std::vector<float>& host, int64_t rows, int64_t cols) {
  const DType stored = backend.WeightDType(DType::kF32);
  Weight w;
  w.buffer = *backend.Allocate(WeightBytes(stored, rows, cols));
  const absl::Status status =
      backend.UploadWeight(w.buffer.data(), host.data(), DType::kF32, rows, cols);
  EXPECT_OK(status);
  w.view = {w.buffer.data(), stored, rows, cols};
  return w;
}

// The stored weights widened back to float32 on the host.
std::vector<float> Widened(Backend& backend, const WeightView& w) {
  const int64_t row_bytes = WeightRowBytes(w.dtype, w.cols);
  std::vector<char> bytes(w.rows * row_bytes);
  EXPECT_OK(backend.CopyToHost(bytes.data(), w.data, bytes.size()));
  std::vector<float> out(w.rows * w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    ConvertToFloat32(bytes.data() + r * row_bytes, w.dtype, w.cols, out.data() + r * w.cols);
  }
  return out;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// The largest error one weight can have after `dtype` stores it, for a
// weight of magnitude |w| whose kQ8 group step is `q8_step`: half a unit in
// the last place (2^-8 relative for bf16, 2^-11 for f16 in its normal
// range), half a step for kQ8.
double WeightRoundingBound(DType dtype, double w, double q8_step) {
  switch (dtype) {
    case DType::kBF16:
      return std::abs(w) * std::ldexp(1.0, -8);
    case DType::kF16:
      return std::abs(w) * std::ldexp(1.0, -11) + std::ldexp(1.0, -25);
    case DType::kQ8:
      return q8_step / 2;
    case DType::kF32:
      return 0;
  }
  return 0;
}

// The kQ8 step of every weight of `w` ([rows, cols]): its group's max / 127.
std::vector<double> Q8Steps(const std::vector<float>& w, int64_t rows, int64_t cols) {
  std::vector<double> steps(w.size());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g0 = 0; g0 < cols; g0 += kQ8GroupSize) {
      const int64_t g1 = std::min(cols, g0 + kQ8GroupSize);
      double max_abs = 0;
      for (int64_t c = g0; c < g1; ++c)
        max_abs = std::max(max_abs, std::abs(double(w[r * cols + c])));
      for (int64_t c = g0; c < g1; ++c) steps[r * cols + c] = max_abs / 127;
    }
  }
  return steps;
}

TEST(CpuWeightDTypeTest, StoresEveryWeightInTheChosenDTypeAndAdaptersBesideIt) {
  EXPECT_EQ(CpuBackendOf(DType::kF32)->LoraDType(), DType::kF32);
  for (DType stored : {DType::kF32, DType::kBF16, DType::kF16, DType::kQ8}) {
    std::unique_ptr<Backend> backend = CpuBackendOf(stored);
    for (DType source : {DType::kF32, DType::kF16, DType::kBF16}) {
      EXPECT_EQ(backend->WeightDType(source), stored) << DTypeName(stored);
    }
    if (stored != DType::kF32) EXPECT_EQ(backend->LoraDType(), DType::kBF16) << DTypeName(stored);
  }
  absl::StatusOr<std::unique_ptr<Backend>> bad =
      CreateCpuBackend({.weight_dtype = static_cast<DType>(42)});
  EXPECT_THAT(bad, StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(CpuWeightDTypeTest, UploadRoundsOrQuantizesOnceFromEverySourceDType) {
  const int64_t rows = 7, cols = 300;
  const std::vector<float> host = RandomFloats(rows * cols, 1, 0.05f);
  // The same values as bf16 and f16 sources.
  std::vector<uint16_t> bf16(host.size()), f16(host.size());
  ConvertFloat32ToBf16(host.data(), host.size(), bf16.data());
  ConvertFloat32ToF16(host.data(), host.size(), f16.data());
  struct Source {
    DType dtype;
    const void* data;
  };
  for (const Source& source : {Source{DType::kF32, host.data()}, Source{DType::kBF16, bf16.data()},
                               Source{DType::kF16, f16.data()}}) {
    std::vector<float> exact(host.size());
    ConvertToFloat32(source.data, source.dtype, host.size(), exact.data());
    for (DType stored : kNarrowDTypes) {
      std::unique_ptr<Backend> backend = CpuBackendOf(stored);
      const int64_t bytes = WeightBytes(stored, rows, cols);
      DeviceBuffer out = *backend->Allocate(bytes);
      ASSERT_OK(backend->UploadWeight(out.data(), source.data, source.dtype, rows, cols));
      // What the host conversions of the widened source give.
      std::vector<char> expected(bytes);
      if (stored == DType::kQ8) {
        ASSERT_OK(QuantizeQ8Rows(exact.data(), rows, cols, expected.data()));
      } else if (stored == DType::kBF16) {
        ConvertFloat32ToBf16(exact.data(), exact.size(),
                             reinterpret_cast<uint16_t*>(expected.data()));
      } else {
        ConvertFloat32ToF16(exact.data(), exact.size(),
                            reinterpret_cast<uint16_t*>(expected.data()));
      }
      std::vector<char> got(bytes);
      ASSERT_OK(backend->CopyToHost(got.data(), out.data(), bytes));
      EXPECT_EQ(got, expected) << DTypeName(source.dtype) << " -> " << DTypeName(stored);
    }
  }
}

TEST(CpuWeightDTypeTest, UploadRefusesANonFiniteWeightToQuantize) {
  std::unique_ptr<Backend> backend = CpuBackendOf(DType::kQ8);
  std::vector<float> host(4 * 64, 0.1f);
  host[2 * 64 + 5] = INFINITY;
  DeviceBuffer out = *backend->Allocate(WeightBytes(DType::kQ8, 4, 64));
  const absl::Status status = backend->UploadWeight(out.data(), host.data(), DType::kF32, 4, 64);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("not finite"));
  EXPECT_THAT(status.message(), HasSubstr("[2, 5]"));
}

struct GemmShape {
  int64_t m, n, k;
};
// m = 1 and 8 read w in place (decode), 17 and 40 pack it (prefill); k
// covers tails that are not whole vectors and partial kQ8 groups.
constexpr GemmShape kGemmShapes[] = {
    {1, 37, 1100}, {8, 64, 256}, {3, 5, 13}, {17, 33, 300}, {40, 70, 640}};

// Whether the backend's Q8 GEMM rounds x to int8 too (GemmIsa::kAvx512Vnni).
bool Q8RoundsActivations() { return BestGemmIsa() == GemmIsa::kAvx512Vnni; }

// The instruction sets this CPU runs, every one of them.
std::vector<GemmIsa> Isas() {
  std::vector<GemmIsa> isas = {GemmIsa::kAvx2};
  if (BestGemmIsa() != GemmIsa::kAvx2) isas.push_back(GemmIsa::kAvx512);
  if (BestGemmIsa() == GemmIsa::kAvx512Vnni) isas.push_back(GemmIsa::kAvx512Vnni);
  return isas;
}

TEST(CpuWeightDTypeTest, LinearIsTheFloat32ProductOfTheStoredValues) {
  for (DType stored : kNarrowDTypes) {
    if (stored == DType::kQ8 && Q8RoundsActivations()) continue;  // the GEMM test below
    std::unique_ptr<Backend> narrow = CpuBackendOf(stored);
    std::unique_ptr<Backend> f32 = CpuBackendOf(DType::kF32);
    uint32_t seed = 100;
    for (const auto& [m, n, k] : kGemmShapes) {
      const std::vector<float> w_host = RandomFloats(n * k, ++seed, 0.05f);
      const std::vector<float> x_host = RandomFloats(m * k, ++seed);
      const Weight w = UploadWeight(*narrow, w_host, n, k);
      const std::vector<float> widened = Widened(*narrow, w.view);
      const Weight w_f32 = UploadWeight(*f32, widened, n, k);
      for (const bool accumulate : {false, true}) {
        const std::vector<float> y0 = RandomFloats(m * n, ++seed);
        DeviceBuffer x = Upload(*narrow, x_host), y = Upload(*narrow, y0);
        DeviceBuffer x2 = Upload(*f32, x_host), y2 = Upload(*f32, y0);
        ASSERT_OK(narrow->Linear(x.as<float>(), w.view, m, y.as<float>(), accumulate));
        ASSERT_OK(f32->Linear(x2.as<float>(), w_f32.view, m, y2.as<float>(), accumulate));
        EXPECT_TRUE(SameBits(Download(*narrow, y.data(), m * n), Download(*f32, y2.data(), m * n)))
            << DTypeName(stored) << " m=" << m << " n=" << n << " k=" << k;
      }
    }
  }
}

// On every instruction set but kAvx512Vnni, the kQ8 GEMM is the float32
// GEMM of the dequantized weights, bit for bit.
TEST(CpuWeightDTypeTest, Q8GemmWithoutVnniIsTheFloat32ProductOfTheStoredValues) {
  std::unique_ptr<Backend> backend = CpuBackendOf(DType::kQ8);
  uint32_t seed = 150;
  for (const auto& [m, n, k] : kGemmShapes) {
    const Weight w = UploadWeight(*backend, RandomFloats(n * k, ++seed, 0.05f), n, k);
    const std::vector<float> widened = Widened(*backend, w.view);
    const std::vector<float> x = RandomFloats(m * k, ++seed);
    for (const GemmIsa isa : Isas()) {
      if (isa == GemmIsa::kAvx512Vnni) continue;
      ThreadPool pool(2);
      std::vector<float> y(m * n), y_f32(m * n);
      MatMulTransposed(isa, pool, x.data(), w.view.data, DType::kQ8, m, n, k, 1.0f, false, y.data(),
                       n);
      MatMulTransposed(isa, pool, x.data(), widened.data(), DType::kF32, m, n, k, 1.0f, false,
                       y_f32.data(), n);
      EXPECT_TRUE(SameBits(y, y_f32)) << GemmIsaName(isa) << " m=" << m << " n=" << n;
    }
  }
}

// |x| / 2 of x's kQ8 step (its group's max / 127) for every element of
// `x` ([m, k]): how far the VNNI GEMM's int8 rounding moves it at most.
std::vector<double> ActivationRounding(const std::vector<float>& x, int64_t m, int64_t k) {
  std::vector<double> half_steps = Q8Steps(x, m, k);
  for (double& v : half_steps) v /= 2;
  return half_steps;
}

TEST(CpuWeightDTypeTest, LinearIsWithinTheRoundingOfTheWeights) {
  for (DType stored : kNarrowDTypes) {
    std::unique_ptr<Backend> backend = CpuBackendOf(stored);
    uint32_t seed = 200;
    for (const auto& [m, n, k] : kGemmShapes) {
      const std::vector<float> w_host = RandomFloats(n * k, ++seed, 0.05f);
      const std::vector<float> x_host = RandomFloats(m * k, ++seed);
      const std::vector<double> steps = Q8Steps(w_host, n, k);
      const bool rounds_x = stored == DType::kQ8 && Q8RoundsActivations();
      const std::vector<double> x_rounding = ActivationRounding(x_host, m, k);
      const Weight w = UploadWeight(*backend, w_host, n, k);
      DeviceBuffer x = Upload(*backend, x_host);
      DeviceBuffer y = Upload(*backend, std::vector<float>(m * n, NAN));
      ASSERT_OK(backend->Linear(x.as<float>(), w.view, m, y.as<float>(), false));
      const std::vector<float> got = Download(*backend, y.data(), m * n);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double ref = 0, rounding = 0, magnitude = 0;
          for (int64_t c = 0; c < k; ++c) {
            const double xv = x_host[i * k + c], wv = w_host[j * k + c];
            ref += xv * wv;
            magnitude += std::abs(xv * wv);
            const double w_error = WeightRoundingBound(stored, wv, steps[j * k + c]);
            rounding += std::abs(xv) * w_error;
            // With x rounded as well: |x̃w̃ - xw| <= |x|δw + (|w| + δw)δx.
            if (rounds_x) rounding += (std::abs(wv) + w_error) * x_rounding[i * k + c];
          }
          // The rounding of the weights (and with VNNI of x), plus float32
          // summation over k terms.
          const double bound = rounding + 1e-5 * magnitude;
          ASSERT_LE(std::abs(got[i * n + j] - ref), bound)
              << DTypeName(stored) << " m=" << m << " n=" << n << " k=" << k << " at " << i << ","
              << j;
        }
      }
    }
  }
}

// A row's outputs are the same bits alone and in any batch, on every ISA
// and any thread count, for every stored dtype (kQ8 on VNNI included: its
// int8 sums are exact and its float sums run in group order).
TEST(CpuWeightDTypeTest, GemmRowsDoNotDependOnTheBatch) {
  const int64_t n = 70, k = 700;
  const std::vector<GemmIsa> isas = Isas();
  for (DType stored : kNarrowDTypes) {
    std::unique_ptr<Backend> backend = CpuBackendOf(stored);
    const Weight w = UploadWeight(*backend, RandomFloats(n * k, 300, 0.05f), n, k);
    const std::vector<float> target = RandomFloats(k, 301);
    for (const GemmIsa isa : isas) {
      std::vector<float> alone(n);
      ThreadPool one(1);
      MatMulTransposed(isa, one, target.data(), w.view.data, stored, 1, n, k, 1.0f, false,
                       alone.data(), n);
      for (const int threads : {1, 2, 3}) {
        ThreadPool pool(threads);
        for (const int64_t m : {2, 8, 9, 17, 50}) {
          std::vector<float> x = RandomFloats(m * k, 302 + m);
          std::copy(target.begin(), target.end(), x.begin() + (m / 2) * k);
          std::vector<float> y(m * n);
          MatMulTransposed(isa, pool, x.data(), w.view.data, stored, m, n, k, 1.0f, false, y.data(),
                           n);
          EXPECT_EQ(std::memcmp(y.data() + (m / 2) * n, alone.data(), n * sizeof(float)), 0)
              << DTypeName(stored) << " " << GemmIsaName(isa) << " threads=" << threads
              << " m=" << m;
        }
      }
    }
  }
}

TEST(CpuWeightDTypeTest, EmbeddingWidensTheStoredRows) {
  const int64_t vocab = 50, hidden = 200;
  const std::vector<int32_t> ids = {0, 49, 7, 7, 21};
  for (DType stored : kNarrowDTypes) {
    std::unique_ptr<Backend> backend = CpuBackendOf(stored);
    const Weight table =
        UploadWeight(*backend, RandomFloats(vocab * hidden, 5, 0.05f), vocab, hidden);
    const std::vector<float> widened = Widened(*backend, table.view);
    DeviceBuffer dids = Upload(*backend, ids);
    DeviceBuffer y = Upload(*backend, std::vector<float>(ids.size() * hidden, NAN));
    ASSERT_OK(backend->Embedding(dids.as<int32_t>(), ids.size(), table.view, y.as<float>()));
    const std::vector<float> got = Download(*backend, y.data(), ids.size() * hidden);
    for (size_t i = 0; i < ids.size(); ++i) {
      for (int64_t c = 0; c < hidden; ++c) {
        ASSERT_EQ(got[i * hidden + c], widened[ids[i] * hidden + c]) << DTypeName(stored);
      }
    }
  }
}

// LoRA weights in bf16 (LoraDType) give exactly the float32 LoRA terms of
// the bf16-rounded adapter.
TEST(CpuWeightDTypeTest, Bf16LoraIsTheFloat32LoraOfTheRoundedAdapter) {
  const int64_t tokens = 9, in = 300, out = 150;
  const int32_t rank = 8;
  std::vector<float> a = RandomFloats(rank * in, 11, 0.05f);
  std::vector<float> bt = RandomFloats(rank * out, 12, 0.05f);
  std::vector<uint16_t> a16(a.size()), bt16(bt.size());
  ConvertFloat32ToBf16(a.data(), a.size(), a16.data());
  ConvertFloat32ToBf16(bt.data(), bt.size(), bt16.data());
  ConvertToFloat32(a16.data(), DType::kBF16, a.size(), a.data());
  ConvertToFloat32(bt16.data(), DType::kBF16, bt.size(), bt.data());
  const std::vector<float> x = RandomFloats(tokens * in, 13);
  const std::vector<float> y0 = RandomFloats(tokens * out, 14);

  const auto run = [&](Backend& backend, const void* a_host, const void* bt_host, size_t elem) {
    DeviceBuffer da = UploadBytes(backend, a_host, a.size() * elem);
    DeviceBuffer dbt = UploadBytes(backend, bt_host, bt.size() * elem);
    DeviceBuffer dx = Upload(backend, x), dy = Upload(backend, y0);
    DeviceBuffer dt = Upload(backend, std::vector<float>(tokens * rank, NAN));
    // Two segments, the second covering rows the first does (as a merged
    // step's correction does).
    const LoraSegment segments[] = {{0, 6, da.data(), dbt.data(), rank, 0.5f},
                                    {4, 9, da.data(), dbt.data(), rank, -1.5f}};
    std::vector<float> t(LoraIntermediateSize(segments, 2));
    dt = Upload(backend, t);
    EXPECT_OK(backend.LoraShrink(dx.as<float>(), in, segments, 2, dt.as<float>()));
    EXPECT_OK(backend.LoraExpand(dt.as<float>(), segments, 2, out, dy.as<float>(), out));
    return Download(backend, dy.data(), tokens * out);
  };
  std::unique_ptr<Backend> bf16 = CpuBackendOf(DType::kBF16);
  std::unique_ptr<Backend> f32 = CpuBackendOf(DType::kF32);
  ASSERT_EQ(bf16->LoraDType(), DType::kBF16);
  EXPECT_TRUE(SameBits(run(*bf16, a16.data(), bt16.data(), 2), run(*f32, a.data(), bt.data(), 4)));
}

// A merged copy keeps the base's dtype: base widened, plus scale · Bᵀᵀ · A,
// rounded (or quantized again with the merged rows' own scales) once.
TEST(CpuWeightDTypeTest, MergeLoraStoresTheMergedWeightsInTheBaseDType) {
  const int64_t rows = 37, cols = 300;
  const int32_t rank = 5;
  const float lora_scale = 0.75f;
  for (DType stored : kNarrowDTypes) {
    std::unique_ptr<Backend> backend = CpuBackendOf(stored);
    const Weight base = UploadWeight(*backend, RandomFloats(rows * cols, 21, 0.05f), rows, cols);
    const std::vector<float> base_before = Widened(*backend, base.view);
    std::vector<float> a = RandomFloats(rank * cols, 22, 0.1f);
    std::vector<float> bt = RandomFloats(rank * rows, 23, 0.1f);
    std::vector<uint16_t> a16(a.size()), bt16(bt.size());
    ConvertFloat32ToBf16(a.data(), a.size(), a16.data());
    ConvertFloat32ToBf16(bt.data(), bt.size(), bt16.data());
    ConvertToFloat32(a16.data(), DType::kBF16, a.size(), a.data());
    ConvertToFloat32(bt16.data(), DType::kBF16, bt.size(), bt.data());
    DeviceBuffer da = Upload(*backend, a16), dbt = Upload(*backend, bt16);
    Weight merged;
    merged.buffer = *backend->Allocate(WeightBytes(stored, rows, cols));
    merged.view = {merged.buffer.data(), stored, rows, cols};
    ASSERT_OK(backend->MergeLora(base.view, da.data(), dbt.data(), rank, lora_scale,
                                 merged.buffer.data()));
    std::vector<float> exact(rows * cols);
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        double sum = 0;
        for (int32_t r = 0; r < rank; ++r) sum += double(bt[r * rows + i]) * a[r * cols + j];
        exact[i * cols + j] = static_cast<float>(base_before[i * cols + j] + lora_scale * sum);
      }
    }
    const std::vector<double> steps = Q8Steps(exact, rows, cols);
    const std::vector<float> got = Widened(*backend, merged.view);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_LE(std::abs(got[i] - exact[i]),
                WeightRoundingBound(stored, exact[i], steps[i]) * (1 + 1e-5) + 1e-7)
          << DTypeName(stored) << " at " << i;
    }
    EXPECT_TRUE(SameBits(Widened(*backend, base.view), base_before)) << DTypeName(stored);
  }
}

}  // namespace
}  // namespace loraserve::kernels
