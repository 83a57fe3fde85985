// What the CUDA backend does beyond the op table (kernels/backend_parity_test.cc
// runs every op against the CPU): the dtypes it stores weights, caches and
// adapters in, asynchronous copies, indices checked on the device, the fused
// GEMM ops equal to their unfused parts bit for bit, and sampling against the
// CPU's tokens. Whole forward passes are in server/model/cuda_model_test.cc.
// Without a GPU (or without CUDA in the build) every case skips and says why.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/support/backend_test_util.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::StatusIs;
using test_support::CudaCase;
using test_support::Download;
using test_support::kF32Bound;
using test_support::kNaN;
using test_support::Poisoned;
using test_support::RandomVector;
using test_support::RelativeError;
using test_support::Upload;
using test_support::UploadWeight;
using test_support::Weight;

using CudaBackendTest = test_support::CudaAgainstCpuTest;

// The fused norm + projection equals RmsNorm then Linear on the same backend
// exactly: the norm writes the same bf16 operand the conversion would. No
// rows is nothing to do; a weight of another width is refused.
TEST_F(CudaBackendTest, RmsNormLinearEqualsNormThenLinear) {
  const int64_t dim = 160, rows = 96;
  const float eps = 1e-5f;
  const std::vector<float> w_host = RandomVector(rows * dim, 5, -0.1f, 0.1f);
  const std::vector<float> norm = RandomVector(dim, 6, 0.5f, 1.5f);
  for (CudaCase& c : cases_) {
    Backend& cuda = *c.backend;
    const Weight w = UploadWeight(cuda, w_host, rows, dim);
    DeviceBuffer norm_gpu = Upload(cuda, norm);
    for (const int64_t n : {1, 7, 64}) {
      SCOPED_TRACE(c.name + " n=" + std::to_string(n));
      DeviceBuffer x = Upload(cuda, RandomVector(n * dim, 7 + n, -2.0f, 2.0f));
      DeviceBuffer h_fused = Poisoned(cuda, n * dim), y_fused = Poisoned(cuda, n * rows);
      ASSERT_OK(cuda.RmsNormLinear(x.as<float>(), norm_gpu.as<float>(), n, dim, eps,
                                   h_fused.as<float>(), w.view, y_fused.as<float>()));
      DeviceBuffer h = Poisoned(cuda, n * dim), y = Poisoned(cuda, n * rows);
      ASSERT_OK(cuda.RmsNorm(x.as<float>(), norm_gpu.as<float>(), n, dim, eps, h.as<float>()));
      ASSERT_OK(cuda.Linear(h.as<float>(), w.view, n, y.as<float>(), false));
      EXPECT_EQ(Download(cuda, h_fused, n * dim), Download(cuda, h, n * dim));
      EXPECT_EQ(Download(cuda, y_fused, n * rows), Download(cuda, y, n * rows));
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
// equals SiluMul then Linear on the same backend exactly.
TEST_F(CudaBackendTest, SiluMulLinearEqualsGateThenLinear) {
  const int64_t dim = 144, rows = 80;
  const std::vector<float> w_host = RandomVector(rows * dim, 8, -0.1f, 0.1f);
  for (CudaCase& c : cases_) {
    Backend& cuda = *c.backend;
    const Weight w = UploadWeight(cuda, w_host, rows, dim);
    for (const int64_t n : {1, 7, 64}) {
      SCOPED_TRACE(c.name + " n=" + std::to_string(n));
      DeviceBuffer g = Upload(cuda, RandomVector(n * 2 * dim, 9 + n, -3.0f, 3.0f));
      const std::vector<float> y0 = RandomVector(n * rows, 10 + n);
      DeviceBuffer act_fused = Poisoned(cuda, n * dim), y_fused = Upload(cuda, y0);
      ASSERT_OK(cuda.SiluMulLinear(g.as<float>(), n, dim, act_fused.as<float>(), w.view,
                                   y_fused.as<float>(), /*accumulate=*/true));
      DeviceBuffer act = Poisoned(cuda, n * dim), y = Upload(cuda, y0);
      ASSERT_OK(cuda.SiluMul(g.as<float>(), n, dim, act.as<float>()));
      ASSERT_OK(cuda.Linear(act.as<float>(), w.view, n, y.as<float>(), true));
      EXPECT_EQ(Download(cuda, act_fused, n * dim), Download(cuda, act, n * dim));
      EXPECT_EQ(Download(cuda, y_fused, n * rows), Download(cuda, y, n * rows));
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
