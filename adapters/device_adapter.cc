#include "adapters/device_adapter.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace loraserve::adapters {
namespace {

// Elements of every A and B matrix of `adapter`.
int64_t LoraElements(const LoraAdapter& adapter) {
  int64_t elements = 0;
  for (int64_t l = 0; l < adapter.num_layers(); ++l) {
    for (LoraModule m : kAllLoraModules) {
      const LoraWeights& w = adapter.weights(l, m);
      elements += static_cast<int64_t>(w.a.size() + w.b.size());
    }
  }
  return elements;
}

}  // namespace

int64_t DeviceAdapter::UploadBytes(const kernels::Backend& backend, const LoraAdapter& adapter) {
  return LoraElements(adapter) * static_cast<int64_t>(kernels::DTypeSize(backend.LoraDType()));
}

absl::StatusOr<std::unique_ptr<DeviceAdapter>> DeviceAdapter::Upload(kernels::Backend* backend,
                                                                     const LoraAdapter& adapter) {
  const kernels::DType dtype = backend->LoraDType();
  if (dtype != kernels::DType::kF32 && dtype != kernels::DType::kBF16) {
    return absl::UnimplementedError(
        absl::StrCat("adapters in ", kernels::DTypeName(dtype), " on ", backend->name()));
  }
  auto device = std::unique_ptr<DeviceAdapter>(new DeviceAdapter());
  // One allocation for all matrices: one residency unit, one free.
  ASSIGN_OR_RETURN(device->buffer_,
                   backend->Allocate(std::max<int64_t>(UploadBytes(*backend, adapter), 1)));
  char* cursor = static_cast<char*>(device->buffer_.data());
  std::vector<uint16_t> rounded;
  auto upload = [&](const std::vector<float>& host) -> absl::StatusOr<const void*> {
    const void* src = host.data();
    if (dtype == kernels::DType::kBF16) {
      rounded.resize(host.size());
      kernels::ConvertFloat32ToBf16(host.data(), static_cast<int64_t>(host.size()), rounded.data());
      src = rounded.data();
    }
    const size_t bytes = host.size() * kernels::DTypeSize(dtype);
    // Asynchronous: the upload overlaps the step already queued, and the
    // kernels that read the adapter are ordered after it.
    RETURN_IF_ERROR(backend->CopyToDeviceAsync(cursor, src, bytes));
    const void* at = cursor;
    cursor += bytes;
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
