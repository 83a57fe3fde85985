// Helpers for tests that run operations on a Backend and compare backends:
// seeded inputs, buffers in and out, values as a backend holds them, the
// relative error every comparison uses, and the CUDA backends under test.
#ifndef LORASERVE_TESTS_SUPPORT_BACKEND_TEST_UTIL_H_
#define LORASERVE_TESTS_SUPPORT_BACKEND_TEST_UTIL_H_

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"

namespace loraserve::test_support {

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// ‖a − ref‖ / ‖ref‖; infinity when any element of `a` is not finite.
double RelativeError(const std::vector<float>& a, const std::vector<float>& ref);

// `n` floats uniform in [lo, hi) from `seed`.
std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f);

// The bfloat16 bits of `v`, rounded to nearest (ties to even) as uploads
// round.
std::vector<uint16_t> Bf16Bits(const std::vector<float>& v);
// `v` rounded to bfloat16 and widened back.
std::vector<float> RoundToBf16(const std::vector<float>& v);

// A buffer on `backend` holding `host`.
kernels::DeviceBuffer UploadBytes(kernels::Backend& backend, const void* host, size_t bytes);
template <typename T>
kernels::DeviceBuffer Upload(kernels::Backend& backend, const std::vector<T>& host) {
  return UploadBytes(backend, host.data(), host.size() * sizeof(T));
}
// `values` on `backend` as elements of `dtype` (F32, F16 or BF16), rounded.
kernels::DeviceBuffer UploadAs(kernels::Backend& backend, kernels::DType dtype,
                               const std::vector<float>& values);
// `count` NaNs on `backend`: an output that must be written in full.
kernels::DeviceBuffer Poisoned(kernels::Backend& backend, size_t count);
// `count` floats of `buffer`.
std::vector<float> Download(kernels::Backend& backend, const kernels::DeviceBuffer& buffer,
                            size_t count);
// `count` elements of `dtype` (F32, F16 or BF16) in `buffer`, widened.
std::vector<float> DownloadAs(kernels::Backend& backend, const kernels::DeviceBuffer& buffer,
                              kernels::DType dtype, size_t count);

// A weight matrix uploaded from float32 through the backend's own conversion.
struct Weight {
  kernels::DeviceBuffer buffer;
  kernels::WeightView view;
};
Weight UploadWeight(kernels::Backend& backend, const std::vector<float>& host, int64_t rows,
                    int64_t cols);
// The values `w` holds, widened to float32 row by row: what a reference
// backend must be given to compute on the same weights.
std::vector<float> WeightValues(kernels::Backend& backend, const Weight& w);

// `values` as `dtype` holds them (F32, F16 or BF16), widened back.
std::vector<float> RoundTo(kernels::DType dtype, const std::vector<float>& values);
// LoRA matrices on `backend` in its LoraDType().
kernels::DeviceBuffer UploadLora(kernels::Backend& backend, const std::vector<float>& host);

// One CUDA backend under test with the bound its weight dtype earns.
struct CudaCase {
  std::string name;
  std::unique_ptr<kernels::Backend> backend;
  double bound;  // of one GEMM-bound op against the float32 CPU
  bool bf16;
};
// The default (bf16) CUDA backend and the float32 one; FailedPrecondition,
// saying why, without a GPU.
absl::StatusOr<std::vector<CudaCase>> CudaCases();

// A fixture holding the CUDA backends under test (CudaCases) and the float32
// CPU backend they are compared with; every case skips, saying why, without
// a GPU.
class CudaAgainstCpuTest : public ::testing::Test {
 protected:
  void SetUp() override;

  std::vector<CudaCase> cases_;
  std::unique_ptr<kernels::Backend> cpu_;
};

// Relative error bounds of one op: float32 throughout, or bf16 GEMM operands.
inline constexpr double kF32Bound = 1e-5;
inline constexpr double kBf16Bound = 1e-2;

}  // namespace loraserve::test_support

#endif  // LORASERVE_TESTS_SUPPORT_BACKEND_TEST_UTIL_H_
