// One way to turn CUDA runtime and cuBLAS results into absl::Status, naming
// the call that failed, and the codes of the errors the kernels find on the
// device. Private to kernels/cuda.
//
// Example:
//   CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
//
// Device-side checks: indices that come from device memory (token ids, slots,
// positions, block ids) cannot be checked on the host without a copy, so the
// kernels check them and, on a bad one, write NaN where the output would go
// and record a KernelError code in `*error` (first one wins); the backend
// reports it at the next synchronising call.
#ifndef LORASERVE_KERNELS_CUDA_CUDA_STATUS_H_
#define LORASERVE_KERNELS_CUDA_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace loraserve::kernels::cuda {

enum KernelError : int32_t {
  kNoKernelError = 0,
  kEmbeddingIdOutOfRange = 1,
  kRopePositionNegative = 2,
  kWriteKvSlotOutOfRange = 3,
  kAttentionPositionOutOfRange = 4,
  kAttentionBlockOutOfRange = 5,
};

// What a KernelError code means, for error messages.
const char* KernelErrorName(int32_t code);

// Ok for cudaSuccess; otherwise an Internal error (ResourceExhausted for out
// of memory) that quotes `call` and CUDA's name and description of `error`,
// and the thread's last CUDA error is cleared (both functions).
absl::Status CudaStatus(cudaError_t error, const char* call);
// Ok for CUBLAS_STATUS_SUCCESS; otherwise an Internal error quoting `call`.
absl::Status CublasStatus(cublasStatus_t status, const char* call);

// Lets CUDA_RETURN_IF_ERROR also propagate our own checks.
inline absl::Status ToStatus(absl::Status status, const char* call) { return status; }
inline absl::Status ToStatus(cudaError_t error, const char* call) {
  return CudaStatus(error, call);
}
inline absl::Status ToStatus(cublasStatus_t status, const char* call) {
  return CublasStatus(status, call);
}

}  // namespace loraserve::kernels::cuda

// Evaluates a CUDA runtime call, a cuBLAS call or an absl::Status expression
// and returns its failure as a Status from the enclosing function.
#define CUDA_RETURN_IF_ERROR(call)                                                   \
  do {                                                                               \
    absl::Status cuda_status_ = ::loraserve::kernels::cuda::ToStatus((call), #call); \
    if (!cuda_status_.ok()) return cuda_status_;                                     \
  } while (0)

#endif  // LORASERVE_KERNELS_CUDA_CUDA_STATUS_H_
