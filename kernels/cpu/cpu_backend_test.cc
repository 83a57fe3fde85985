// Every op of the CPU backend against a naive reference written here (double
// accumulation), on seeded random inputs of several shapes, in the manner of
// llama.cpp's test-backend-ops: outputs are poisoned with NaN before each run,
// errors are bounded per op, and NaN never passes.
//
// Errors are measured relative to the sum of the absolute values of the terms
// that make up each output (for a dot product, Σ|x_i w_i|): that is the scale
// a correct float32 computation's rounding error is proportional to, so the
// bounds stay tight even where terms cancel.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "tests/support/side_by_side.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::HasSubstr;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Elementwise ops round a handful of times.
constexpr double kElementwiseTol = 1e-6;
// Dot products of a few hundred terms, plus exp and a division for attention.
constexpr double kReductionTol = 1e-5;
// Outputs below this are treated as zero: SiLU of a very negative gate is
// ~1e-41 in exact arithmetic and ~1e-36 from float32 exp, both "zero".
constexpr double kTinyScale = 1e-20;

class CpuBackendTest : public ::testing::TestWithParam<int> {
 public:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<Backend>> backend =
        CreateCpuBackend({.num_threads = GetParam()});
    ASSERT_OK(backend);
    backend_ = *std::move(backend);
  }

  template <typename T>
  DeviceBuffer Upload(const std::vector<T>& host) {
    DeviceBuffer buffer = Alloc(host.size() * sizeof(T));
    EXPECT_OK(backend_->CopyToDevice(buffer.data(), host.data(), host.size() * sizeof(T)));
    return buffer;
  }

  DeviceBuffer Poisoned(size_t count) { return Upload(std::vector<float>(count, kNaN)); }

  std::vector<float> Download(const DeviceBuffer& buffer, size_t count) {
    std::vector<float> host(count);
    EXPECT_OK(backend_->CopyToHost(host.data(), buffer.data(), count * sizeof(float)));
    return host;
  }

  DeviceBuffer Alloc(size_t bytes) {
    absl::StatusOr<DeviceBuffer> buffer = backend_->Allocate(bytes);
    EXPECT_OK(buffer);
    return buffer.ok() ? *std::move(buffer) : DeviceBuffer();
  }

  std::unique_ptr<Backend> backend_;
};

std::vector<float> RandomFloats(size_t count, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> values(count);
  for (float& v : values) v = dist(rng);
  return values;
}

// Fails unless |got[i] - ref[i]| <= tol * max(scale[i], kTinyScale) for all i;
// a NaN anywhere fails.
void ExpectClose(const std::vector<float>& got, const std::vector<double>& ref,
                 const std::vector<double>& scale, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  ASSERT_EQ(scale.size(), ref.size()) << what;
  double worst = 0;
  size_t worst_index = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(got[i] - ref[i]) / std::max(scale[i], kTinyScale);
    if (!(err <= worst)) {  // NaN lands here and sticks.
      worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;
      worst_index = i;
      if (std::isnan(err)) break;
    }
  }
  EXPECT_LE(worst, tol) << what << ": worst relative error at index " << worst_index << " (got "
                        << got[worst_index] << ", expected " << ref[worst_index] << ")";
}

// Decodes an IEEE-style binary float of 1 sign, `exp_bits` exponent and
// `mant_bits` mantissa bits with ldexp, independently of the backend's bit
// tricks.
double DecodeSmallFloat(uint16_t bits, int exp_bits, int mant_bits) {
  const int exp_max = (1 << exp_bits) - 1;
  const int bias = exp_max / 2;
  const double sign = (bits >> (exp_bits + mant_bits)) & 1 ? -1.0 : 1.0;
  const int exponent = (bits >> mant_bits) & exp_max;
  const int mantissa = bits & ((1 << mant_bits) - 1);
  if (exponent == exp_max) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  }
  if (exponent == 0) return sign * std::ldexp(mantissa, 1 - bias - mant_bits);
  return sign * std::ldexp((1 << mant_bits) + mantissa, exponent - bias - mant_bits);
}

INSTANTIATE_TEST_SUITE_P(Threads, CpuBackendTest, ::testing::Values(1, 2, 3),
                         [](const auto& info) { return absl::StrCat(info.param, "threads"); });

// ---- memory and creation --------------------------------------------------

TEST(CreateCpuBackendTest, RejectsNegativeThreadCount) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = -1});
  EXPECT_THAT(backend, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(backend.status().message(), HasSubstr("num_threads"));
}

TEST(CreateCpuBackendTest, ZeroMeansAllCores) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = 0});
  ASSERT_OK(backend);
  EXPECT_EQ((*backend)->name(), "cpu");
}

TEST_P(CpuBackendTest, AllocatesAlignedBuffersAndCopies) {
  for (size_t bytes : {size_t{0}, size_t{1}, size_t{3}, size_t{1000}, size_t{1} << 20}) {
    DeviceBuffer buffer = Alloc(bytes);
    ASSERT_NE(buffer.data(), nullptr) << bytes;
    EXPECT_EQ(buffer.bytes(), bytes);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buffer.data()) % 64, 0u) << bytes;
  }
  const std::vector<float> host = RandomFloats(67, 1);
  DeviceBuffer buffer = Upload(host);
  EXPECT_EQ(Download(buffer, host.size()), host);
  EXPECT_OK(backend_->Synchronize());
  EXPECT_THAT(backend_->CopyToDevice(nullptr, host.data(), 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(backend_->CopyToHost(nullptr, buffer.data(), 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

// Converts every 16-bit pattern (plus a few more, so the count is not a
// multiple of the vector width) and compares with DecodeSmallFloat.
void CheckExhaustiveUpload(Backend& backend, DeviceBuffer& out, DType dtype, int exp_bits,
                           int mant_bits) {
  std::vector<uint16_t> bits(65536 + 5);
  std::iota(bits.begin(), bits.begin() + 65536, 0);
  for (size_t i = 65536; i < bits.size(); ++i) bits[i] = static_cast<uint16_t>(i * 977);
  ASSERT_OK(backend.UploadWeight(out.data(), bits.data(), dtype, 1, bits.size()));
  std::vector<float> got(bits.size());
  ASSERT_OK(backend.CopyToHost(got.data(), out.data(), got.size() * sizeof(float)));
  int mismatches = 0;
  for (size_t i = 0; i < bits.size(); ++i) {
    const double expected = DecodeSmallFloat(bits[i], exp_bits, mant_bits);
    const bool ok = std::isnan(expected)
                        ? std::isnan(got[i])
                        : got[i] == expected && std::signbit(got[i]) == std::signbit(expected);
    if (!ok && ++mismatches <= 5) {
      ADD_FAILURE() << DTypeName(dtype) << " bits 0x" << std::hex << bits[i] << std::dec << ": got "
                    << got[i] << ", expected " << expected;
    }
  }
  EXPECT_EQ(mismatches, 0) << DTypeName(dtype);
}

TEST_P(CpuBackendTest, UploadsF16ExactlyIncludingSpecialValues) {
  DeviceBuffer out = Alloc((65536 + 5) * sizeof(float));
  CheckExhaustiveUpload(*backend_, out, DType::kF16, 5, 10);
  // Spot checks the decoder itself: smallest subnormal, max, -0, inf.
  EXPECT_EQ(DecodeSmallFloat(0x0001, 5, 10), std::ldexp(1.0, -24));
  EXPECT_EQ(DecodeSmallFloat(0x7bff, 5, 10), 65504.0);
  EXPECT_TRUE(std::signbit(DecodeSmallFloat(0x8000, 5, 10)));
  EXPECT_TRUE(std::isinf(DecodeSmallFloat(0xfc00, 5, 10)));
}

TEST_P(CpuBackendTest, UploadsBf16ExactlyIncludingSpecialValues) {
  DeviceBuffer out = Alloc((65536 + 5) * sizeof(float));
  CheckExhaustiveUpload(*backend_, out, DType::kBF16, 8, 7);
  EXPECT_EQ(DecodeSmallFloat(0x3f80, 8, 7), 1.0);
  EXPECT_EQ(DecodeSmallFloat(0x0001, 8, 7), std::ldexp(1.0, -133));
}

TEST_P(CpuBackendTest, UploadsF32AsIsAndRejectsBadArguments) {
  const std::vector<float> host = RandomFloats(13, 2);
  DeviceBuffer out = Poisoned(host.size());
  ASSERT_OK(backend_->UploadWeight(out.data(), host.data(), DType::kF32, 1, host.size()));
  EXPECT_EQ(Download(out, host.size()), host);
  EXPECT_THAT(backend_->UploadWeight(out.data(), host.data(), DType::kF32, 1, -1),
              StatusIs(absl::StatusCode::kInvalidArgument));
  absl::Status status = backend_->UploadWeight(out.data(), nullptr, DType::kF16, 1, 4);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("src"));
}

// ---- dense ----------------------------------------------------------------

struct LinearShape {
  int64_t m, n, k;
};

TEST_P(CpuBackendTest, LinearMatchesReference) {
  // Small m takes the W-streaming kernel, larger m OpenBLAS; odd sizes hit
  // every tail.
  const LinearShape shapes[] = {{1, 67, 33},    {1, 1, 1},     {2, 5, 7},     {3, 64, 128},
                                {4, 1000, 300}, {16, 130, 67}, {17, 67, 129}, {64, 96, 200}};
  uint32_t seed = 10;
  for (const LinearShape& shape : shapes) {
    for (bool accumulate : {false, true}) {
      const auto [m, n, k] = shape;
      const std::vector<float> x = RandomFloats(m * k, ++seed);
      const std::vector<float> w = RandomFloats(n * k, ++seed);
      const std::vector<float> y0 = RandomFloats(m * n, ++seed);
      DeviceBuffer dx = Upload(x);
      DeviceBuffer dw = Upload(w);
      DeviceBuffer dy = accumulate ? Upload(y0) : Poisoned(m * n);
      const WeightView view{dw.data(), DType::kF32, n, k};
      ASSERT_OK(backend_->Linear(dx.as<float>(), view, m, dy.as<float>(), accumulate));
      std::vector<double> ref(m * n), scale(m * n);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double sum = accumulate ? y0[i * n + j] : 0.0;
          double abs_sum = std::abs(sum);
          for (int64_t c = 0; c < k; ++c) {
            const double term = static_cast<double>(x[i * k + c]) * w[j * k + c];
            sum += term;
            abs_sum += std::abs(term);
          }
          ref[i * n + j] = sum;
          scale[i * n + j] = abs_sum;
        }
      }
      ExpectClose(Download(dy, m * n), ref, scale, kReductionTol,
                  absl::StrCat("Linear m=", m, " n=", n, " k=", k, " accumulate=", accumulate));
    }
  }
}

TEST_P(CpuBackendTest, LinearRejectsBadArguments) {
  DeviceBuffer x = Upload(RandomFloats(8, 1));
  DeviceBuffer w = Upload(RandomFloats(8, 2));
  DeviceBuffer y = Poisoned(8);
  const WeightView view{w.data(), DType::kF32, 2, 4};
  absl::Status status = backend_->Linear(x.as<float>(), {w.data(), static_cast<DType>(99), 2, 4}, 2,
                                         y.as<float>(), false);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("unknown dtype"));
  status = backend_->Linear(nullptr, view, 2, y.as<float>(), false);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("x is null"));
  EXPECT_THAT(backend_->Linear(x.as<float>(), view, -1, y.as<float>(), false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      backend_->Linear(x.as<float>(), {nullptr, DType::kF32, 2, 4}, 2, y.as<float>(), false),
      StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(
      backend_->Linear(x.as<float>(), {w.data(), DType::kF32, 0, 4}, 2, y.as<float>(), false),
      StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_OK(backend_->Linear(x.as<float>(), view, 0, y.as<float>(), false));
}

// The default RmsNormLinear is RmsNorm, then Linear, bit for bit; a weight
// whose width is not the rows' is refused.
TEST_P(CpuBackendTest, RmsNormLinearIsNormThenLinear) {
  const int64_t n = 5, dim = 48, rows = 20;
  const std::vector<float> x = RandomFloats(n * dim, 61);
  DeviceBuffer dx = Upload(x);
  DeviceBuffer norm = Upload(RandomFloats(dim, 62));
  DeviceBuffer dw = Upload(RandomFloats(rows * dim, 63));
  const WeightView w{dw.data(), DType::kF32, rows, dim};
  DeviceBuffer h_fused = Poisoned(n * dim), y_fused = Poisoned(n * rows);
  ASSERT_OK(backend_->RmsNormLinear(dx.as<float>(), norm.as<float>(), n, dim, 1e-5f,
                                    h_fused.as<float>(), w, y_fused.as<float>()));
  DeviceBuffer h = Poisoned(n * dim), y = Poisoned(n * rows);
  ASSERT_OK(backend_->RmsNorm(dx.as<float>(), norm.as<float>(), n, dim, 1e-5f, h.as<float>()));
  ASSERT_OK(backend_->Linear(h.as<float>(), w, n, y.as<float>(), false));
  EXPECT_EQ(Download(h_fused, n * dim), Download(h, n * dim));
  EXPECT_EQ(Download(y_fused, n * rows), Download(y, n * rows));
  const absl::Status status =
      backend_->RmsNormLinear(dx.as<float>(), norm.as<float>(), n, dim, 1e-5f, h.as<float>(),
                              {dw.data(), DType::kF32, rows, dim - 1}, y.as<float>());
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("columns for rows of 48"));
}

// The default SiluMulLinear is SiluMul, then Linear (accumulating here), bit
// for bit; a weight whose width is not the rows' is refused.
TEST_P(CpuBackendTest, SiluMulLinearIsGateThenLinear) {
  const int64_t n = 5, dim = 48, rows = 20;
  DeviceBuffer gate_up = Upload(RandomFloats(n * 2 * dim, 71));
  DeviceBuffer dw = Upload(RandomFloats(rows * dim, 72));
  const std::vector<float> y0 = RandomFloats(n * rows, 73);
  const WeightView w{dw.data(), DType::kF32, rows, dim};
  DeviceBuffer act_fused = Poisoned(n * dim), y_fused = Upload(y0);
  ASSERT_OK(backend_->SiluMulLinear(gate_up.as<float>(), n, dim, act_fused.as<float>(), w,
                                    y_fused.as<float>(), /*accumulate=*/true));
  DeviceBuffer act = Poisoned(n * dim), y = Upload(y0);
  ASSERT_OK(backend_->SiluMul(gate_up.as<float>(), n, dim, act.as<float>()));
  ASSERT_OK(backend_->Linear(act.as<float>(), w, n, y.as<float>(), true));
  EXPECT_EQ(Download(act_fused, n * dim), Download(act, n * dim));
  EXPECT_EQ(Download(y_fused, n * rows), Download(y, n * rows));
  const absl::Status status =
      backend_->SiluMulLinear(gate_up.as<float>(), n, dim, act.as<float>(),
                              {dw.data(), DType::kF32, rows, dim + 1}, y.as<float>(), false);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("columns for rows of 48"));
}

// Segments of different lengths (prefill-like and decode-like) and ranks,
// with a gap of untouched rows and a column slice of a wider output. The last
// covers rows of the second again, as the correction for merged weights does.
TEST_P(CpuBackendTest, LoraShrinkExpandMatchReference) {
  const int64_t tokens = 40, in = 67, out = 53, ldy = 120;
  struct Spec {
    int32_t start, end, rank;
    float scale;
  };
  const Spec specs[] = {{0, 1, 4, 2.0f},
                        {1, 21, 16, 0.5f},
                        {24, 25, 8, -1.5f},
                        {25, 40, 1, 3.0f},
                        {2, 20, 8, -0.75f}};
  const std::vector<float> x = RandomFloats(tokens * in, 401);
  const std::vector<float> y0 = RandomFloats(tokens * ldy, 402);
  std::vector<std::vector<float>> a, b;
  std::vector<DeviceBuffer> buffers;
  std::vector<LoraSegment> segments;
  uint32_t seed = 410;
  for (const Spec& spec : specs) {
    a.push_back(RandomFloats(spec.rank * in, ++seed));
    b.push_back(RandomFloats(out * spec.rank, ++seed));
    buffers.push_back(Upload(a.back()));
    buffers.push_back(Upload(b.back()));
    segments.push_back({spec.start, spec.end, buffers[buffers.size() - 2].as<float>(),
                        buffers.back().as<float>(), spec.rank, spec.scale});
  }
  const int32_t n = static_cast<int32_t>(segments.size());
  DeviceBuffer dx = Upload(x);
  DeviceBuffer dy = Upload(y0);
  DeviceBuffer dt = Poisoned(LoraIntermediateSize(segments.data(), n));
  ASSERT_OK(backend_->LoraShrink(dx.as<float>(), in, segments.data(), n, dt.as<float>()));
  ASSERT_OK(backend_->LoraExpand(dt.as<float>(), segments.data(), n, out, dy.as<float>(), ldy));

  std::vector<double> ref(y0.begin(), y0.end()), scale(y0.size());
  for (size_t i = 0; i < y0.size(); ++i) scale[i] = std::abs(y0[i]);
  for (size_t s = 0; s < segments.size(); ++s) {
    const Spec& spec = specs[s];
    for (int64_t row = spec.start; row < spec.end; ++row) {
      std::vector<double> t(spec.rank);
      for (int32_t r = 0; r < spec.rank; ++r) {
        for (int64_t c = 0; c < in; ++c) t[r] += double(x[row * in + c]) * a[s][r * in + c];
      }
      for (int64_t j = 0; j < out; ++j) {
        double sum = 0, abs_sum = 0;
        for (int32_t r = 0; r < spec.rank; ++r) {
          sum += t[r] * b[s][r * out + j];  // b holds Bᵀ: [rank, out]
          abs_sum += std::abs(t[r] * b[s][r * out + j]);
        }
        ref[row * ldy + j] += spec.scale * sum;
        scale[row * ldy + j] += std::abs(spec.scale) * abs_sum;
      }
    }
  }
  // Rows 21..23 and columns past `out` are untouched: their reference is y0.
  ExpectClose(Download(dy, y0.size()), ref, scale, kReductionTol, "LoraShrink+LoraExpand");
}

// ---- batch invariance ------------------------------------------------------
//
// A row of a product must come out with the same bits whatever else is in its
// batch: the batch size, the other rows, the row's position, the thread count
// (kernels/cpu/gemm.h). The sizes cross every tile and block boundary of the
// kernels: rows 1, 3, 16, 17, 64 and 200 (register tiles of 3 and 6 rows,
// row blocks of 48, decode vs packed paths), k past a 512-float cache block
// and not a multiple of 16, n past a 64-row column block and not a multiple
// of the 4-row tile.

constexpr int64_t kInvariantRows[] = {1, 3, 16, 17, 64, 200};
constexpr int kInvariantThreads[] = {1, 2, 3};

// x with `rows` rows of k floats: `target` at row `at`, seeded noise elsewhere.
std::vector<float> BatchAround(const std::vector<float>& target, int64_t rows, int64_t at,
                               uint32_t seed) {
  const int64_t k = static_cast<int64_t>(target.size());
  std::vector<float> x = RandomFloats(rows * k, seed);
  std::copy(target.begin(), target.end(), x.begin() + at * k);
  return x;
}

bool SameBits(const float* a, const float* b, int64_t count) {
  return std::memcmp(a, b, count * sizeof(float)) == 0;
}

TEST(GemmBatchInvarianceTest, EachIsaGivesARowTheSameBitsInAnyBatch) {
  const int64_t n = 150, k = 1100;
  const std::vector<float> w = RandomFloats(n * k, 901, 0.05f);
  const std::vector<float> target = RandomFloats(k, 902);
  std::vector<GemmIsa> isas = {GemmIsa::kAvx2};
  if (BestGemmIsa() != GemmIsa::kAvx2) isas.push_back(BestGemmIsa());
  for (const GemmIsa isa : isas) {
    for (const bool accumulate : {false, true}) {
      const std::vector<float> y_init = RandomFloats(n, 903);
      std::vector<float> alone = y_init;
      ThreadPool one(1);
      MatMulTransposed(isa, one, target.data(), w.data(), DType::kF32, 1, n, k, 0.75f, accumulate,
                       alone.data(), n);
      for (const int threads : kInvariantThreads) {
        ThreadPool pool(threads);
        for (const int64_t m : kInvariantRows) {
          const int64_t at = m / 2;
          const std::vector<float> x = BatchAround(target, m, at, 904 + m);
          std::vector<float> y = RandomFloats(m * n, 905);
          std::copy(y_init.begin(), y_init.end(), y.begin() + at * n);
          MatMulTransposed(isa, pool, x.data(), w.data(), DType::kF32, m, n, k, 0.75f, accumulate,
                           y.data(), n);
          EXPECT_TRUE(SameBits(y.data() + at * n, alone.data(), n))
              << GemmIsaName(isa) << " accumulate=" << accumulate << " threads=" << threads
              << " m=" << m;
        }
      }
    }
  }
}

// The same through the backend, for Linear and for LoRA shrink + expand.
TEST(CpuBackendBatchInvarianceTest, LinearAndLoraRowsDoNotDependOnTheBatch) {
  const int64_t n = 150, k = 1100, ldy = 160;
  const int32_t rank = 16;
  const std::vector<float> w = RandomFloats(n * k, 911, 0.05f);
  const std::vector<float> a = RandomFloats(rank * k, 912, 0.05f);
  const std::vector<float> b = RandomFloats(n * rank, 913, 0.05f);
  const std::vector<float> target = RandomFloats(k, 914);
  const std::vector<float> y_init = RandomFloats(ldy, 915);

  // Returns the target's row of Linear and of LoraShrink + LoraExpand (on
  // y_init) in a batch of m rows with the target at row `at`.
  const auto run = [&](int threads, int64_t m, int64_t at, std::vector<float>* linear,
                       std::vector<float>* lora) {
    absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = threads});
    ASSERT_OK(backend);
    Backend& be = **backend;
    const auto upload = [&](const std::vector<float>& host) {
      absl::StatusOr<DeviceBuffer> buffer = be.Allocate(host.size() * sizeof(float));
      EXPECT_OK(buffer);
      EXPECT_OK(be.CopyToDevice(buffer->data(), host.data(), host.size() * sizeof(float)));
      return *std::move(buffer);
    };
    DeviceBuffer dw = upload(w), da = upload(a), db = upload(b);
    DeviceBuffer dx = upload(BatchAround(target, m, at, 916 + m));
    std::vector<float> y0 = RandomFloats(m * ldy, 917);
    std::copy(y_init.begin(), y_init.end(), y0.begin() + at * ldy);
    DeviceBuffer dy = upload(y0);
    DeviceBuffer dlinear = upload(std::vector<float>(m * n));
    DeviceBuffer dt = upload(std::vector<float>(m * rank));

    ASSERT_OK(
        be.Linear(dx.as<float>(), {dw.data(), DType::kF32, n, k}, m, dlinear.as<float>(), false));
    const LoraSegment segment{0, static_cast<int32_t>(m), da.as<float>(), db.as<float>(), rank,
                              1.25f};
    ASSERT_OK(be.LoraShrink(dx.as<float>(), k, &segment, 1, dt.as<float>()));
    ASSERT_OK(be.LoraExpand(dt.as<float>(), &segment, 1, n, dy.as<float>(), ldy));
    linear->resize(n);
    lora->resize(ldy);
    ASSERT_OK(be.CopyToHost(linear->data(), dlinear.as<float>() + at * n, n * sizeof(float)));
    ASSERT_OK(be.CopyToHost(lora->data(), dy.as<float>() + at * ldy, ldy * sizeof(float)));
  };

  std::vector<float> linear_alone, lora_alone;
  run(1, 1, 0, &linear_alone, &lora_alone);
  for (const int threads : kInvariantThreads) {
    for (const int64_t m : kInvariantRows) {
      for (const int64_t at : {int64_t{0}, m / 2, m - 1}) {
        std::vector<float> linear, lora;
        run(threads, m, at, &linear, &lora);
        EXPECT_TRUE(SameBits(linear.data(), linear_alone.data(), n))
            << "Linear threads=" << threads << " m=" << m << " row=" << at;
        EXPECT_TRUE(SameBits(lora.data(), lora_alone.data(), ldy))
            << "LoRA threads=" << threads << " m=" << m << " row=" << at;
      }
    }
  }
}

TEST_P(CpuBackendTest, MergeLoraMatchesReferenceAndKeepsBase) {
  const int64_t rows = 37, cols = 29;
  const int32_t rank = 5;
  const float lora_scale = 0.75f;
  const std::vector<float> w = RandomFloats(rows * cols, 501);
  const std::vector<float> a = RandomFloats(rank * cols, 502);
  const std::vector<float> b = RandomFloats(rows * rank, 503);
  DeviceBuffer dw = Upload(w), da = Upload(a), db = Upload(b);
  DeviceBuffer merged = Poisoned(rows * cols);
  ASSERT_OK(backend_->MergeLora({dw.data(), DType::kF32, rows, cols}, da.as<float>(),
                                db.as<float>(), rank, lora_scale, merged.data()));
  std::vector<double> ref(rows * cols), scale(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      double sum = 0, abs_sum = 0;
      for (int32_t r = 0; r < rank; ++r) {
        sum += double(b[r * rows + i]) * a[r * cols + j];  // b holds Bᵀ: [rank, rows]
        abs_sum += std::abs(double(b[r * rows + i]) * a[r * cols + j]);
      }
      ref[i * cols + j] = w[i * cols + j] + lora_scale * sum;
      scale[i * cols + j] = std::abs(w[i * cols + j]) + lora_scale * abs_sum;
    }
  }
  ExpectClose(Download(merged, rows * cols), ref, scale, kReductionTol, "MergeLora");
  EXPECT_EQ(Download(dw, rows * cols), w);
}

TEST_P(CpuBackendTest, LoraOpsRejectBadSegments) {
  DeviceBuffer x = Upload(RandomFloats(16, 1));
  DeviceBuffer t = Poisoned(16);
  LoraSegment bad{3, 1, x.as<float>(), x.as<float>(), 2, 1.0f};
  EXPECT_THAT(backend_->LoraShrink(x.as<float>(), 4, &bad, 1, t.as<float>()),
              StatusIs(absl::StatusCode::kInvalidArgument));
  LoraSegment no_rank{0, 1, x.as<float>(), x.as<float>(), 0, 1.0f};
  EXPECT_THAT(backend_->LoraExpand(t.as<float>(), &no_rank, 1, 4, x.as<float>(), 4),
              StatusIs(absl::StatusCode::kInvalidArgument));
  LoraSegment ok{0, 1, x.as<float>(), x.as<float>(), 2, 1.0f};
  EXPECT_THAT(backend_->LoraExpand(t.as<float>(), &ok, 1, 4, x.as<float>(), 3),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_P(CpuBackendTest, EmbeddingCopiesRows) {
  const int64_t vocab = 67, hidden = 33;
  const std::vector<float> table = RandomFloats(vocab * hidden, 3);
  const std::vector<int32_t> ids = {0, 66, 5, 5, 40, 1, 65};
  DeviceBuffer dtable = Upload(table);
  DeviceBuffer dids = Upload(ids);
  DeviceBuffer dy = Poisoned(ids.size() * hidden);
  const WeightView view{dtable.data(), DType::kF32, vocab, hidden};
  ASSERT_OK(backend_->Embedding(dids.as<int32_t>(), ids.size(), view, dy.as<float>()));
  const std::vector<float> got = Download(dy, ids.size() * hidden);
  for (size_t i = 0; i < ids.size(); ++i) {
    for (int64_t c = 0; c < hidden; ++c) {
      ASSERT_EQ(got[i * hidden + c], table[ids[i] * hidden + c]) << "row " << i << " col " << c;
    }
  }
}

TEST_P(CpuBackendTest, EmbeddingRejectsIdsOutsideVocabulary) {
  DeviceBuffer dtable = Upload(RandomFloats(67 * 4, 3));
  DeviceBuffer dy = Poisoned(3 * 4);
  const WeightView view{dtable.data(), DType::kF32, 67, 4};
  for (int32_t bad : {67, -1}) {
    DeviceBuffer dids = Upload(std::vector<int32_t>{1, bad, 2});
    absl::Status status = backend_->Embedding(dids.as<int32_t>(), 3, view, dy.as<float>());
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange));
    EXPECT_THAT(status.message(), HasSubstr(absl::StrCat("token id ", bad)));
    EXPECT_THAT(status.message(), HasSubstr("67"));
  }
}

struct RowsShape {
  int64_t n, dim;
};

TEST_P(CpuBackendTest, RmsNormMatchesReference) {
  const float eps = 1e-5f;
  uint32_t seed = 20;
  for (const RowsShape& shape : {RowsShape{1, 67}, RowsShape{5, 64}, RowsShape{600, 128}}) {
    for (bool in_place : {false, true}) {
      const auto [n, dim] = shape;
      const std::vector<float> x = RandomFloats(n * dim, ++seed, 2.0f);
      const std::vector<float> weight = RandomFloats(dim, ++seed);
      DeviceBuffer dx = Upload(x);
      DeviceBuffer dw = Upload(weight);
      DeviceBuffer dy = in_place ? DeviceBuffer() : Poisoned(n * dim);
      float* y = in_place ? dx.as<float>() : dy.as<float>();
      ASSERT_OK(backend_->RmsNorm(dx.as<float>(), dw.as<float>(), n, dim, eps, y));
      std::vector<double> ref(n * dim), scale(n * dim);
      for (int64_t r = 0; r < n; ++r) {
        double sum_sq = 0;
        for (int64_t c = 0; c < dim; ++c)
          sum_sq += static_cast<double>(x[r * dim + c]) * x[r * dim + c];
        const double inv_rms = 1.0 / std::sqrt(sum_sq / dim + eps);
        for (int64_t c = 0; c < dim; ++c) {
          ref[r * dim + c] = weight[c] * (x[r * dim + c] * inv_rms);
          scale[r * dim + c] = std::abs(ref[r * dim + c]);
        }
      }
      ExpectClose(Download(in_place ? dx : dy, n * dim), ref, scale, kElementwiseTol,
                  absl::StrCat("RmsNorm n=", n, " dim=", dim, " in_place=", in_place));
    }
  }
}

TEST_P(CpuBackendTest, AddAndAddBiasMatchReference) {
  uint32_t seed = 30;
  for (int64_t count : {int64_t{1}, int64_t{67}, int64_t{100003}}) {
    const std::vector<float> x = RandomFloats(count, ++seed);
    const std::vector<float> y = RandomFloats(count, ++seed);
    DeviceBuffer dx = Upload(x);
    DeviceBuffer dy = Upload(y);
    ASSERT_OK(backend_->Add(dx.as<float>(), dy.as<float>(), count));
    std::vector<double> ref(count), scale(count);
    for (int64_t i = 0; i < count; ++i) {
      ref[i] = static_cast<double>(x[i]) + y[i];
      scale[i] = std::abs(x[i]) + std::abs(y[i]);
    }
    ExpectClose(Download(dx, count), ref, scale, kElementwiseTol, absl::StrCat("Add ", count));
  }
  for (const RowsShape& shape : {RowsShape{1, 67}, RowsShape{3, 64}, RowsShape{700, 100}}) {
    const auto [n, dim] = shape;
    const std::vector<float> x = RandomFloats(n * dim, ++seed);
    const std::vector<float> bias = RandomFloats(dim, ++seed);
    DeviceBuffer dx = Upload(x);
    DeviceBuffer dbias = Upload(bias);
    ASSERT_OK(backend_->AddBias(dx.as<float>(), dbias.as<float>(), n, dim));
    std::vector<double> ref(n * dim), scale(n * dim);
    for (int64_t i = 0; i < n * dim; ++i) {
      ref[i] = static_cast<double>(x[i]) + bias[i % dim];
      scale[i] = std::abs(x[i]) + std::abs(bias[i % dim]);
    }
    ExpectClose(Download(dx, n * dim), ref, scale, kElementwiseTol,
                absl::StrCat("AddBias n=", n, " dim=", dim));
  }
}

TEST_P(CpuBackendTest, SiluMulMatchesReference) {
  uint32_t seed = 40;
  for (const RowsShape& shape : {RowsShape{1, 67}, RowsShape{7, 64}, RowsShape{200, 300}}) {
    const auto [n, dim] = shape;
    std::vector<float> gate_up = RandomFloats(n * 2 * dim, ++seed, 4.0f);
    // Saturated and zero gates.
    gate_up[0] = -100.0f;
    gate_up[1 % dim] = 100.0f;
    gate_up[2 % dim] = 0.0f;
    DeviceBuffer din = Upload(gate_up);
    DeviceBuffer dout = Poisoned(n * dim);
    ASSERT_OK(backend_->SiluMul(din.as<float>(), n, dim, dout.as<float>()));
    std::vector<double> ref(n * dim), scale(n * dim);
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < dim; ++c) {
        const double gate = gate_up[r * 2 * dim + c];
        const double up = gate_up[r * 2 * dim + dim + c];
        ref[r * dim + c] = gate / (1.0 + std::exp(-gate)) * up;
        scale[r * dim + c] = std::abs(ref[r * dim + c]);
      }
    }
    ExpectClose(Download(dout, n * dim), ref, scale, kElementwiseTol,
                absl::StrCat("SiluMul n=", n, " dim=", dim));
  }
}

TEST_P(CpuBackendTest, ElementwiseOpsRejectBadArguments) {
  DeviceBuffer d = Poisoned(16);
  float* p = d.as<float>();
  absl::Status status = backend_->RmsNorm(p, nullptr, 2, 8, 1e-5f, p);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("weight"));
  EXPECT_THAT(backend_->RmsNorm(p, p, 2, 0, 1e-5f, p),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(backend_->Add(p, nullptr, 16), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(backend_->Add(p, p, -1), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(backend_->AddBias(p, p, -2, 8), StatusIs(absl::StatusCode::kInvalidArgument));
  status = backend_->SiluMul(nullptr, 2, 4, p);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("gate_up"));
}

// ---- rotary ---------------------------------------------------------------

std::vector<float> InvFreq(int head_dim, float theta) {
  std::vector<float> inv_freq(head_dim / 2);
  for (int i = 0; i < head_dim / 2; ++i) {
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / head_dim);
  }
  return inv_freq;
}

// Rotate-half on every head of `x` [tokens, heads, head_dim], with the angle
// rounded to float32 as Hugging Face computes it and the rest in double.
void RopeReference(const std::vector<float>& x, const std::vector<int32_t>& positions, int heads,
                   int head_dim, const std::vector<float>& inv_freq, float scaling,
                   std::vector<double>& ref, std::vector<double>& scale) {
  const int half = head_dim / 2;
  ref.assign(x.size(), 0);
  scale.assign(x.size(), 0);
  for (size_t t = 0; t < positions.size(); ++t) {
    for (int h = 0; h < heads; ++h) {
      const size_t base = (t * heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float angle = inv_freq[i] * static_cast<float>(positions[t]);
        const double c = std::cos(static_cast<double>(angle)) * scaling;
        const double s = std::sin(static_cast<double>(angle)) * scaling;
        const double x1 = x[base + i], x2 = x[base + half + i];
        ref[base + i] = x1 * c - x2 * s;
        ref[base + half + i] = x2 * c + x1 * s;
        scale[base + i] = std::abs(x1 * c) + std::abs(x2 * s);
        scale[base + half + i] = std::abs(x2 * c) + std::abs(x1 * s);
      }
    }
  }
}

TEST_P(CpuBackendTest, RopeMatchesReference) {
  struct Case {
    int tokens, heads, kv_heads, head_dim;
    float scaling;
  };
  uint32_t seed = 50;
  for (const Case& c :
       {Case{5, 4, 2, 64, 1.0f}, Case{3, 3, 1, 6, 1.3f}, Case{300, 8, 2, 128, 1.0f}}) {
    std::vector<int32_t> positions(c.tokens);
    std::mt19937 rng(++seed);
    std::uniform_int_distribution<int32_t> pos_dist(0, 5000);
    for (int32_t& p : positions) p = pos_dist(rng);
    positions[0] = 0;
    const std::vector<float> inv_freq = InvFreq(c.head_dim, 10000.0f);
    const std::vector<float> q = RandomFloats(c.tokens * c.heads * c.head_dim, ++seed);
    const std::vector<float> k = RandomFloats(c.tokens * c.kv_heads * c.head_dim, ++seed);
    DeviceBuffer dq = Upload(q), dk = Upload(k), dpos = Upload(positions), dfreq = Upload(inv_freq);
    const RopeParams params{dfreq.as<float>(), c.head_dim, c.scaling};
    ASSERT_OK(backend_->Rope(dq.as<float>(), c.heads * c.head_dim, dk.as<float>(),
                             c.kv_heads * c.head_dim, dpos.as<int32_t>(), c.tokens, c.heads,
                             c.kv_heads, params));
    std::vector<double> ref, scale;
    const std::string what = absl::StrCat("Rope tokens=", c.tokens, " head_dim=", c.head_dim);
    RopeReference(q, positions, c.heads, c.head_dim, inv_freq, c.scaling, ref, scale);
    ExpectClose(Download(dq, q.size()), ref, scale, kElementwiseTol, what + " q");
    RopeReference(k, positions, c.kv_heads, c.head_dim, inv_freq, c.scaling, ref, scale);
    ExpectClose(Download(dk, k.size()), ref, scale, kElementwiseTol, what + " k");
  }
}

TEST_P(CpuBackendTest, RopeRejectsBadArguments) {
  DeviceBuffer d = Upload(RandomFloats(64, 1));
  DeviceBuffer freq = Upload(InvFreq(8, 10000.0f));
  DeviceBuffer pos = Upload(std::vector<int32_t>{-3});
  DeviceBuffer good_pos = Upload(std::vector<int32_t>{3});
  float* p = d.as<float>();
  absl::Status status =
      backend_->Rope(p, 16, p, 16, good_pos.as<int32_t>(), 1, 2, 2, {freq.as<float>(), 7, 1.0f});
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("head_dim"));
  status = backend_->Rope(p, 16, p, 16, pos.as<int32_t>(), 1, 2, 2, {freq.as<float>(), 8, 1.0f});
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(status.message(), HasSubstr("positions[0]"));
  status = backend_->Rope(p, 16, p, 16, good_pos.as<int32_t>(), 1, 2, 2, {nullptr, 8, 1.0f});
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("inv_freq"));
  // Rows closer together than a row of heads.
  status =
      backend_->Rope(p, 15, p, 16, good_pos.as<int32_t>(), 1, 2, 2, {freq.as<float>(), 8, 1.0f});
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("q_ld is 15, less than a row of 16 floats"));
  status =
      backend_->Rope(p, 16, p, 8, good_pos.as<int32_t>(), 1, 2, 2, {freq.as<float>(), 8, 1.0f});
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("k_ld"));
}

// ---- paged attention ------------------------------------------------------

// One sequence of an attention step: `context` tokens in the cache after the
// step, the last `queries` of which are computed in this step.
struct SeqSpec {
  int32_t context;
  int32_t queries;
};

// A batch of sequences over a paged cache with shuffled (non-contiguous)
// block tables, its keys and values kept on the host by (sequence, position)
// for the reference.
class AttentionScenario {
 public:
  AttentionScenario(CpuBackendTest* test, Backend& backend, const std::vector<SeqSpec>& seqs,
                    KvLayout layout, int32_t num_heads, uint32_t seed)
      : seqs_(seqs), layout_(layout), num_heads_(num_heads) {
    const int32_t num_seqs = static_cast<int32_t>(seqs.size());
    max_blocks_ = 0;
    for (const SeqSpec& s : seqs) {
      max_blocks_ = std::max(max_blocks_, (s.context + layout.block_size - 1) / layout.block_size);
    }
    max_blocks_ += 1;  // an unused trailing entry, set to -1
    std::vector<int32_t> free_blocks(layout.num_blocks);
    std::iota(free_blocks.begin(), free_blocks.end(), 0);
    std::mt19937 rng(seed);
    std::shuffle(free_blocks.begin(), free_blocks.end(), rng);
    block_tables_.assign(num_seqs * max_blocks_, -1);
    size_t next_block = 0;
    for (int32_t s = 0; s < num_seqs; ++s) {
      for (int32_t b = 0; b * layout.block_size < seqs[s].context; ++b) {
        block_tables_[s * max_blocks_ + b] = free_blocks.at(next_block++);
      }
    }
    const int64_t kv_floats = static_cast<int64_t>(layout.num_kv_heads) * layout.head_dim;
    for (int32_t s = 0; s < num_seqs; ++s) {
      keys_.push_back(RandomFloats(seqs[s].context * kv_floats, seed + 100 + s));
      values_.push_back(RandomFloats(seqs[s].context * kv_floats, seed + 200 + s));
    }
    query_start_.push_back(0);
    for (int32_t s = 0; s < num_seqs; ++s) {
      query_start_.push_back(query_start_.back() + seqs[s].queries);
      context_lens_.push_back(seqs[s].context);
    }
    num_tokens_ = query_start_.back();
    for (int32_t s = 0; s < num_seqs; ++s) {
      for (int32_t p = seqs[s].context - seqs[s].queries; p < seqs[s].context; ++p) {
        token_seq_.push_back(s);
        positions_.push_back(p);
        slots_.push_back(Slot(s, p));
      }
    }
    q_ = RandomFloats(num_tokens_ * num_heads * layout.head_dim, seed + 300);
    d_query_start_ = test->Upload(query_start_);
    d_context_lens_ = test->Upload(context_lens_);
    d_block_tables_ = test->Upload(block_tables_);
    d_positions_ = test->Upload(positions_);
    d_slots_ = test->Upload(slots_);
  }

  int32_t Slot(int32_t seq, int32_t position) const {
    return block_tables_[seq * max_blocks_ + position / layout_.block_size] * layout_.block_size +
           position % layout_.block_size;
  }

  AttentionBatch Batch() const {
    AttentionBatch batch;
    batch.num_seqs = static_cast<int32_t>(seqs_.size());
    batch.num_tokens = num_tokens_;
    batch.query_start = d_query_start_.as<int32_t>();
    batch.context_lens = d_context_lens_.as<int32_t>();
    batch.block_tables = d_block_tables_.as<int32_t>();
    batch.max_blocks_per_seq = max_blocks_;
    batch.slot_mapping = d_slots_.as<int32_t>();
    batch.positions = d_positions_.as<int32_t>();
    return batch;
  }

  // Writes the keys and values of every cached position: the history through
  // a WriteKv batch of its own, then this step's tokens through Batch().
  void FillCache(CpuBackendTest* test, Backend& backend, float* k_cache, float* v_cache) {
    const int64_t kv_floats = static_cast<int64_t>(layout_.num_kv_heads) * layout_.head_dim;
    std::vector<float> k_hist, v_hist, k_step, v_step;
    std::vector<int32_t> hist_slots;
    for (size_t s = 0; s < seqs_.size(); ++s) {
      for (int32_t p = 0; p < seqs_[s].context; ++p) {
        const bool in_step = p >= seqs_[s].context - seqs_[s].queries;
        auto& k_out = in_step ? k_step : k_hist;
        auto& v_out = in_step ? v_step : v_hist;
        k_out.insert(k_out.end(), keys_[s].begin() + p * kv_floats,
                     keys_[s].begin() + (p + 1) * kv_floats);
        v_out.insert(v_out.end(), values_[s].begin() + p * kv_floats,
                     values_[s].begin() + (p + 1) * kv_floats);
        if (!in_step) hist_slots.push_back(Slot(static_cast<int32_t>(s), p));
      }
    }
    if (!hist_slots.empty()) {
      DeviceBuffer dk = test->Upload(k_hist), dv = test->Upload(v_hist);
      DeviceBuffer dslots = test->Upload(hist_slots);
      AttentionBatch hist;
      hist.num_tokens = static_cast<int32_t>(hist_slots.size());
      hist.slot_mapping = dslots.as<int32_t>();
      ASSERT_OK(backend.WriteKv(dk.as<float>(), dv.as<float>(), kv_floats, hist, layout_, k_cache,
                                v_cache));
    }
    DeviceBuffer dk = test->Upload(k_step), dv = test->Upload(v_step);
    ASSERT_OK(backend.WriteKv(dk.as<float>(), dv.as<float>(), kv_floats, Batch(), layout_, k_cache,
                              v_cache));
  }

  // Causal softmax attention in double, with scale = Σ_j p_j |v_j| per output.
  void Reference(std::vector<double>& ref, std::vector<double>& scale) const {
    const int64_t hd = layout_.head_dim;
    const int32_t group = num_heads_ / layout_.num_kv_heads;
    ref.assign(num_tokens_ * num_heads_ * hd, 0);
    scale.assign(ref.size(), 0);
    for (int32_t t = 0; t < num_tokens_; ++t) {
      const int32_t s = token_seq_[t];
      const int32_t ctx = positions_[t] + 1;
      for (int32_t h = 0; h < num_heads_; ++h) {
        const int32_t kvh = h / group;
        const float* q = q_.data() + (t * num_heads_ + h) * hd;
        std::vector<double> scores(ctx);
        for (int32_t j = 0; j < ctx; ++j) {
          const float* k = keys_[s].data() + (j * layout_.num_kv_heads + kvh) * hd;
          double dot = 0;
          for (int64_t i = 0; i < hd; ++i) dot += static_cast<double>(q[i]) * k[i];
          scores[j] = dot / std::sqrt(static_cast<double>(hd));
        }
        const double max = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (double& sc : scores) sum += (sc = std::exp(sc - max));
        double* out = ref.data() + (t * num_heads_ + h) * hd;
        double* out_scale = scale.data() + (t * num_heads_ + h) * hd;
        for (int32_t j = 0; j < ctx; ++j) {
          const float* v = values_[s].data() + (j * layout_.num_kv_heads + kvh) * hd;
          for (int64_t i = 0; i < hd; ++i) {
            out[i] += scores[j] / sum * v[i];
            out_scale[i] += scores[j] / sum * std::abs(v[i]);
          }
        }
      }
    }
  }

  const std::vector<float>& q() const { return q_; }
  int32_t num_tokens() const { return num_tokens_; }
  std::vector<int32_t>& block_tables() { return block_tables_; }
  int32_t max_blocks() const { return max_blocks_; }

 private:
  std::vector<SeqSpec> seqs_;
  KvLayout layout_;
  int32_t num_heads_;
  int32_t max_blocks_;
  int32_t num_tokens_;
  std::vector<int32_t> block_tables_, query_start_, context_lens_, positions_, slots_, token_seq_;
  std::vector<std::vector<float>> keys_, values_;  // per sequence [context, kv_heads, head_dim]
  std::vector<float> q_;
  DeviceBuffer d_query_start_, d_context_lens_, d_block_tables_, d_positions_, d_slots_;
};

struct AttentionCase {
  std::string name;
  std::vector<SeqSpec> seqs;
  int32_t num_heads, num_kv_heads, head_dim;
};

TEST_P(CpuBackendTest, PagedAttentionMatchesReference) {
  const AttentionCase cases[] = {
      // Mixed step: a decode, a full prefill, a chunked prefill, a decode at a
      // block boundary; GQA 8:2.
      {"mixed", {{1, 1}, {17, 17}, {50, 5}, {33, 1}}, 8, 2, 64},
      // Long-context decode of several sequences.
      {"decode", {{300, 1}, {257, 1}, {16, 1}, {700, 2}}, 8, 2, 64},
      // Odd head_dim and multi-query attention.
      {"mqa_odd", {{20, 3}, {7, 7}}, 4, 1, 37},
      // No grouping.
      {"mha", {{40, 40}}, 3, 3, 32},
  };
  uint32_t seed = 60;
  for (const AttentionCase& c : cases) {
    const KvLayout layout{96, 16, c.num_kv_heads, c.head_dim};
    AttentionScenario scenario(this, *backend_, c.seqs, layout, c.num_heads, ++seed);
    const size_t cache_floats =
        static_cast<size_t>(layout.num_blocks) * layout.block_size * c.num_kv_heads * c.head_dim;
    // Unwritten slots stay NaN: reading one poisons the output.
    DeviceBuffer k_cache = Poisoned(cache_floats), v_cache = Poisoned(cache_floats);
    scenario.FillCache(this, *backend_, k_cache.as<float>(), v_cache.as<float>());
    DeviceBuffer dq = Upload(scenario.q());
    const size_t out_floats = static_cast<size_t>(scenario.num_tokens()) * c.num_heads * c.head_dim;
    DeviceBuffer dout = Poisoned(out_floats);
    absl::Status status = backend_->PagedAttention(
        dq.as<float>(), c.num_heads * c.head_dim, scenario.Batch(), layout, c.num_heads,
        k_cache.as<float>(), v_cache.as<float>(), dout.as<float>());
    ASSERT_TRUE(status.ok()) << c.name << ": " << status;
    std::vector<double> ref, scale;
    scenario.Reference(ref, scale);
    ExpectClose(Download(dout, out_floats), ref, scale, kReductionTol, c.name);
  }
}

TEST_P(CpuBackendTest, PagedAttentionAndWriteKvRejectBadArguments) {
  const KvLayout layout{8, 16, 2, 16};
  AttentionScenario scenario(this, *backend_, {{20, 2}, {5, 1}}, layout, 8, 7);
  const size_t cache_floats = 8 * 16 * 2 * 16;
  DeviceBuffer k_cache = Poisoned(cache_floats), v_cache = Poisoned(cache_floats);
  DeviceBuffer dq = Upload(scenario.q());
  DeviceBuffer dout = Poisoned(scenario.num_tokens() * 8 * 16);
  const auto attend = [&](const AttentionBatch& batch, const KvLayout& l, int32_t heads) {
    return backend_->PagedAttention(dq.as<float>(), int64_t{heads} * l.head_dim, batch, l, heads,
                                    k_cache.as<float>(), v_cache.as<float>(), dout.as<float>());
  };

  absl::Status status = attend(scenario.Batch(), {8, 16, 4, 16}, 6);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("multiple of layout.num_kv_heads"));

  status = attend(scenario.Batch(), {8, 0, 2, 16}, 8);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("block_size"));

  // This backend's cache is float32 (KvCacheDType).
  EXPECT_EQ(backend_->KvCacheDType(), DType::kF32);
  status = attend(scenario.Batch(), {8, 16, 2, 16, DType::kBF16}, 8);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("layout.dtype is BF16"));

  status = backend_->PagedAttention(nullptr, 8 * 16, scenario.Batch(), layout, 8,
                                    k_cache.as<float>(), v_cache.as<float>(), dout.as<float>());
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("q is null"));
  status = backend_->PagedAttention(dq.as<float>(), 8 * 16 - 1, scenario.Batch(), layout, 8,
                                    k_cache.as<float>(), v_cache.as<float>(), dout.as<float>());
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("q_ld is 127, less than a row of 128 floats"));

  // A block id beyond the cache.
  DeviceBuffer bad_tables = Upload(std::vector<int32_t>(scenario.block_tables().size(), 8));
  AttentionBatch batch = scenario.Batch();
  batch.block_tables = bad_tables.as<int32_t>();
  status = attend(batch, layout, 8);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(status.message(), HasSubstr("block_tables[0][0] is 8"));

  // A position beyond its sequence's context.
  DeviceBuffer bad_positions = Upload(std::vector<int32_t>{18, 20, 4});
  batch = scenario.Batch();
  batch.positions = bad_positions.as<int32_t>();
  status = attend(batch, layout, 8);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(status.message(), HasSubstr("positions[1] is 20"));

  // A context longer than the block table can hold.
  DeviceBuffer bad_context = Upload(std::vector<int32_t>{20, 1000});
  batch = scenario.Batch();
  batch.context_lens = bad_context.as<int32_t>();
  status = attend(batch, layout, 8);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(status.message(), HasSubstr("context_lens[1]"));

  // query_start that does not end at num_tokens.
  batch = scenario.Batch();
  batch.num_tokens = 2;
  status = attend(batch, layout, 8);
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("query_start"));

  // WriteKv: a slot beyond the cache, and a null cache.
  DeviceBuffer kv = Upload(RandomFloats(3 * 2 * 16, 9));
  DeviceBuffer bad_slots = Upload(std::vector<int32_t>{0, 128, 1});
  batch = scenario.Batch();
  batch.slot_mapping = bad_slots.as<int32_t>();
  status = backend_->WriteKv(kv.as<float>(), kv.as<float>(), 32, batch, layout, k_cache.as<float>(),
                             v_cache.as<float>());
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kOutOfRange));
  EXPECT_THAT(status.message(), HasSubstr("slot_mapping[1] is 128"));
  status = backend_->WriteKv(kv.as<float>(), kv.as<float>(), 32, scenario.Batch(), layout, nullptr,
                             v_cache.as<float>());
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("k_cache"));
  status = backend_->WriteKv(kv.as<float>(), kv.as<float>(), 31, scenario.Batch(), layout,
                             k_cache.as<float>(), v_cache.as<float>());
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("kv_ld is 31, less than a row of 32 floats"));
}

}  // namespace
// The model keeps each token's q, k and v side by side in one row of its
// fused projection: read through row strides, Rope, WriteKv and
// PagedAttention give exactly what they give on separate buffers, and leave
// the rest of each row alone.
TEST_P(CpuBackendTest, FusedQkvRowsGiveWhatSeparateBuffersGive) {
  const int32_t heads = 4, kv_heads = 2, head_dim = 16;
  const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
  const KvLayout layout{4, 16, kv_heads, head_dim};
  // One sequence of 5 tokens, all in this step (a prefill), in cache block 2.
  const int64_t tokens = 5;
  const std::vector<float> q = RandomFloats(tokens * q_width, 71);
  const std::vector<float> k = RandomFloats(tokens * kv_width, 72);
  const std::vector<float> v = RandomFloats(tokens * kv_width, 73);
  const std::vector<int32_t> positions = {0, 1, 2, 3, 4};
  DeviceBuffer pos = Upload(positions), freq = Upload(InvFreq(head_dim, 10000.0f));
  DeviceBuffer query_start = Upload(std::vector<int32_t>{0, 5});
  DeviceBuffer context_lens = Upload(std::vector<int32_t>{5});
  DeviceBuffer block_tables = Upload(std::vector<int32_t>{2});
  DeviceBuffer slots = Upload(std::vector<int32_t>{32, 33, 34, 35, 36});
  const AttentionBatch batch{1,
                             5,
                             query_start.as<int32_t>(),
                             context_lens.as<int32_t>(),
                             block_tables.as<int32_t>(),
                             1,
                             slots.as<int32_t>(),
                             pos.as<int32_t>()};
  const size_t cache_floats = 4 * 16 * kv_width;
  const size_t out_floats = static_cast<size_t>(tokens * q_width);
  const RopeParams rope{freq.as<float>(), head_dim, 1.0f};

  // Separate buffers.
  DeviceBuffer dq = Upload(q), dk = Upload(k), dv = Upload(v);
  DeviceBuffer k_cache = Poisoned(cache_floats), v_cache = Poisoned(cache_floats);
  DeviceBuffer out = Poisoned(out_floats);
  ASSERT_OK(backend_->Rope(dq.as<float>(), q_width, dk.as<float>(), kv_width, pos.as<int32_t>(),
                           tokens, heads, kv_heads, rope));
  ASSERT_OK(backend_->WriteKv(dk.as<float>(), dv.as<float>(), kv_width, batch, layout,
                              k_cache.as<float>(), v_cache.as<float>()));
  ASSERT_OK(backend_->PagedAttention(dq.as<float>(), q_width, batch, layout, heads,
                                     k_cache.as<float>(), v_cache.as<float>(), out.as<float>()));

  // One fused buffer, with NaN padding at the end of every row.
  const std::vector<float> fused =
      test_support::SideBySide(tokens, {{&q, q_width}, {&k, kv_width}, {&v, kv_width}}, 3);
  const int64_t ld = q_width + 2 * kv_width + 3;
  DeviceBuffer dqkv = Upload(fused);
  float* fq = dqkv.as<float>();
  float* fk = fq + q_width;
  float* fv = fk + kv_width;
  DeviceBuffer fk_cache = Poisoned(cache_floats), fv_cache = Poisoned(cache_floats);
  DeviceBuffer fout = Poisoned(out_floats);
  ASSERT_OK(backend_->Rope(fq, ld, fk, ld, pos.as<int32_t>(), tokens, heads, kv_heads, rope));
  ASSERT_OK(
      backend_->WriteKv(fk, fv, ld, batch, layout, fk_cache.as<float>(), fv_cache.as<float>()));
  ASSERT_OK(backend_->PagedAttention(fq, ld, batch, layout, heads, fk_cache.as<float>(),
                                     fv_cache.as<float>(), fout.as<float>()));

  const auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
  };
  const std::vector<float> after = Download(dqkv, fused.size());
  EXPECT_TRUE(
      same(test_support::ColumnSlice(after, tokens, ld, 0, q_width), Download(dq, q.size())));
  EXPECT_TRUE(same(test_support::ColumnSlice(after, tokens, ld, q_width, kv_width),
                   Download(dk, k.size())));
  EXPECT_TRUE(same(test_support::ColumnSlice(after, tokens, ld, q_width + kv_width, kv_width), v));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = ld - 3; c < ld; ++c) EXPECT_TRUE(std::isnan(after[t * ld + c]));
  }
  EXPECT_TRUE(same(Download(fk_cache, cache_floats), Download(k_cache, cache_floats)));
  EXPECT_TRUE(same(Download(fv_cache, cache_floats), Download(v_cache, cache_floats)));
  EXPECT_TRUE(same(Download(fout, out_floats), Download(out, out_floats)));
}

}  // namespace loraserve::kernels
