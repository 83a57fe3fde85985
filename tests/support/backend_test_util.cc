#include "tests/support/backend_test_util.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::test_support {

using kernels::Backend;
using kernels::DeviceBuffer;
using kernels::DType;

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

std::vector<float> RandomVector(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::vector<uint16_t> Bf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> bits(v.size());
  kernels::ConvertFloat32ToBf16(v.data(), static_cast<int64_t>(v.size()), bits.data());
  return bits;
}

std::vector<float> RoundToBf16(const std::vector<float>& v) { return RoundTo(DType::kBF16, v); }

std::vector<float> RoundTo(DType dtype, const std::vector<float>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  std::vector<uint16_t> bits(values.size());
  if (dtype == DType::kBF16) {
    kernels::ConvertFloat32ToBf16(values.data(), n, bits.data());
  } else if (dtype == DType::kF16) {
    kernels::ConvertFloat32ToF16(values.data(), n, bits.data());
  } else {
    return values;
  }
  std::vector<float> rounded(values.size());
  kernels::ConvertToFloat32(bits.data(), dtype, n, rounded.data());
  return rounded;
}

DeviceBuffer UploadBytes(Backend& backend, const void* host, size_t bytes) {
  absl::StatusOr<DeviceBuffer> buffer = backend.Allocate(std::max<size_t>(bytes, 1));
  EXPECT_OK(buffer);
  if (!buffer.ok()) return DeviceBuffer();
  EXPECT_OK(backend.CopyToDevice(buffer->data(), host, bytes));
  return *std::move(buffer);
}

DeviceBuffer UploadAs(Backend& backend, DType dtype, const std::vector<float>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  if (dtype == DType::kF32) return Upload(backend, values);
  std::vector<uint16_t> bits(values.size());
  if (dtype == DType::kBF16) {
    kernels::ConvertFloat32ToBf16(values.data(), n, bits.data());
  } else {
    kernels::ConvertFloat32ToF16(values.data(), n, bits.data());
  }
  return Upload(backend, bits);
}

DeviceBuffer Poisoned(Backend& backend, size_t count) {
  return Upload(backend, std::vector<float>(count, kNaN));
}

std::vector<float> Download(Backend& backend, const DeviceBuffer& buffer, size_t count) {
  return DownloadAs(backend, buffer, DType::kF32, count);
}

std::vector<float> DownloadAs(Backend& backend, const DeviceBuffer& buffer, DType dtype,
                              size_t count) {
  std::vector<char> raw(count * kernels::DTypeSize(dtype));
  EXPECT_OK(backend.CopyToHost(raw.data(), buffer.data(), raw.size()));
  std::vector<float> host(count);
  kernels::ConvertToFloat32(raw.data(), dtype, static_cast<int64_t>(count), host.data());
  return host;
}

Weight UploadWeight(Backend& backend, const std::vector<float>& host, int64_t rows, int64_t cols) {
  const DType stored = backend.WeightDType(DType::kF32);
  Weight w;
  absl::StatusOr<DeviceBuffer> buffer = backend.Allocate(kernels::WeightBytes(stored, rows, cols));
  EXPECT_OK(buffer);
  if (!buffer.ok()) return w;
  w.buffer = *std::move(buffer);
  EXPECT_OK(backend.UploadWeight(w.buffer.data(), host.data(), DType::kF32, rows, cols));
  w.view = {w.buffer.data(), stored, rows, cols};
  return w;
}

std::vector<float> WeightValues(Backend& backend, const Weight& w) {
  const int64_t row_bytes = kernels::WeightRowBytes(w.view.dtype, w.view.cols);
  std::vector<char> raw(static_cast<size_t>(row_bytes * w.view.rows));
  EXPECT_OK(backend.CopyToHost(raw.data(), w.view.data, raw.size()));
  std::vector<float> values(static_cast<size_t>(w.view.rows * w.view.cols));
  for (int64_t r = 0; r < w.view.rows; ++r) {
    kernels::ConvertToFloat32(raw.data() + r * row_bytes, w.view.dtype, w.view.cols,
                              values.data() + r * w.view.cols);
  }
  return values;
}

DeviceBuffer UploadLora(Backend& backend, const std::vector<float>& host) {
  return backend.LoraDType() == DType::kBF16 ? Upload(backend, Bf16Bits(host))
                                             : Upload(backend, host);
}

absl::StatusOr<std::vector<CudaCase>> CudaCases() {
  absl::StatusOr<std::unique_ptr<Backend>> bf16 = kernels::CreateCudaBackend({});
  if (!bf16.ok()) return bf16.status();
  absl::StatusOr<std::unique_ptr<Backend>> f32 =
      kernels::CreateCudaBackend({.weight_dtype = DType::kF32});
  if (!f32.ok()) return f32.status();
  std::vector<CudaCase> cases;
  cases.push_back({"bf16", *std::move(bf16), kBf16Bound, true});
  cases.push_back({"f32", *std::move(f32), kF32Bound, false});
  return cases;
}

void CudaAgainstCpuTest::SetUp() {
  absl::StatusOr<std::vector<CudaCase>> cases = CudaCases();
  if (!cases.ok()) GTEST_SKIP() << cases.status().message();
  cases_ = *std::move(cases);
  absl::StatusOr<std::unique_ptr<Backend>> cpu = kernels::CreateCpuBackend({.num_threads = 2});
  ASSERT_OK(cpu);
  cpu_ = *std::move(cpu);
}

}  // namespace loraserve::test_support
