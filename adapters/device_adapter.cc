#include "adapters/device_adapter.h"

#include <algorithm>

#include "base/status_macros.h"

namespace loraserve::adapters {

absl::StatusOr<std::unique_ptr<DeviceAdapter>> DeviceAdapter::Upload(kernels::Backend* backend,
                                                                     const LoraAdapter& adapter) {
  auto device = std::unique_ptr<DeviceAdapter>(new DeviceAdapter());
  size_t floats = 0;
  for (int64_t l = 0; l < adapter.num_layers(); ++l) {
    for (LoraModule m : kAllLoraModules) {
      const LoraWeights& w = adapter.weights(l, m);
      floats += w.a.size() + w.b.size();
    }
  }
  // One allocation for all matrices: one residency unit, one free.
  ASSIGN_OR_RETURN(device->buffer_, backend->Allocate(std::max<size_t>(floats, 1) * sizeof(float)));
  float* cursor = device->buffer_.as<float>();
  auto upload = [&](const std::vector<float>& host) -> absl::StatusOr<const float*> {
    // Asynchronous: the upload overlaps the step already queued, and the
    // kernels that read the adapter are ordered after it.
    RETURN_IF_ERROR(backend->CopyToDeviceAsync(cursor, host.data(), host.size() * sizeof(float)));
    const float* at = cursor;
    cursor += host.size();
    return at;
  };
  device->layers_.resize(adapter.num_layers());
  for (int64_t l = 0; l < adapter.num_layers(); ++l) {
    for (LoraModule m : kAllLoraModules) {
      const LoraWeights& w = adapter.weights(l, m);
      if (w.empty()) continue;
      DeviceLoraWeights& d = device->layers_[l][static_cast<int>(m)];
      ASSIGN_OR_RETURN(d.a, upload(w.a));
      // B is stored transposed: the expand then adds whole rows.
      std::vector<float> bt(w.b.size());
      for (int64_t o = 0; o < w.out_features; ++o) {
        for (int r = 0; r < w.rank; ++r) bt[r * w.out_features + o] = w.b[o * w.rank + r];
      }
      ASSIGN_OR_RETURN(d.bt, upload(bt));
      d.rank = w.rank;
      d.scale = w.scale;
      device->max_rank_ = std::max(device->max_rank_, w.rank);
    }
  }
  return device;
}

}  // namespace loraserve::adapters
