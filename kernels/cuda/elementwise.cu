// The kernels behind kernels/cuda/elementwise.h.
#include <algorithm>
#include <cmath>

#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/elementwise.h"

namespace loraserve::kernels::cuda {
namespace {

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `scratch` holds 32 floats.
__device__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  v = lane < warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}

template <typename S, typename D>
__global__ void ConvertKernel(const S* src, D* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<D>(ToFloat(src[i]));
  }
}

template <typename T>
__global__ void EmbeddingKernel(const int32_t* ids, int64_t n, const T* table, int64_t vocab,
                                int64_t hidden, float* y, int32_t* error) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int32_t id = ids[i];
    float* row = y + i * hidden;
    if (id < 0 || id >= vocab) {
      if (threadIdx.x == 0) RecordError(error, kEmbeddingIdOutOfRange);
      for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) row[c] = NAN;
      continue;
    }
    const T* src = table + id * hidden;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) row[c] = ToFloat(src[c]);
  }
}

// C is the dtype of `converted` (null: none).
template <typename C>
__global__ void RmsNormKernel(const float* x, const float* weight, int64_t n, int64_t dim,
                              float eps, float* y, C* converted) {
  __shared__ float scratch[kWarp];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float* xr = x + row * dim;
    float* yr = y + row * dim;
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) sum = fmaf(xr[c], xr[c], sum);
    sum = BlockSum(sum, scratch);
    const float inv_rms = 1.0f / sqrtf(sum / static_cast<float>(dim) + eps);
    // Each thread rewrites only the elements it read: y may alias x.
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float value = weight[c] * (xr[c] * inv_rms);
      yr[c] = value;
      if (converted != nullptr) converted[row * dim + c] = FromFloat<C>(value);
    }
  }
}

__global__ void AddKernel(float* x, const float* y, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += y[i];
  }
}

__global__ void AddBiasKernel(float* x, const float* bias, int64_t n, int64_t dim) {
  const int64_t count = n * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += bias[i % dim];
  }
}

// C is the dtype of `converted` (null: none).
template <typename C>
__global__ void SiluMulKernel(const float* gate_up, int64_t n, int64_t dim, float* out,
                              C* converted) {
  const int64_t count = n * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / dim;
    const int64_t c = i - row * dim;
    const float gate = gate_up[row * 2 * dim + c];
    const float up = gate_up[row * 2 * dim + dim + c];
    const float value = gate / (1.0f + expf(-gate)) * up;
    out[i] = value;
    if (converted != nullptr) converted[i] = FromFloat<C>(value);
  }
}

}  // namespace

cudaError_t ConvertElements(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                            int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return DispatchDType(src_dtype, [&](auto s) {
    return DispatchDType(dst_dtype, [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      ConvertKernel<S, D><<<GridFor(count), kThreads, 0, stream>>>(static_cast<const S*>(src),
                                                                   static_cast<D*>(dst), count);
      return cudaGetLastError();
    });
  });
}

cudaError_t EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType table_dtype,
                            int64_t vocab, int64_t hidden, float* y, int32_t* error,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return DispatchDType(table_dtype, [&](auto tag) {
    using T = decltype(tag);
    EmbeddingKernel<T><<<static_cast<int>(std::min(n, kMaxBlocks)), kThreads, 0, stream>>>(
        ids, n, static_cast<const T*>(table), vocab, hidden, y, error);
    return cudaGetLastError();
  });
}

cudaError_t RmsNormRows(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                        float* y, void* converted, DType converted_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min(n, kMaxBlocks));
  if (converted == nullptr) {
    RmsNormKernel<float><<<blocks, kThreads, 0, stream>>>(x, weight, n, dim, eps, y, nullptr);
    return cudaGetLastError();
  }
  return DispatchDType(converted_dtype, [&](auto tag) {
    using C = decltype(tag);
    RmsNormKernel<C>
        <<<blocks, kThreads, 0, stream>>>(x, weight, n, dim, eps, y, static_cast<C*>(converted));
    return cudaGetLastError();
  });
}

cudaError_t AddInPlace(float* x, const float* y, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  AddKernel<<<GridFor(count), kThreads, 0, stream>>>(x, y, count);
  return cudaGetLastError();
}

cudaError_t AddBiasRows(float* x, const float* bias, int64_t n, int64_t dim, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AddBiasKernel<<<GridFor(n * dim), kThreads, 0, stream>>>(x, bias, n, dim);
  return cudaGetLastError();
}

cudaError_t SiluMulRows(const float* gate_up, int64_t n, int64_t dim, float* out, void* converted,
                        DType converted_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (converted == nullptr) {
    SiluMulKernel<float><<<GridFor(n * dim), kThreads, 0, stream>>>(gate_up, n, dim, out, nullptr);
    return cudaGetLastError();
  }
  return DispatchDType(converted_dtype, [&](auto tag) {
    using C = decltype(tag);
    SiluMulKernel<C><<<GridFor(n * dim), kThreads, 0, stream>>>(gate_up, n, dim, out,
                                                                static_cast<C*>(converted));
    return cudaGetLastError();
  });
}

}  // namespace loraserve::kernels::cuda
