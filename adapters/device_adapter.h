// An adapter's A and B matrices uploaded to a backend, indexed the way the
// forward pass asks for them: (layer, module) -> pointers, rank, scale.
//
// Ownership: a DeviceAdapter owns one device allocation holding every matrix;
// the backend must outlive it. Immutable after Upload; read by the engine
// thread.
//
// Example:
//   ASSIGN_OR_RETURN(auto on_device, DeviceAdapter::Upload(backend, adapter));
//   const DeviceLoraWeights& w = on_device->weights(3, LoraModule::kQProj);
//   if (w.rank > 0) { /* segments use w.a, w.b */ }
#ifndef LORASERVE_ADAPTERS_DEVICE_ADAPTER_H_
#define LORASERVE_ADAPTERS_DEVICE_ADAPTER_H_

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/lora_adapter.h"
#include "kernels/backend.h"

namespace loraserve::adapters {

// A and Bᵀ hold elements of the backend's LoraDType().
struct DeviceLoraWeights {
  const void* a = nullptr;   // [rank, in] device memory
  const void* bt = nullptr;  // [rank, out] device memory (Bᵀ, see kernels::LoraSegment)
  int32_t rank = 0;          // 0: module not adapted
  float scale = 0.0f;        // lora_alpha / r (or / sqrt(r) for rsLoRA)
};

class DeviceAdapter {
 public:
  // Copies A and Bᵀ in the backend's LoraDType() (rounded on the host).
  static absl::StatusOr<std::unique_ptr<DeviceAdapter>> Upload(kernels::Backend* backend,
                                                               const LoraAdapter& adapter);
  // The device bytes Upload allocates for `adapter` on `backend`.
  static int64_t UploadBytes(const kernels::Backend& backend, const LoraAdapter& adapter);

  const DeviceLoraWeights& weights(int64_t layer, LoraModule module) const {
    return layers_[layer][static_cast<int>(module)];
  }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t bytes() const { return static_cast<int64_t>(buffer_.bytes()); }
  // The largest rank over every adapted (layer, module).
  int32_t max_rank() const { return max_rank_; }

 private:
  DeviceAdapter() = default;
  kernels::DeviceBuffer buffer_;
  std::vector<std::array<DeviceLoraWeights, kNumLoraModules>> layers_;
  int32_t max_rank_ = 0;
};

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_DEVICE_ADAPTER_H_
