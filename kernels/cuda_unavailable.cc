// CreateCudaBackend for builds without the CUDA toolkit (LORASERVE_CUDA=OFF,
// or AUTO where no nvcc was found). CMake compiles this file instead of
// kernels/cuda/, so callers need no #ifdef.
#include "kernels/backend.h"

namespace loraserve::kernels {

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  return absl::FailedPreconditionError(
      "loraserve was built without CUDA (LORASERVE_CUDA=OFF or no nvcc)");
}

}  // namespace loraserve::kernels
