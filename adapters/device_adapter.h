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
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/lora_adapter.h"
#include "kernels/backend.h"

namespace loraserve::adapters {

// A and Bᵀ hold elements of the backend's LoraDType().
struct DeviceLoraWeights {
  const void* a = nullptr;   // [rank, in] device memory; embed_tokens: Aᵀ [vocab, rank],
                             // a table whose token rows are the shrink's output
  const void* bt = nullptr;  // [rank, out] device memory (Bᵀ, see kernels::LoraSegment)
  int32_t rank = 0;          // 0: module not adapted
  float scale = 0.0f;        // lora_alpha / r (or / sqrt(r) for rsLoRA)
  // DoRA: m / ‖W + scale·B·A‖ per output row of the base weight W, [out]
  // float32 device memory, which multiplies the module's whole output
  // (W·x + the LoRA term) for the adapter's rows. Null: plain LoRA.
  const float* dora_scale = nullptr;
};

// An adapter's own copies of base modules (SavedModules) on the device; a
// null pointer means the base's.
struct DeviceSavedModules {
  kernels::WeightView embed_tokens;  // in the backend's weight dtype
  kernels::WeightView lm_head;
  const float* norm = nullptr;  // [hidden] float32
  // [num_layers] (empty when the adapter saves no layer's norm).
  std::vector<const float*> input_norms;
  std::vector<const float*> post_attention_norms;
};

// The base weights DoRA's norms are taken over, as the model holds them.
struct BaseWeights {
  // The rows of `module` in layer `layer` (a slice of a fused matrix).
  std::function<kernels::WeightView(int64_t layer, LoraModule module)> projection;
  kernels::WeightView lm_head;
};

class DeviceAdapter {
 public:
  // Copies A and Bᵀ in the backend's LoraDType() (rounded on the host),
  // DoRA's scales and the saved modules. A DoRA adapter needs `base`: its
  // norms ‖W + s·B·A‖ are computed here, once, from the merged rows on the
  // backend (PEFT recomputes them every forward; they do not change).
  static absl::StatusOr<std::unique_ptr<DeviceAdapter>> Upload(kernels::Backend* backend,
                                                               const LoraAdapter& adapter,
                                                               const BaseWeights* base = nullptr);
  // The device bytes Upload allocates for `adapter` on `backend`.
  static int64_t UploadBytes(const kernels::Backend& backend, const LoraAdapter& adapter);

  const DeviceLoraWeights& weights(int64_t layer, LoraModule module) const {
    return layers_[layer][static_cast<int>(module)];
  }
  const DeviceLoraWeights& head_weights(HeadModule module) const {
    return heads_[static_cast<int>(module)];
  }
  const DeviceSavedModules& saved() const { return saved_; }
  // Whether any module is DoRA: a merged copy of such an adapter cannot be
  // undone by low-rank corrections for other adapters' rows.
  bool has_dora() const { return has_dora_; }
  // DoRA, head LoRA or saved modules: the forward pass needs more than the
  // segmented shrink/expand of the decoder projections.
  bool extends_forward() const { return extends_forward_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t bytes() const { return static_cast<int64_t>(buffer_.bytes()); }
  // The largest rank over every adapted (layer, module).
  int32_t max_rank() const { return max_rank_; }

 private:
  DeviceAdapter() = default;
  kernels::DeviceBuffer buffer_;
  std::vector<std::array<DeviceLoraWeights, kNumLoraModules>> layers_;
  std::array<DeviceLoraWeights, kNumHeadModules> heads_;
  DeviceSavedModules saved_;
  int32_t max_rank_ = 0;
  bool has_dora_ = false;
  bool extends_forward_ = false;
};

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_DEVICE_ADAPTER_H_
