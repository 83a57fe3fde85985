// A pinned host buffer and its device twin of the same size, for data the
// host writes and kernels read (or the other way). Private to kernels/cuda.
//
// Ownership: it owns both allocations. Contents are not kept when it grows;
// the caller makes sure no queued work still uses them. Used by one thread at
// a time, with the device it allocates on current.
#ifndef LORASERVE_KERNELS_CUDA_PINNED_MIRROR_H_
#define LORASERVE_KERNELS_CUDA_PINNED_MIRROR_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "absl/status/status.h"
#include "kernels/cuda/cuda_status.h"

namespace loraserve::kernels::cuda {

class PinnedMirror {
 public:
  PinnedMirror() = default;
  PinnedMirror(const PinnedMirror&) = delete;
  PinnedMirror& operator=(const PinnedMirror&) = delete;
  ~PinnedMirror() {
    cudaFreeHost(host_);
    cudaFree(device_);
  }

  // Makes both at least `bytes`, growing to at least twice the old size so
  // that a slowly rising need reallocates rarely.
  // When allocation fails, the old pair stays.
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    bytes = std::max(bytes, 2 * bytes_);
    char* host = nullptr;
    char* device = nullptr;
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&host, bytes));
    if (absl::Status status = CudaStatus(cudaMalloc(&device, bytes), "cudaMalloc"); !status.ok()) {
      cudaFreeHost(host);
      return status;
    }
    CUDA_RETURN_IF_ERROR(cudaFreeHost(host_));
    CUDA_RETURN_IF_ERROR(cudaFree(device_));
    host_ = host;
    device_ = device;
    bytes_ = bytes;
    return absl::OkStatus();
  }
  char* host() const { return host_; }
  char* device() const { return device_; }
  size_t bytes() const { return bytes_; }

 private:
  char* host_ = nullptr;
  char* device_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_PINNED_MIRROR_H_
