// What the kernels of kernels/cuda share: launch sizes, element conversions,
// dtype dispatch, device-side error recording and warp sums. Private to the
// .cu files of kernels/cuda.
//
// The kernels are simple, correct first: float32 arithmetic everywhere
// (weights are converted on load from bf16/f16), coalesced accesses,
// grid-stride loops, one launch per operation. Everything here is inline, so
// each .cu file that includes it compiles its own copy.
#ifndef LORASERVE_KERNELS_CUDA_DEVICE_COMMON_CUH_
#define LORASERVE_KERNELS_CUDA_DEVICE_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_status.h"

namespace loraserve::kernels::cuda {

inline constexpr int kWarp = 32;
inline constexpr int kThreads = 256;
// Grid-stride kernels never launch more blocks than this.
inline constexpr int64_t kMaxBlocks = int64_t{1} << 16;

inline int GridFor(int64_t count, int threads = kThreads) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (count + threads - 1) / threads)));
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls fn(T{}) with T the device element type of `dtype`.
template <typename Fn>
cudaError_t DispatchDType(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(float{});
    case DType::kF16:
      return fn(__half{});
    case DType::kBF16:
      return fn(__nv_bfloat16{});
    case DType::kQ8:  // no int8 kernels on CUDA
      break;
  }
  return cudaErrorInvalidValue;
}

// Records `code` (a KernelError) in `*error` unless an earlier one is there.
__device__ __forceinline__ void RecordError(int32_t* error, int32_t code) {
  atomicCAS(error, kNoKernelError, code);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_DEVICE_COMMON_CUH_
