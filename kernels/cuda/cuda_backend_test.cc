// Every operation of the CUDA backend against the CPU backend on seeded random
// inputs, then whole forward passes of the shared model (base, mixed adapter
// batches, merged weights) against the CPU. Outputs are poisoned with NaN
// before each run; errors are relative (‖cuda − cpu‖ / ‖cpu‖) with bounds per
// weight dtype: float32 far under 1e-3, bf16 operands under 1e-2. NaN never
// passes. Without a GPU (or without CUDA in the build) every case skips and
// says why.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/device_adapter.h"
#include "formats/model_config.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"
#include "tests/support/forward_harness.h"
#include "tests/support/golden_cases.h"
#include "tests/support/side_by_side.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::StatusIs;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Relative error bounds: float32 everywhere, or bf16 GEMM operands.
constexpr double kF32Bound = 1e-5;
constexpr double kBf16Bound = 1e-2;
// Whole forward passes with bf16 weights against the float32 CPU: every GEMM
// rounds its weights (2^-9) and its input rows to bf16, layer after layer.
// A first estimate, to be confirmed by the first GPU run.
constexpr double kBf16ModelBound = 3e-2;
// Whole forward passes in float32 on both sides: only summation order differs.
constexpr double kF32ModelBound = 1e-4;

// ‖a − ref‖ / ‖ref‖; infinity when any element of `a` is not finite.
double RelativeError(const std::vector<float>& a, const std::vector<float>& ref) {
  EXPECT_EQ(a.size(), ref.size());
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < a.size() && i < ref.size(); ++i) {
    if (!std::isfinite(a[i])) return std::numeric_limits<double>::infinity();
    diff += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// The bfloat16 bits of `v`, rounded to nearest (ties to even) as the CUDA
// uploads round.
std::vector<uint16_t> Bf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> bits(v.size());
  ConvertFloat32ToBf16(v.data(), static_cast<int64_t>(v.size()), bits.data());
  return bits;
}

// `v` rounded to bfloat16 and widened back: what the GPU holds, for the CPU.
std::vector<float> RoundToBf16(const std::vector<float>& v) {
  const std::vector<uint16_t> bits = Bf16Bits(v);
  std::vector<float> rounded(v.size());
  ConvertToFloat32(bits.data(), DType::kBF16, static_cast<int64_t>(v.size()), rounded.data());
  return rounded;
}

// A buffer on `backend` holding `host`.
template <typename T>
DeviceBuffer Upload(Backend& backend, const std::vector<T>& host) {
  absl::StatusOr<DeviceBuffer> buffer = backend.Allocate(host.size() * sizeof(T));
  EXPECT_OK(buffer);
  EXPECT_OK(backend.CopyToDevice(buffer->data(), host.data(), host.size() * sizeof(T)));
  return std::move(*buffer);
}

// `count` NaNs on `backend`: an output that must be written in full.
DeviceBuffer Poisoned(Backend& backend, size_t count) {
  return Upload(backend, std::vector<float>(count, kNaN));
}

std::vector<float> Download(Backend& backend, const DeviceBuffer& buffer, size_t count) {
  std::vector<float> host(count);
  absl::Status status = backend.CopyToHost(host.data(), buffer.data(), count * sizeof(float));
  EXPECT_OK(status);
  return host;
}

// `count` bfloat16 values from `buffer`, widened to float32.
std::vector<float> DownloadBf16(Backend& backend, const DeviceBuffer& buffer, size_t count) {
  std::vector<uint16_t> bits(count);
  absl::Status status = backend.CopyToHost(bits.data(), buffer.data(), count * sizeof(uint16_t));
  EXPECT_OK(status);
  std::vector<float> host(count);
  ConvertToFloat32(bits.data(), DType::kBF16, static_cast<int64_t>(count), host.data());
  return host;
}

// A weight matrix uploaded through the backend's own conversion.
struct Weight {
  DeviceBuffer buffer;
  WeightView view;
};

Weight UploadWeight(Backend& backend, const std::vector<float>& host, int64_t rows, int64_t cols) {
  const DType stored = backend.WeightDType(DType::kF32);
  Weight w;
  w.buffer = *backend.Allocate(WeightBytes(stored, rows, cols));
  absl::Status status = backend.UploadWeight(w.buffer.data(), host.data(), DType::kF32, rows, cols);
  EXPECT_OK(status);
  w.view = {w.buffer.data(), stored, rows, cols};
  return w;
}

// One CUDA backend under test with the bound its weight dtype earns.
struct CudaCase {
  std::string name;
  std::unique_ptr<Backend> backend;
  double bound;
  bool bf16;
};

class CudaBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> bf16 = CreateCudaBackend({});
    if (!bf16.ok()) GTEST_SKIP() << bf16.status().message();
    absl::StatusOr<std::unique_ptr<Backend>> f32 = CreateCudaBackend({.weight_dtype = DType::kF32});
    ASSERT_OK(f32);
    cases_.push_back({"bf16", std::move(*bf16), kBf16Bound, true});
    cases_.push_back({"f32", std::move(*f32), kF32Bound, false});
    absl::StatusOr<std::unique_ptr<Backend>> cpu = CreateCpuBackend({.num_threads = 2});
    ASSERT_OK(cpu);
    cpu_ = std::move(*cpu);
  }

  // Weights (or LoRA matrices) as the CUDA case stores them, in float32 for
  // the CPU reference.
  static std::vector<float> AsStored(const CudaCase& c, const std::vector<float>& w) {
    return c.bf16 ? RoundToBf16(w) : w;
  }

  // LoRA matrices on `backend` in its LoraDType().
  static DeviceBuffer UploadLora(Backend& backend, const std::vector<float>& host) {
    return backend.LoraDType() == DType::kBF16 ? Upload(backend, Bf16Bits(host))
                                               : Upload(backend, host);
  }

  std::vector<CudaCase> cases_;
  std::unique_ptr<Backend> cpu_;
};

TEST_F(CudaBackendTest, LinearMatchesCpu) {
  const int64_t n = 96, k = 160;
  const std::vector<float> w_host = RandomVector(n * k, 1, -0.1f, 0.1f);
  for (CudaCase& c : cases_) {
    Backend& cuda = *c.backend;
    const Weight w = UploadWeight(cuda, w_host, n, k);
    const Weight w_cpu = UploadWeight(*cpu_, AsStored(c, w_host), n, k);
    for (const int64_t m : {1, 7, 64, 300}) {
      for (const bool accumulate : {false, true}) {
        SCOPED_TRACE(c.name + " m=" + std::to_string(m) + (accumulate ? " accumulate" : ""));
        const std::vector<float> x = RandomVector(m * k, 2 + m);
        const std::vector<float> y0 = RandomVector(m * n, 3 + m);
        DeviceBuffer x_gpu = Upload(cuda, x), x_cpu = Upload(*cpu_, x);
        DeviceBuffer y_gpu = accumulate ? Upload(cuda, y0) : Poisoned(cuda, m * n);
        DeviceBuffer y_cpu = Upload(*cpu_, y0);
        ASSERT_OK(cuda.Linear(x_gpu.as<float>(), w.view, m, y_gpu.as<float>(), accumulate));
        ASSERT_OK(cpu_->Linear(x_cpu.as<float>(), w_cpu.view, m, y_cpu.as<float>(), accumulate));
        EXPECT_LE(RelativeError(Download(cuda, y_gpu, m * n), Download(*cpu_, y_cpu, m * n)),
                  c.bound);
      }
    }
  }
}

// The fused norm + projection equals RmsNorm then Linear on the same backend
// exactly (the norm writes the same bf16 operand the conversion would), and
// the CPU within the GEMM's bound.
TEST_F(CudaBackendTest, RmsNormLinearMatchesNormThenLinear) {
  const int64_t dim = 160, rows = 96;
  const float eps = 1e-5f;
  const std::vector<float> w_host = RandomVector(rows * dim, 5, -0.1f, 0.1f);
  const std::vector<float> norm = RandomVector(dim, 6, 0.5f, 1.5f);
  for (CudaCase& c : cases_) {
    Backend& cuda = *c.backend;
    const Weight w = UploadWeight(cuda, w_host, rows, dim);
    const Weight w_cpu = UploadWeight(*cpu_, AsStored(c, w_host), rows, dim);
    DeviceBuffer norm_gpu = Upload(cuda, norm), norm_cpu = Upload(*cpu_, norm);
    for (const int64_t n : {1, 7, 64}) {
      SCOPED_TRACE(c.name + " n=" + std::to_string(n));
      const std::vector<float> x = RandomVector(n * dim, 7 + n);
      DeviceBuffer x_gpu = Upload(cuda, x), x_cpu = Upload(*cpu_, x);
      DeviceBuffer h_fused = Poisoned(cuda, n * dim), y_fused = Poisoned(cuda, n * rows);
      ASSERT_OK(cuda.RmsNormLinear(x_gpu.as<float>(), norm_gpu.as<float>(), n, dim, eps,
                                   h_fused.as<float>(), w.view, y_fused.as<float>()));
      DeviceBuffer h = Poisoned(cuda, n * dim), y = Poisoned(cuda, n * rows);
      ASSERT_OK(cuda.RmsNorm(x_gpu.as<float>(), norm_gpu.as<float>(), n, dim, eps, h.as<float>()));
      ASSERT_OK(cuda.Linear(h.as<float>(), w.view, n, y.as<float>(), false));
      const std::vector<float> fused = Download(cuda, y_fused, n * rows);
      EXPECT_EQ(Download(cuda, h_fused, n * dim), Download(cuda, h, n * dim));
      EXPECT_EQ(fused, Download(cuda, y, n * rows));
      DeviceBuffer h_cpu = Poisoned(*cpu_, n * dim), y_cpu = Poisoned(*cpu_, n * rows);
      ASSERT_OK(cpu_->RmsNormLinear(x_cpu.as<float>(), norm_cpu.as<float>(), n, dim, eps,
                                    h_cpu.as<float>(), w_cpu.view, y_cpu.as<float>()));
      EXPECT_LE(RelativeError(Download(cuda, h_fused, n * dim), Download(*cpu_, h_cpu, n * dim)),
                kF32Bound);
      EXPECT_LE(RelativeError(fused, Download(*cpu_, y_cpu, n * rows)), c.bound);
      // In place (h = x), as the model's final norm runs.
      DeviceBuffer in_place = Upload(cuda, x), y_in_place = Poisoned(cuda, n * rows);
      ASSERT_OK(cuda.RmsNormLinear(in_place.as<float>(), norm_gpu.as<float>(), n, dim, eps,
                                   in_place.as<float>(), w.view, y_in_place.as<float>()));
      EXPECT_EQ(Download(cuda, in_place, n * dim), Download(cuda, h_fused, n * dim));
      EXPECT_EQ(Download(cuda, y_in_place, n * rows), fused);
    }
    DeviceBuffer x = Upload(cuda, std::vector<float>(dim, 1.0f)), out = Poisoned(cuda, dim + rows);
    EXPECT_OK(cuda.RmsNormLinear(x.as<float>(), norm_gpu.as<float>(), 0, dim, eps, out.as<float>(),
                                 w.view, out.as<float>() + dim));
    const absl::Status status =
        cuda.RmsNormLinear(x.as<float>(), norm_gpu.as<float>(), 1, dim - 1, eps, out.as<float>(),
                           w.view, out.as<float>() + dim);
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument)) << status;
  }
}

// The fused gate + down projection (accumulating, as the model uses it)
// equals SiluMul then Linear on the same backend exactly, and the CPU within
// the GEMM's bound.
TEST_F(CudaBackendTest, SiluMulLinearMatchesGateThenLinear) {
  const int64_t dim = 144, rows = 80;
  const std::vector<float> w_host = RandomVector(rows * dim, 8, -0.1f, 0.1f);
  for (CudaCase& c : cases_) {
    Backend& cuda = *c.backend;
    const Weight w = UploadWeight(cuda, w_host, rows, dim);
    const Weight w_cpu = UploadWeight(*cpu_, AsStored(c, w_host), rows, dim);
    for (const int64_t n : {1, 7, 64}) {
      SCOPED_TRACE(c.name + " n=" + std::to_string(n));
      const std::vector<float> gate_up = RandomVector(n * 2 * dim, 9 + n, -3.0f, 3.0f);
      const std::vector<float> y0 = RandomVector(n * rows, 10 + n);
      DeviceBuffer g_gpu = Upload(cuda, gate_up), g_cpu = Upload(*cpu_, gate_up);
      DeviceBuffer act_fused = Poisoned(cuda, n * dim), y_fused = Upload(cuda, y0);
      ASSERT_OK(cuda.SiluMulLinear(g_gpu.as<float>(), n, dim, act_fused.as<float>(), w.view,
                                   y_fused.as<float>(), /*accumulate=*/true));
      DeviceBuffer act = Poisoned(cuda, n * dim), y = Upload(cuda, y0);
      ASSERT_OK(cuda.SiluMul(g_gpu.as<float>(), n, dim, act.as<float>()));
      ASSERT_OK(cuda.Linear(act.as<float>(), w.view, n, y.as<float>(), true));
      const std::vector<float> fused = Download(cuda, y_fused, n * rows);
      EXPECT_EQ(Download(cuda, act_fused, n * dim), Download(cuda, act, n * dim));
      EXPECT_EQ(fused, Download(cuda, y, n * rows));
      DeviceBuffer act_cpu = Poisoned(*cpu_, n * dim), y_cpu = Upload(*cpu_, y0);
      ASSERT_OK(cpu_->SiluMulLinear(g_cpu.as<float>(), n, dim, act_cpu.as<float>(), w_cpu.view,
                                    y_cpu.as<float>(), true));
      EXPECT_LE(
          RelativeError(Download(cuda, act_fused, n * dim), Download(*cpu_, act_cpu, n * dim)),
          kF32Bound);
      EXPECT_LE(RelativeError(fused, Download(*cpu_, y_cpu, n * rows)), c.bound);
    }
    DeviceBuffer g = Upload(cuda, std::vector<float>(2 * dim, 1.0f));
    DeviceBuffer out = Poisoned(cuda, dim + rows);
    const absl::Status status = cuda.SiluMulLinear(g.as<float>(), 1, dim - 2, out.as<float>(),
                                                   w.view, out.as<float>() + dim, false);
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument)) << status;
  }
}

TEST_F(CudaBackendTest, Bf16AndF16WeightsStayInTheirDtype) {
  CudaCase& c = cases_[0];
  EXPECT_EQ(c.backend->WeightDType(DType::kF32), DType::kBF16);
  EXPECT_EQ(c.backend->WeightDType(DType::kBF16), DType::kBF16);
  EXPECT_EQ(c.backend->WeightDType(DType::kF16), DType::kF16);
  EXPECT_EQ(cases_[1].backend->WeightDType(DType::kBF16), DType::kF32);
  // The KV cache follows: bf16, or float32 for exact comparisons.
  EXPECT_EQ(c.backend->KvCacheDType(), DType::kBF16);
  EXPECT_EQ(cases_[1].backend->KvCacheDType(), DType::kF32);
  // So do adapters.
  EXPECT_EQ(c.backend->LoraDType(), DType::kBF16);
  EXPECT_EQ(cases_[1].backend->LoraDType(), DType::kF32);
  // F16 source weights: upload halves, compare a GEMM with the CPU on the same halves.
  const int64_t n = 33, k = 70, m = 5;
  const std::vector<float> w_host = RandomVector(n * k, 4, -0.5f, 0.5f);
  std::vector<uint16_t> halves(w_host.size());
  for (size_t i = 0; i < halves.size(); ++i) {
    halves[i] = _cvtss_sh(w_host[i], _MM_FROUND_TO_NEAREST_INT);
  }
  std::vector<float> w_exact(halves.size());
  ConvertToFloat32(halves.data(), DType::kF16, static_cast<int64_t>(halves.size()), w_exact.data());
  DeviceBuffer w_gpu = *c.backend->Allocate(halves.size() * 2);
  ASSERT_OK(c.backend->UploadWeight(w_gpu.data(), halves.data(), DType::kF16, n, k));
  const Weight w_cpu = UploadWeight(*cpu_, w_exact, n, k);
  const std::vector<float> x = RandomVector(m * k, 5);
  DeviceBuffer x_gpu = Upload(*c.backend, x), x_cpu = Upload(*cpu_, x);
  DeviceBuffer y_gpu = Poisoned(*c.backend, m * n), y_cpu = Poisoned(*cpu_, m * n);
  ASSERT_OK(c.backend->Linear(x_gpu.as<float>(), {w_gpu.data(), DType::kF16, n, k}, m,
                              y_gpu.as<float>(), false));
  ASSERT_OK(cpu_->Linear(x_cpu.as<float>(), w_cpu.view, m, y_cpu.as<float>(), false));
  // Only x is rounded (to f16, 11 bits): well under the bf16 bound.
  EXPECT_LE(RelativeError(Download(*c.backend, y_gpu, m * n), Download(*cpu_, y_cpu, m * n)), 2e-3);
}

// An asynchronous upload (more than two staging chunks) is seen by the next
// operation, and its source may be overwritten as soon as the call returns.
TEST_F(CudaBackendTest, AsyncCopiesLandBeforeLaterOperations) {
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    Backend& be = *c.backend;
    const size_t n = (size_t{20} << 20) / sizeof(float) + 123;
    std::vector<float> host = RandomVector(n, 5);
    const std::vector<float> expected = host;
    absl::StatusOr<DeviceBuffer> dst = be.Allocate(n * sizeof(float));
    ASSERT_OK(dst);
    ASSERT_OK(be.CopyToDeviceAsync(dst->data(), host.data(), n * sizeof(float)));
    std::fill(host.begin(), host.end(), kNaN);
    ASSERT_OK(be.Add(dst->as<float>(), dst->as<float>(), static_cast<int64_t>(n)));
    std::vector<float> back(n, kNaN);
    ASSERT_OK(be.CopyToHost(back.data(), dst->data(), n * sizeof(float)));
    size_t wrong = 0;
    for (size_t i = 0; i < n; ++i) wrong += back[i] != 2.0f * expected[i];
    EXPECT_EQ(wrong, 0u);
  }
}

TEST_F(CudaBackendTest, EmbeddingGathersStoredRows) {
  const int64_t vocab = 50, hidden = 72;
  const std::vector<float> table = RandomVector(vocab * hidden, 6);
  const std::vector<int32_t> ids = {0, 49, 3, 3, 17, 25, 48};
  const int64_t n = static_cast<int64_t>(ids.size());
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    const Weight t_gpu = UploadWeight(*c.backend, table, vocab, hidden);
    const Weight t_cpu = UploadWeight(*cpu_, AsStored(c, table), vocab, hidden);
    DeviceBuffer ids_gpu = Upload(*c.backend, ids), ids_cpu = Upload(*cpu_, ids);
    DeviceBuffer y_gpu = Poisoned(*c.backend, n * hidden), y_cpu = Poisoned(*cpu_, n * hidden);
    ASSERT_OK(c.backend->Embedding(ids_gpu.as<int32_t>(), n, t_gpu.view, y_gpu.as<float>()));
    ASSERT_OK(cpu_->Embedding(ids_cpu.as<int32_t>(), n, t_cpu.view, y_cpu.as<float>()));
    // A gather of stored values is exact.
    EXPECT_EQ(
        RelativeError(Download(*c.backend, y_gpu, n * hidden), Download(*cpu_, y_cpu, n * hidden)),
        0.0);
  }
}

TEST_F(CudaBackendTest, BadTokenIdIsReportedAndTheBackendCarriesOn) {
  Backend& cuda = *cases_[0].backend;
  const Weight table = UploadWeight(cuda, RandomVector(10 * 8, 7), 10, 8);
  DeviceBuffer ids = Upload(cuda, std::vector<int32_t>{1, 10});
  DeviceBuffer y = Poisoned(cuda, 2 * 8);
  ASSERT_OK(cuda.Embedding(ids.as<int32_t>(), 2, table.view, y.as<float>()));
  const absl::Status status = cuda.Synchronize();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange)) << status;
  EXPECT_NE(status.message().find("Embedding"), absl::string_view::npos) << status;
  // The error was reported once; the context is intact.
  EXPECT_OK(cuda.Synchronize());
  const std::vector<float> out = Download(cuda, y, 2 * 8);
  EXPECT_TRUE(std::isfinite(out[0]));
  EXPECT_TRUE(std::isnan(out[8]));
}

TEST_F(CudaBackendTest, ElementwiseOpsMatchCpu) {
  const int64_t n = 13, dim = 300;
  const std::vector<float> x = RandomVector(n * dim, 8);
  const std::vector<float> other = RandomVector(n * dim, 9);
  const std::vector<float> weight = RandomVector(dim, 10, 0.5f, 1.5f);
  const std::vector<float> gate_up = RandomVector(n * 2 * dim, 11, -6.0f, 6.0f);
  Backend& cuda = *cases_[0].backend;  // no weights involved: float32 throughout
  // Runs `op` on both backends with inputs [x, other, weight, gate_up] and the
  // output buffer (initialised to `init`, NaN when null) and compares outputs.
  const auto check = [&](const char* name, size_t out_count, const std::vector<float>* init,
                         auto op) {
    SCOPED_TRACE(name);
    std::vector<float> results[2];
    Backend* backends[2] = {&cuda, cpu_.get()};
    for (int b = 0; b < 2; ++b) {
      Backend& be = *backends[b];
      DeviceBuffer bx = Upload(be, x), bo = Upload(be, other), bw = Upload(be, weight),
                   bg = Upload(be, gate_up);
      DeviceBuffer out = init ? Upload(be, *init) : Poisoned(be, out_count);
      ASSERT_OK(
          op(be, bx.as<float>(), bo.as<float>(), bw.as<float>(), bg.as<float>(), out.as<float>()));
      results[b] = Download(be, out, out_count);
    }
    EXPECT_LE(RelativeError(results[0], results[1]), kF32Bound);
  };
  check("RmsNorm", n * dim, nullptr,
        [&](Backend& be, float* bx, float*, float* bw, float*, float* out) {
          return be.RmsNorm(bx, bw, n, dim, 1e-5f, out);
        });
  check("RmsNorm in place", n * dim, &x,
        [&](Backend& be, float*, float*, float* bw, float*, float* out) {
          return be.RmsNorm(out, bw, n, dim, 1e-6f, out);
        });
  check("Add", n * dim, &x, [&](Backend& be, float*, float* bo, float*, float*, float* out) {
    return be.Add(out, bo, n * dim);
  });
  check("AddBias", n * dim, &x, [&](Backend& be, float*, float*, float* bw, float*, float* out) {
    return be.AddBias(out, bw, n, dim);
  });
  check("SiluMul", n * dim, nullptr,
        [&](Backend& be, float*, float*, float*, float* bg, float* out) {
          return be.SiluMul(bg, n, dim, out);
        });
  check("CopyOnDevice", n * dim, nullptr,
        [&](Backend& be, float* bx, float*, float*, float*, float* out) {
          return be.CopyOnDevice(out, bx, n * dim * sizeof(float));
        });
}

TEST_F(CudaBackendTest, RopeMatchesCpu) {
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
  // The GPU reads q and k side by side in one buffer, as the model's fused
  // q|k|v rows hold them (with NaN columns after); the CPU separately.
  const std::vector<float> fused =
      test_support::SideBySide(tokens, {{&q, q_width}, {&k, k_width}}, 5);
  const int64_t ld = q_width + k_width + 5;
  for (const float scaling : {1.0f, 0.75f}) {
    std::vector<float> out_q[2], out_k[2];
    {
      Backend& be = *cases_[0].backend;
      DeviceBuffer bqk = Upload(be, fused), bp = Upload(be, positions), bf = Upload(be, inv_freq);
      ASSERT_OK(be.Rope(bqk.as<float>(), ld, bqk.as<float>() + q_width, ld, bp.as<int32_t>(),
                        tokens, heads, kv_heads, {bf.as<float>(), head_dim, scaling}));
      const std::vector<float> rotated = Download(be, bqk, fused.size());
      out_q[0] = test_support::ColumnSlice(rotated, tokens, ld, 0, q_width);
      out_k[0] = test_support::ColumnSlice(rotated, tokens, ld, q_width, k_width);
      for (int64_t t = 0; t < tokens; ++t) EXPECT_TRUE(std::isnan(rotated[t * ld + ld - 1]));
    }
    {
      Backend& be = *cpu_;
      DeviceBuffer bq = Upload(be, q), bk = Upload(be, k), bp = Upload(be, positions),
                   bf = Upload(be, inv_freq);
      ASSERT_OK(be.Rope(bq.as<float>(), q_width, bk.as<float>(), k_width, bp.as<int32_t>(), tokens,
                        heads, kv_heads, {bf.as<float>(), head_dim, scaling}));
      out_q[1] = Download(be, bq, q.size());
      out_k[1] = Download(be, bk, k.size());
    }
    // Angles up to 32000 rad: cos/sin of the same float32 angle, both accurate.
    EXPECT_LE(RelativeError(out_q[0], out_q[1]), kF32Bound);
    EXPECT_LE(RelativeError(out_k[0], out_k[1]), kF32Bound);
  }
}

// Three sequences in one step: a fresh prefill, a decode over a long cached
// context, and a chunk of a prefill whose start is cached; grouped-query heads.
// The GPU reads q, k and v from fused q|k|v rows, the CPU from separate
// buffers. With a bf16 cache on the GPU, the CPU gets the same values rounded
// to bf16 (the history, and the keys and values WriteKv rounds): then both
// caches hold the same numbers and attention agrees to float32 accuracy.
TEST_F(CudaBackendTest, WriteKvAndPagedAttentionMatchCpu) {
  for (const DType cache_dtype : {DType::kF32, DType::kBF16}) {
    for (const int32_t head_dim : {32, 64, 128, 256}) {
      SCOPED_TRACE(absl::StrCat(DTypeName(cache_dtype), " cache, head_dim ", head_dim));
      const bool bf16 = cache_dtype == DType::kBF16;
      const auto as_cached = [&](const std::vector<float>& v) { return bf16 ? RoundToBf16(v) : v; };
      const int32_t heads = 8, kv_heads = 2, block_size = 16, blocks_per_seq = 20;
      const int32_t num_seqs = 3;
      const std::vector<int32_t> query_start = {0, 5, 6, 10};
      const std::vector<int32_t> context_lens = {5, 300, 24};
      const std::vector<int32_t> positions = {0, 1, 2, 3, 4, 299, 20, 21, 22, 23};
      const int32_t tokens = 10;
      const KvLayout cpu_layout{num_seqs * blocks_per_seq, block_size, kv_heads, head_dim};
      KvLayout gpu_layout = cpu_layout;
      gpu_layout.dtype = cache_dtype;
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
          static_cast<size_t>(cpu_layout.num_blocks) * block_size * kv_heads * head_dim;
      // The cache starts full of random history (earlier steps' keys and values).
      const std::vector<float> k_cache = as_cached(RandomVector(cache_floats, 14));
      const std::vector<float> v_cache = as_cached(RandomVector(cache_floats, 15));
      const std::vector<float> q = RandomVector(tokens * heads * head_dim, 16, -2.0f, 2.0f);
      const std::vector<float> k = RandomVector(tokens * kv_heads * head_dim, 17, -2.0f, 2.0f);
      const std::vector<float> v = RandomVector(tokens * kv_heads * head_dim, 18);
      const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
      const std::vector<float> qkv =
          test_support::SideBySide(tokens, {{&q, q_width}, {&k, kv_width}, {&v, kv_width}}, 3);
      const int64_t ld = q_width + 2 * kv_width + 3;
      std::vector<float> out[2], kc[2];
      Backend* backends[2] = {cases_[0].backend.get(), cpu_.get()};
      for (int b = 0; b < 2; ++b) {
        Backend& be = *backends[b];
        const bool gpu = b == 0;
        DeviceBuffer bqs = Upload(be, query_start), bcl = Upload(be, context_lens),
                     bbt = Upload(be, block_tables), bsm = Upload(be, slot_mapping),
                     bpos = Upload(be, positions);
        DeviceBuffer bkc = gpu && bf16 ? Upload(be, Bf16Bits(k_cache)) : Upload(be, k_cache);
        DeviceBuffer bvc = gpu && bf16 ? Upload(be, Bf16Bits(v_cache)) : Upload(be, v_cache);
        DeviceBuffer bq, bk, bv;
        const float *dq, *dk, *dv;
        int64_t q_ld, kv_ld;
        if (gpu) {
          bq = Upload(be, qkv);
          dq = bq.as<float>();
          dk = dq + q_width;
          dv = dk + kv_width;
          q_ld = kv_ld = ld;
        } else {
          bq = Upload(be, q), bk = Upload(be, as_cached(k)), bv = Upload(be, as_cached(v));
          dq = bq.as<float>(), dk = bk.as<float>(), dv = bv.as<float>();
          q_ld = q_width;
          kv_ld = kv_width;
        }
        const KvLayout& layout = gpu ? gpu_layout : cpu_layout;
        DeviceBuffer bout = Poisoned(be, tokens * heads * head_dim);
        const AttentionBatch batch{
            num_seqs,          tokens,         bqs.as<int32_t>(), bcl.as<int32_t>(),
            bbt.as<int32_t>(), blocks_per_seq, bsm.as<int32_t>(), bpos.as<int32_t>()};
        ASSERT_OK(be.WriteKv(dk, dv, kv_ld, batch, layout, bkc.data(), bvc.data()));
        ASSERT_OK(be.PagedAttention(dq, q_ld, batch, layout, heads, bkc.data(), bvc.data(),
                                    bout.as<float>()));
        out[b] = Download(be, bout, tokens * heads * head_dim);
        kc[b] = gpu && bf16 ? DownloadBf16(be, bkc, cache_floats) : Download(be, bkc, cache_floats);
      }
      EXPECT_EQ(RelativeError(kc[0], kc[1]), 0.0);
      EXPECT_LE(RelativeError(out[0], out[1]), kF32Bound);
    }
  }
}

TEST_F(CudaBackendTest, LoraShrinkExpandMatchCpu) {
  const int64_t in = 200, out = 150, ldy = 170, tokens = 40;
  // Ranks differ per segment; one segment is empty; rows 30..39 have no
  // adapter. The last segment covers rows of two others again, as the
  // correction for merged weights does.
  struct Spec {
    int32_t start, end, rank;
    float scale;
  };
  const std::vector<Spec> specs = {{0, 1, 16, 2.0f}, {1, 2, 4, 0.5f},     {2, 2, 8, 1.0f},
                                   {2, 22, 8, 1.0f}, {22, 30, 64, -1.5f}, {3, 25, 4, -0.75f}};
  std::vector<std::vector<float>> a_host, bt_host;
  for (size_t i = 0; i < specs.size(); ++i) {
    a_host.push_back(RandomVector(specs[i].rank * in, 20 + i));
    bt_host.push_back(RandomVector(specs[i].rank * out, 40 + i));
  }
  const std::vector<float> x = RandomVector(tokens * in, 19);
  const std::vector<float> y0 = RandomVector(tokens * ldy, 21);
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    std::vector<float> t_out[2], y_out[2];
    Backend* backends[2] = {c.backend.get(), cpu_.get()};
    for (int b = 0; b < 2; ++b) {
      Backend& be = *backends[b];
      std::vector<DeviceBuffer> keep;
      std::vector<LoraSegment> segments;
      for (size_t i = 0; i < specs.size(); ++i) {
        // The CPU gets the values the GPU holds (bf16-rounded in the bf16 case).
        keep.push_back(UploadLora(be, AsStored(c, a_host[i])));
        keep.push_back(UploadLora(be, AsStored(c, bt_host[i])));
        segments.push_back({specs[i].start, specs[i].end, keep[keep.size() - 2].data(),
                            keep.back().data(), specs[i].rank, specs[i].scale});
      }
      const int64_t t_floats = LoraIntermediateSize(segments.data(), segments.size());
      DeviceBuffer bx = Upload(be, x), by = Upload(be, y0), bt = Poisoned(be, t_floats);
      ASSERT_OK(
          be.LoraShrink(bx.as<float>(), in, segments.data(), segments.size(), bt.as<float>()));
      ASSERT_OK(be.LoraExpand(bt.as<float>(), segments.data(), segments.size(), out, by.as<float>(),
                              ldy));
      t_out[b] = Download(be, bt, t_floats);
      y_out[b] = Download(be, by, tokens * ldy);
    }
    EXPECT_LE(RelativeError(t_out[0], t_out[1]), kF32Bound);
    EXPECT_LE(RelativeError(y_out[0], y_out[1]), kF32Bound);
    // Columns beyond `out` and rows without a segment are untouched.
    for (int64_t row = 0; row < tokens; ++row) {
      for (int64_t col = out; col < ldy; ++col) {
        ASSERT_EQ(y_out[0][row * ldy + col], y0[row * ldy + col]);
      }
    }
    for (int64_t i = 30 * ldy; i < tokens * ldy; ++i) ASSERT_EQ(y_out[0][i], y0[i]);
  }
}

TEST_F(CudaBackendTest, MergeLoraMatchesCpuAndKeepsBase) {
  const int64_t rows = 96, cols = 80;
  const int32_t rank = 12;
  const std::vector<float> base = RandomVector(rows * cols, 60, -0.1f, 0.1f);
  const std::vector<float> a = RandomVector(rank * cols, 61, -0.1f, 0.1f);
  const std::vector<float> bt = RandomVector(rank * rows, 62, -0.1f, 0.1f);
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    Backend& cuda = *c.backend;
    const Weight w_gpu = UploadWeight(cuda, base, rows, cols);
    const Weight w_cpu = UploadWeight(*cpu_, AsStored(c, base), rows, cols);
    DeviceBuffer a_gpu = UploadLora(cuda, a), bt_gpu = UploadLora(cuda, bt);
    DeviceBuffer a_cpu = Upload(*cpu_, AsStored(c, a)), bt_cpu = Upload(*cpu_, AsStored(c, bt));
    DeviceBuffer merged_gpu = *cuda.Allocate(rows * cols * DTypeSize(w_gpu.view.dtype));
    DeviceBuffer merged_cpu = Poisoned(*cpu_, rows * cols);
    ASSERT_OK(
        cuda.MergeLora(w_gpu.view, a_gpu.data(), bt_gpu.data(), rank, 0.7f, merged_gpu.data()));
    ASSERT_OK(
        cpu_->MergeLora(w_cpu.view, a_cpu.data(), bt_cpu.data(), rank, 0.7f, merged_cpu.data()));
    // Read both (stored dtype) back through an identity GEMM: y = I · Wᵀ.
    const auto read_back = [&](Backend& be, const WeightView& w) {
      std::vector<float> eye(cols * cols, 0.0f);
      for (int64_t i = 0; i < cols; ++i) eye[i * cols + i] = 1.0f;
      DeviceBuffer e = Upload(be, eye), y = Poisoned(be, cols * rows);
      EXPECT_OK(be.Linear(e.as<float>(), w, cols, y.as<float>(), false));
      return Download(be, y, cols * rows);
    };
    const WeightView merged_view{merged_gpu.data(), w_gpu.view.dtype, rows, cols};
    const std::vector<float> merged = read_back(cuda, merged_view);
    EXPECT_LE(RelativeError(merged, read_back(*cpu_, {merged_cpu.data(), DType::kF32, rows, cols})),
              c.bf16 ? 1e-2 : kF32Bound);
    // The golden copy is untouched.
    EXPECT_EQ(RelativeError(read_back(cuda, w_gpu.view), read_back(*cpu_, w_cpu.view)), 0.0);
  }
}

// --- whole model ----------------------------------------------------------------

std::string SharedModel() { return std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k"; }

std::vector<std::vector<int32_t>> Prompts(int64_t vocab) {
  std::mt19937 rng(70);
  std::uniform_int_distribution<int32_t> id(3, static_cast<int32_t>(vocab - 1));
  std::vector<std::vector<int32_t>> prompts;
  for (const int len : {1, 9, 23, 40}) {
    std::vector<int32_t> p = {1};
    while (static_cast<int>(p.size()) < len) p.push_back(id(rng));
    prompts.push_back(p);
  }
  return prompts;
}

// Prefill of `seqs` (logits for every token), then one decode step per
// sequence (logits appended), all with `adapters`.
std::vector<float> PrefillAndDecode(Backend& backend, model::LlamaModel& model,
                                    const std::vector<std::vector<int32_t>>& seqs,
                                    const std::vector<model::AdapterChoice>& adapters,
                                    const model::MergedWeights* merged = nullptr) {
  size_t longest = 0;
  for (const auto& s : seqs) longest = std::max(longest, s.size());
  test_support::PagedTestCache cache(&backend, model.kv_shape(), seqs.size(), longest + 1);
  model::ForwardInput in = test_support::PrefillAll(seqs, cache);
  in.adapters = adapters;
  in.merged = merged;
  std::vector<float> logits;
  absl::Status status = model.Forward(in, cache.view(), &logits);
  EXPECT_OK(status);
  model::ForwardInput decode;
  decode.max_blocks_per_seq = in.max_blocks_per_seq;
  decode.block_tables = in.block_tables;
  decode.query_start = {0};
  for (int32_t s = 0; s < static_cast<int32_t>(seqs.size()); ++s) {
    const int32_t pos = static_cast<int32_t>(seqs[s].size());
    decode.tokens.push_back(seqs[s][pos / 2]);
    decode.positions.push_back(pos);
    decode.slot_mapping.push_back(cache.Block(s, pos / test_support::kTestBlockSize) *
                                      test_support::kTestBlockSize +
                                  pos % test_support::kTestBlockSize);
    decode.logit_rows.push_back(s);
    decode.query_start.push_back(s + 1);
    decode.context_lens.push_back(pos + 1);
  }
  decode.adapters = adapters;
  decode.merged = merged;
  std::vector<float> decoded;
  status = model.Forward(decode, cache.view(), &decoded);
  EXPECT_OK(status);
  logits.insert(logits.end(), decoded.begin(), decoded.end());
  return logits;
}

TEST_F(CudaBackendTest, SharedModelLogitsMatchCpu) {
  auto cpu_model = model::LlamaModel::Load(cpu_.get(), SharedModel(), {});
  ASSERT_OK(cpu_model);
  const auto prompts = Prompts((*cpu_model)->config().vocab_size);
  const std::vector<float> ref = PrefillAndDecode(*cpu_, **cpu_model, prompts, {});
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    auto cuda_model = model::LlamaModel::Load(c.backend.get(), SharedModel(), {});
    ASSERT_OK(cuda_model);
    const std::vector<float> logits = PrefillAndDecode(*c.backend, **cuda_model, prompts, {});
    EXPECT_LE(RelativeError(logits, ref), c.bf16 ? kBf16ModelBound : kF32ModelBound);
  }
}

// The seeded HF models of the golden set (GQA, biases, llama3 rope, f16/bf16
// checkpoints, explicit head_dim) on the float32 CUDA backend.
// Dummy presets (random weights with the shapes of real models: GQA, llama3
// rope, a 128k vocabulary), cut to two layers so the CPU reference is quick.
TEST_F(CudaBackendTest, DummyPresetLogitsMatchCpu) {
  for (const char* preset : {"tiny", "llama-3.2-1b"}) {
    SCOPED_TRACE(preset);
    absl::StatusOr<formats::ModelConfig> config = formats::DummyPreset(preset);
    ASSERT_OK(config);
    config->num_hidden_layers = std::min<int64_t>(config->num_hidden_layers, 2);
    auto cpu_model = model::LlamaModel::CreateDummy(cpu_.get(), *config, /*seed=*/7, {});
    ASSERT_OK(cpu_model);
    const auto prompts = Prompts(config->vocab_size);
    const std::vector<float> ref = PrefillAndDecode(*cpu_, **cpu_model, prompts, {});
    for (CudaCase& c : cases_) {
      SCOPED_TRACE(c.name);
      auto cuda_model = model::LlamaModel::CreateDummy(c.backend.get(), *config, /*seed=*/7, {});
      ASSERT_OK(cuda_model);
      const std::vector<float> logits = PrefillAndDecode(*c.backend, **cuda_model, prompts, {});
      EXPECT_LE(RelativeError(logits, ref), c.bf16 ? kBf16ModelBound : kF32ModelBound);
    }
  }
}

TEST_F(CudaBackendTest, GoldenModelsMatchCpu) {
  auto cases = test_support::LoadModelCases();
  ASSERT_OK(cases);
  CudaCase& c = cases_[1];
  for (const test_support::GoldenCase& g : *cases) {
    SCOPED_TRACE(g.name);
    auto cpu_model = model::LlamaModel::Load(cpu_.get(), g.model_dir, {});
    ASSERT_OK(cpu_model);
    auto cuda_model = model::LlamaModel::Load(c.backend.get(), g.model_dir, {});
    ASSERT_OK(cuda_model);
    const std::vector<std::vector<int32_t>> seqs = {g.prompts[0].ids};
    EXPECT_LE(RelativeError(PrefillAndDecode(*c.backend, **cuda_model, seqs, {}),
                            PrefillAndDecode(*cpu_, **cpu_model, seqs, {})),
              kF32ModelBound);
  }
}

class CudaLoraTest : public CudaBackendTest {
 protected:
  // The shared model with every shared adapter, on `backend`.
  static test_support::SharedModel Load(Backend& backend) {
    absl::StatusOr<std::vector<std::string>> names = test_support::SharedAdapterNames();
    EXPECT_OK(names);
    if (!names.ok()) return {};
    absl::StatusOr<test_support::SharedModel> shared =
        test_support::LoadSharedModel(&backend, *names);
    EXPECT_OK(shared);
    if (!shared.ok()) return {};
    return std::move(*shared);
  }

  // A batch of the prompts, each with an adapter in turn (every third on the
  // base, one at half strength), as choices into `adapters`.
  static std::vector<model::AdapterChoice> Choices(
      const std::vector<std::unique_ptr<adapters::DeviceAdapter>>& adapters, size_t n) {
    std::vector<model::AdapterChoice> choices;
    for (size_t i = 0; i < n; ++i) {
      if (i % 3 == 2) {
        choices.push_back({});
      } else {
        choices.push_back({adapters[i % adapters.size()].get(), i == 1 ? 0.5f : 1.0f});
      }
    }
    return choices;
  }
};

TEST_F(CudaLoraTest, MixedAdapterBatchMatchesCpu) {
  test_support::SharedModel cpu = Load(*cpu_);
  ASSERT_NE(cpu.model, nullptr);
  ASSERT_GE(cpu.adapters.size(), 4u);
  std::vector<std::vector<int32_t>> prompts = Prompts(cpu.model->config().vocab_size);
  const auto more = Prompts(100);
  prompts.insert(prompts.end(), more.begin(), more.end());
  const std::vector<float> ref =
      PrefillAndDecode(*cpu_, *cpu.model, prompts, Choices(cpu.adapters, prompts.size()));
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel cuda = Load(*c.backend);
    ASSERT_NE(cuda.model, nullptr);
    const std::vector<float> logits =
        PrefillAndDecode(*c.backend, *cuda.model, prompts, Choices(cuda.adapters, prompts.size()));
    EXPECT_LE(RelativeError(logits, ref), c.bf16 ? kBf16ModelBound : kF32ModelBound);
  }
}

// On the GPU too, each request of a batch that mixes adapters (and the base,
// and a half-scale request) gets the logits it gets alone: prefill rows and
// its decode row. cuBLAS is not batch-invariant, so only summation order may
// differ.
TEST_F(CudaLoraTest, MixedBatchEqualsEachRequestAlone) {
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel shared = Load(*c.backend);
    ASSERT_NE(shared.model, nullptr);
    ASSERT_GE(shared.adapters.size(), 4u);
    const int64_t vocab = shared.model->config().vocab_size;
    const auto prompts = Prompts(vocab);
    const std::vector<model::AdapterChoice> choices = Choices(shared.adapters, prompts.size());
    const std::vector<float> batched =
        PrefillAndDecode(*c.backend, *shared.model, prompts, choices);
    size_t total_tokens = 0;
    for (const auto& p : prompts) total_tokens += p.size();
    size_t prefill_offset = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      SCOPED_TRACE(i);
      const std::vector<float> alone =
          PrefillAndDecode(*c.backend, *shared.model, {prompts[i]}, {choices[i]});
      // The batch's rows of request i, laid out as alone: prefill, then decode.
      std::vector<float> mine(batched.begin() + prefill_offset,
                              batched.begin() + prefill_offset + prompts[i].size() * vocab);
      const auto decode_row = batched.begin() + (total_tokens + i) * vocab;
      mine.insert(mine.end(), decode_row, decode_row + vocab);
      EXPECT_LE(RelativeError(mine, alone), c.bf16 ? kBf16Bound : kF32ModelBound);
      prefill_offset += prompts[i].size() * vocab;
    }
  }
}

TEST_F(CudaLoraTest, MergedMatchesUnmerged) {
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel cuda = Load(*c.backend);
    ASSERT_NE(cuda.model, nullptr);
    ASSERT_GE(cuda.adapters.size(), 2u);
    const auto prompts = Prompts(cuda.model->config().vocab_size);
    const model::AdapterChoice hot{cuda.adapters[0].get(), 1.0f};
    auto merged = cuda.model->Merge(hot);
    ASSERT_OK(merged);
    // All on the hot adapter, then a mix whose others get low-rank corrections.
    const std::vector<model::AdapterChoice> all_hot(prompts.size(), hot);
    const std::vector<model::AdapterChoice> mixed = {hot, {cuda.adapters[1].get(), 1.0f}, {}, hot};
    for (const auto& choices : {all_hot, mixed}) {
      const std::vector<float> unmerged =
          PrefillAndDecode(*c.backend, *cuda.model, prompts, choices);
      const std::vector<float> on_merged =
          PrefillAndDecode(*c.backend, *cuda.model, prompts, choices, merged->get());
      // bf16: the merged weights are rounded once more than base + LoRA.
      EXPECT_LE(RelativeError(on_merged, unmerged), c.bf16 ? kBf16ModelBound : kF32ModelBound);
    }
  }
}

// Decode steps as step graphs (CUDA graphs): captured once per padded shape,
// then replayed with other tokens, positions and adapter mixes, and a smaller
// batch in another bucket. Each step equals the same step run operation by
// operation on a twin cache; most steps must have been replays.
TEST_F(CudaLoraTest, DecodeStepGraphsMatchEagerSteps) {
  constexpr int kSteps = 8;
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel shared = Load(*c.backend);
    ASSERT_NE(shared.model, nullptr);
    ASSERT_GE(shared.adapters.size(), 4u);
    std::vector<std::vector<int32_t>> prompts = Prompts(shared.model->config().vocab_size);
    const auto more = Prompts(100);
    prompts.insert(prompts.end(), more.begin(), more.end());
    const size_t n = prompts.size();
    size_t longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, p.size());
    test_support::PagedTestCache eager_cache(c.backend.get(), shared.model->kv_shape(), n,
                                             longest + kSteps);
    test_support::PagedTestCache graph_cache(c.backend.get(), shared.model->kv_shape(), n,
                                             longest + kSteps);
    shared.model->set_step_graphs(false);
    for (auto* cache : {&eager_cache, &graph_cache}) {
      model::ForwardInput prefill = test_support::PrefillAll(prompts, *cache);
      prefill.adapters = Choices(shared.adapters, n);
      std::vector<float> logits;
      ASSERT_OK(shared.model->Forward(prefill, cache->view(), &logits));
    }
    const int64_t graph_steps_before = shared.model->step_graph_stats().graph_steps;
    for (int step = 0; step < kSteps; ++step) {
      SCOPED_TRACE(step);
      // From step 5 on the last sequence is done: a smaller padded batch.
      const size_t active = step < 5 ? n : n - 1;
      std::vector<int32_t> tokens, positions;
      std::vector<model::AdapterChoice> choices = Choices(shared.adapters, n + step);
      choices.erase(choices.begin(), choices.begin() + step);  // another mix each step
      choices.resize(active);
      for (size_t s = 0; s < active; ++s) {
        tokens.push_back(prompts[s][(step * 7 + s) % prompts[s].size()]);
        positions.push_back(static_cast<int32_t>(prompts[s].size()) + step);
      }
      std::vector<float> eager, graphed;
      model::ForwardInput in = test_support::DecodeOne(tokens, positions, eager_cache);
      in.adapters = choices;
      shared.model->set_step_graphs(false);
      ASSERT_OK(shared.model->Forward(in, eager_cache.view(), &eager));
      in = test_support::DecodeOne(tokens, positions, graph_cache);
      in.adapters = choices;
      shared.model->set_step_graphs(true);
      absl::Status status = shared.model->Forward(in, graph_cache.view(), &graphed);
      ASSERT_OK(status);
      // Only the GEMMs' batch size differs (padding): summation order.
      EXPECT_LE(RelativeError(graphed, eager), c.bf16 ? kBf16Bound : kF32ModelBound);
    }
    const model::LlamaModel::StepGraphStats& stats = shared.model->step_graph_stats();
    // Two shapes, each captured (perhaps after one try that had to allocate
    // first) and replayed on the other steps.
    EXPECT_GE(stats.graph_steps - graph_steps_before, kSteps - 4)
        << stats.eager_fallbacks << " steps fell back to eager";
  }
}

// --- sampling ------------------------------------------------------------------

// Rows of seeded logits, some with ties (logits on a 0.25 grid) and one with
// NaNs, and a parameter mix covering greedy, top-k, top-p, both, top-n and
// draws at the edges of [0, 1).
struct SamplingBatch {
  std::vector<float> logits;  // [rows, vocab]
  std::vector<SamplingRow> params;
};

SamplingBatch MakeSamplingBatch(int64_t vocab, uint32_t seed) {
  const double almost_one = std::nextafter(1.0, 0.0);
  SamplingBatch b;
  b.params = {
      {.temperature = 0.0f, .num_top_logprobs = 5},
      {.temperature = 1.0f, .uniform = 0.0},
      {.temperature = 0.7f, .top_k = 50, .uniform = almost_one, .num_top_logprobs = 20},
      {.temperature = 1.0f, .top_p = 0.9f, .uniform = 0.5},
      {.temperature = 0.8f,
       .top_k = 40,
       .top_p = 0.95f,
       .uniform = 0.999999,
       .num_top_logprobs = 3},
      {.temperature = 1.3f, .uniform = 0.3141592653589793},
      {.temperature = 1.0f, .top_k = 1, .uniform = 0.7, .num_top_logprobs = 2},
      {.temperature = 1.0f,
       .top_k = static_cast<int32_t>(vocab),
       .uniform = 0.25,
       .num_top_logprobs = 1},
      {.temperature = 0.5f, .top_p = 0.5f, .uniform = 1e-12},
      {.temperature = 1.0f, .top_k = 100, .uniform = 0.3, .num_top_logprobs = 64},
      {.temperature = 1.0f, .top_k = 20, .uniform = 0.9, .num_top_logprobs = 10},
      {.temperature = 2.0f, .top_k = 1000, .top_p = 0.3f, .uniform = 0.77, .num_top_logprobs = 100},
  };
  const int64_t rows = static_cast<int64_t>(b.params.size());
  b.logits = RandomVector(rows * vocab, seed, -6.0f, 6.0f);
  std::mt19937 rng(seed + 1);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = b.logits.data() + r * vocab;
    if (r % 2 == 0) {
      for (int64_t i = 0; i < vocab; ++i) row[i] = normal(rng);  // a peakier distribution
    }
    if (r == 9) {
      for (int64_t i = 0; i < vocab; ++i) row[i] = std::round(row[i] * 4.0f) / 4.0f;
    }
    if (r == 10) {
      for (int64_t i = 0; i < vocab; i += 7) row[i] = kNaN;
    }
  }
  return b;
}

// CUDA's results for `b` against the CPU backend's: the same tokens and top
// ids in the same order, logprobs equal up to the summation order of log_z.
void ExpectSameSamples(Backend& cuda, Backend& cpu, const SamplingBatch& b, int64_t vocab) {
  const int64_t rows = static_cast<int64_t>(b.params.size());
  DeviceBuffer on_gpu = Upload(cuda, b.logits), on_cpu = Upload(cpu, b.logits);
  std::vector<SampledToken> got(rows), want(rows);
  // Stale contents must be overwritten.
  for (SampledToken& t : got) t = {.id = -1, .logprob = kNaN, .top_logprobs = {{-1, kNaN}}};
  absl::Status status = cuda.Sample(on_gpu.as<float>(), rows, vocab, b.params.data(), got.data());
  ASSERT_OK(status);
  status = cpu.Sample(on_cpu.as<float>(), rows, vocab, b.params.data(), want.data());
  ASSERT_OK(status);
  for (int64_t r = 0; r < rows; ++r) {
    SCOPED_TRACE("row " + std::to_string(r));
    EXPECT_EQ(got[r].id, want[r].id);
    EXPECT_NEAR(got[r].logprob, want[r].logprob, 1e-4);
    ASSERT_EQ(got[r].top_logprobs.size(), want[r].top_logprobs.size());
    for (size_t i = 0; i < want[r].top_logprobs.size(); ++i) {
      EXPECT_EQ(got[r].top_logprobs[i].id, want[r].top_logprobs[i].id) << "top " << i;
      EXPECT_NEAR(got[r].top_logprobs[i].logprob, want[r].top_logprobs[i].logprob, 1e-4)
          << "top " << i;
    }
  }
}

TEST_F(CudaBackendTest, SampleMatchesCpu) {
  Backend& cuda = *cases_[0].backend;
  for (const int64_t vocab : {int64_t{32000}, int64_t{128256}, int64_t{1000}}) {
    for (const uint32_t seed : {11u, 12u}) {
      SCOPED_TRACE("vocab " + std::to_string(vocab) + " seed " + std::to_string(seed));
      ExpectSameSamples(cuda, *cpu_, MakeSamplingBatch(vocab, seed), vocab);
    }
  }
}

TEST_F(CudaBackendTest, SampleDrawsFollowTheCpuOverManyUniforms) {
  // One row, many draws: every uniform must land on the CPU's token.
  Backend& cuda = *cases_[0].backend;
  const int64_t vocab = 32000;
  SamplingBatch b;
  const std::vector<float> row = RandomVector(vocab, 21, -4.0f, 4.0f);
  for (int i = 0; i < 64; ++i) {
    b.logits.insert(b.logits.end(), row.begin(), row.end());
    b.params.push_back({.temperature = 0.9f,
                        .top_k = i % 2 == 0 ? 0 : 200,
                        .top_p = i % 3 == 0 ? 0.8f : 1.0f,
                        .uniform = (i + 0.5) / 64.0});
  }
  ExpectSameSamples(cuda, *cpu_, b, vocab);
}

TEST_F(CudaBackendTest, SampleEdgeShapes) {
  Backend& cuda = *cases_[0].backend;
  // A vocabulary of one, all-equal rows (ties everywhere) and a row of NaN.
  SamplingBatch one{{-2.0f, 5.0f}, {{.uniform = 0.999, .num_top_logprobs = 3}, {.top_k = 3}}};
  ExpectSameSamples(cuda, *cpu_, one, 1);
  SamplingBatch flat;
  flat.logits.assign(3 * 4096, 0.5f);
  for (int64_t i = 2 * 4096; i < 3 * 4096; ++i) flat.logits[i] = kNaN;
  flat.params = {{.uniform = 0.5, .num_top_logprobs = 8},
                 {.top_k = 7, .top_p = 0.5f, .uniform = 0.99, .num_top_logprobs = 8},
                 {.uniform = 0.5, .num_top_logprobs = 2}};
  std::vector<SampledToken> got(3);
  DeviceBuffer logits = Upload(cuda, flat.logits);
  ASSERT_OK(cuda.Sample(logits.as<float>(), 3, 4096, flat.params.data(), got.data()));
  // Equal logits: the draw walks ids in order; top entries are the lowest ids.
  EXPECT_EQ(got[0].id, 2048);
  EXPECT_EQ(got[0].top_logprobs[7].id, 7);
  EXPECT_EQ(got[1].id, 3);  // top_k 7 then top_p 0.5 keeps ids 0..3
  // All NaN: no crash, a valid id.
  EXPECT_GE(got[2].id, 0);
  EXPECT_LT(got[2].id, 4096);
  // Nothing to do, and bad parameters named before any work.
  EXPECT_OK(cuda.Sample(nullptr, 0, 4096, nullptr, nullptr));
  flat.params[1].temperature = -1.0f;
  absl::Status status = cuda.Sample(logits.as<float>(), 3, 4096, flat.params.data(), got.data());
  EXPECT_NE(status.message().find("row 1: temperature"), std::string::npos) << status;
}

}  // namespace
}  // namespace loraserve::kernels
