#include "kernels/cuda/cuda_status.h"

#include "absl/strings/str_cat.h"

namespace loraserve::kernels::cuda {

absl::Status CudaStatus(cudaError_t error, const char* call) {
  if (error == cudaSuccess) return absl::OkStatus();
  // The runtime also keeps the error as this thread's last one, which the
  // next kernel launch's cudaGetLastError would report as its own. Reported
  // here, it is cleared (a sticky error, which ends the context, stays).
  cudaGetLastError();
  std::string message = absl::StrCat(call, " failed: ", cudaGetErrorName(error), " (",
                                     cudaGetErrorString(error), ")");
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status CublasStatus(cublasStatus_t status, const char* call) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  cudaGetLastError();  // a failed launch inside cuBLAS: as in CudaStatus
  std::string message = absl::StrCat(call, " failed: ", cublasGetStatusName(status), " (",
                                     cublasGetStatusString(status), ")");
  if (status == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

const char* KernelErrorName(int32_t code) {
  switch (code) {
    case kNoKernelError:
      return "no error";
    case kEmbeddingIdOutOfRange:
      return "Embedding: a token id is outside the vocabulary";
    case kRopePositionNegative:
      return "Rope: a position is negative";
    case kWriteKvSlotOutOfRange:
      return "WriteKv: a slot_mapping entry is outside the cache";
    case kAttentionPositionOutOfRange:
      return "PagedAttention: a position is beyond its sequence's context_lens or block table";
    case kAttentionBlockOutOfRange:
      return "PagedAttention: a block_tables entry is outside the cache";
  }
  return "unknown kernel error";
}

}  // namespace loraserve::kernels::cuda
