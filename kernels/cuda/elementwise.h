// The CUDA backend's row-wise and element-wise kernels: dtype conversion,
// the embedding gather, RMSNorm, adds and the SiLU gate. Plain entry points:
// raw device pointers, sizes and a stream, with every tensor's layout written
// beside it. Each returns the launch's error (cudaGetLastError), never aborts;
// the device-side checks are described with KernelError (cuda_status.h).
#ifndef LORASERVE_KERNELS_CUDA_ELEMENTWISE_H_
#define LORASERVE_KERNELS_CUDA_ELEMENTWISE_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/backend.h"

namespace loraserve::kernels::cuda {

// dst[i] = src[i] converted, for `count` elements (float32 via the nearest
// even rounding of __float2bfloat16_rn / __float2half_rn).
cudaError_t ConvertElements(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                            int64_t count, cudaStream_t stream);

// y[i, :] = float(table[ids[i], :]).
cudaError_t EmbeddingGather(const int32_t* ids,  // [n]
                            int64_t n,
                            const void* table,  // [vocab, hidden] of table_dtype
                            DType table_dtype, int64_t vocab, int64_t hidden,
                            float* y,  // [n, hidden]
                            int32_t* error, cudaStream_t stream);

// y = weight * (x * rsqrt(mean(x²) + eps)) per row; y may alias x. With
// `converted` (else null), y also goes there in `converted_dtype`, rounded as
// ConvertElements rounds: the operand of a GEMM in that dtype.
cudaError_t RmsNormRows(const float* x,       // [n, dim]
                        const float* weight,  // [dim]
                        int64_t n, int64_t dim, float eps,
                        float* y,         // [n, dim]
                        void* converted,  // [n, dim] of converted_dtype, or null
                        DType converted_dtype, cudaStream_t stream);

// x += y
cudaError_t AddInPlace(float* x,        // [count]
                       const float* y,  // [count]
                       int64_t count, cudaStream_t stream);

// x[i, :] += bias
cudaError_t AddBiasRows(float* x,           // [n, dim]
                        const float* bias,  // [dim]
                        int64_t n, int64_t dim, cudaStream_t stream);

// out = silu(gate) * up. With `converted` (else null), out also goes there
// in `converted_dtype`, as in RmsNormRows.
cudaError_t SiluMulRows(const float* gate_up,  // [n, 2 * dim]: gate | up per row
                        int64_t n, int64_t dim,
                        float* out,       // [n, dim]
                        void* converted,  // [n, dim] of converted_dtype, or null
                        DType converted_dtype, cudaStream_t stream);

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_ELEMENTWISE_H_
