#include "adapters/device_adapter.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace loraserve::adapters {
namespace {

using kernels::DType;

// Every piece of the one allocation starts at this alignment, so that
// float32 pieces may follow bf16 ones.
constexpr int64_t kPieceAlignment = 256;

int64_t Aligned(int64_t bytes) {
  return (bytes + kPieceAlignment - 1) / kPieceAlignment * kPieceAlignment;
}

// The LoRA modules of `adapter` with their device slots, decoder
// projections first, then the heads.
template <typename Fn>
void ForEachModule(const LoraAdapter& adapter, Fn fn) {
  for (int64_t l = 0; l < adapter.num_layers(); ++l) {
    for (LoraModule m : kAllLoraModules) {
      const LoraWeights& w = adapter.weights(l, m);
      if (!w.empty()) fn(w, l, m, /*head=*/nullptr);
    }
  }
  for (HeadModule h : kAllHeadModules) {
    const LoraWeights& w = adapter.head_weights(h);
    if (!w.empty()) fn(w, int64_t{-1}, LoraModule::kQProj, &h);
  }
}

// The float32 vectors of the saved norms, in one list.
std::vector<const std::vector<float>*> SavedNorms(const SavedModules& saved) {
  std::vector<const std::vector<float>*> norms;
  if (!saved.norm.empty()) norms.push_back(&saved.norm);
  for (const auto* list : {&saved.input_norms, &saved.post_attention_norms}) {
    for (const std::vector<float>& norm : *list) {
      if (!norm.empty()) norms.push_back(&norm);
    }
  }
  return norms;
}

// ‖row‖ of every row of W + scale·btᵀ·a as the backend stores it: merged
// into a scratch copy, read back as float32 in blocks of rows.
absl::StatusOr<std::vector<float>> MergedRowNorms(kernels::Backend* backend,
                                                  const kernels::WeightView& w, const void* a,
                                                  const void* bt, int32_t rank, float scale) {
  ASSIGN_OR_RETURN(kernels::DeviceBuffer merged,
                   backend->Allocate(static_cast<size_t>(kernels::WeightBytes(w.dtype, w.rows,
                                                                              w.cols))));
  RETURN_IF_ERROR(backend->MergeLora(w, a, bt, rank, scale, merged.data()));
  const kernels::WeightView view{merged.data(), w.dtype, w.rows, w.cols};
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(w.rows, (1 << 22) / w.cols));
  std::vector<int32_t> ids(static_cast<size_t>(w.rows));
  std::iota(ids.begin(), ids.end(), 0);
  ASSIGN_OR_RETURN(kernels::DeviceBuffer device_ids, backend->Allocate(ids.size() * 4));
  RETURN_IF_ERROR(backend->CopyToDevice(device_ids.data(), ids.data(), ids.size() * 4));
  ASSIGN_OR_RETURN(kernels::DeviceBuffer rows,
                   backend->Allocate(static_cast<size_t>(block * w.cols) * sizeof(float)));
  std::vector<float> host(static_cast<size_t>(block * w.cols));
  std::vector<float> norms(static_cast<size_t>(w.rows));
  for (int64_t r0 = 0; r0 < w.rows; r0 += block) {
    const int64_t n = std::min(block, w.rows - r0);
    RETURN_IF_ERROR(
        backend->Embedding(device_ids.as<int32_t>() + r0, n, view, rows.as<float>()));
    RETURN_IF_ERROR(
        backend->CopyToHost(host.data(), rows.data(), static_cast<size_t>(n * w.cols) * 4));
    for (int64_t r = 0; r < n; ++r) {
      double sum = 0;
      for (int64_t c = 0; c < w.cols; ++c) {
        const double v = host[static_cast<size_t>(r * w.cols + c)];
        sum += v * v;
      }
      norms[static_cast<size_t>(r0 + r)] = static_cast<float>(std::sqrt(sum));
    }
  }
  return norms;
}

}  // namespace

int64_t DeviceAdapter::UploadBytes(const kernels::Backend& backend, const LoraAdapter& adapter) {
  const int64_t element = static_cast<int64_t>(kernels::DTypeSize(backend.LoraDType()));
  int64_t bytes = 0;
  ForEachModule(adapter, [&](const LoraWeights& w, int64_t, LoraModule, const HeadModule*) {
    bytes += Aligned(w.rank * w.in_features * element) +
             Aligned(w.rank * w.out_features * element);
    if (w.dora) bytes += Aligned(w.out_features * static_cast<int64_t>(sizeof(float)));
  });
  const SavedModules& saved = adapter.saved();
  const DType table = backend.WeightDType(DType::kF32);
  for (const std::vector<float>* copy : {&saved.embed_tokens, &saved.lm_head}) {
    if (copy->empty()) continue;
    const int64_t vocab = static_cast<int64_t>(copy->size()) / adapter.hidden_size();
    bytes += Aligned(kernels::WeightBytes(table, vocab, adapter.hidden_size()));
  }
  for (const std::vector<float>* norm : SavedNorms(saved)) {
    bytes += Aligned(static_cast<int64_t>(norm->size() * sizeof(float)));
  }
  return bytes;
}

absl::StatusOr<std::unique_ptr<DeviceAdapter>> DeviceAdapter::Upload(kernels::Backend* backend,
                                                                     const LoraAdapter& adapter,
                                                                     const BaseWeights* base) {
  const DType dtype = backend->LoraDType();
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    return absl::UnimplementedError(
        absl::StrCat("adapters in ", kernels::DTypeName(dtype), " on ", backend->name()));
  }
  auto device = std::unique_ptr<DeviceAdapter>(new DeviceAdapter());
  // One allocation for all matrices: one residency unit, one free.
  ASSIGN_OR_RETURN(device->buffer_,
                   backend->Allocate(std::max<int64_t>(UploadBytes(*backend, adapter), 1)));
  char* cursor = static_cast<char*>(device->buffer_.data());
  std::vector<uint16_t> rounded;
  // Copies `host` as LoraDType() (or as float32) to the next piece.
  auto upload = [&](const std::vector<float>& host, bool as_float32) -> absl::StatusOr<void*> {
    const void* src = host.data();
    const DType to = as_float32 ? DType::kF32 : dtype;
    if (to == DType::kBF16) {
      rounded.resize(host.size());
      kernels::ConvertFloat32ToBf16(host.data(), static_cast<int64_t>(host.size()), rounded.data());
      src = rounded.data();
    }
    const size_t bytes = host.size() * kernels::DTypeSize(to);
    // Asynchronous: the upload overlaps the step already queued, and the
    // kernels that read the adapter are ordered after it.
    RETURN_IF_ERROR(backend->CopyToDeviceAsync(cursor, src, bytes));
    void* at = cursor;
    cursor += Aligned(static_cast<int64_t>(bytes));
    return at;
  };
  auto transposed = [](const std::vector<float>& m, int64_t rows, int64_t cols) {
    std::vector<float> t(m.size());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
    }
    return t;
  };
  device->layers_.resize(adapter.num_layers());
  absl::Status status;
  ForEachModule(adapter, [&](const LoraWeights& w, int64_t l, LoraModule m, const HeadModule* h) {
    if (!status.ok()) return;
    DeviceLoraWeights& d = h != nullptr ? device->heads_[static_cast<int>(*h)]
                                        : device->layers_[l][static_cast<int>(m)];
    const bool embedding = h != nullptr && *h == HeadModule::kEmbedTokens;
    // The embedding's A is gathered by token: its transpose is the table.
    absl::StatusOr<void*> a =
        upload(embedding ? transposed(w.a, w.rank, w.in_features) : w.a, false);
    // B is stored transposed: the expand then adds whole rows.
    absl::StatusOr<void*> bt = a.ok() ? upload(transposed(w.b, w.out_features, w.rank), false)
                                      : a.status();
    if (!bt.ok()) {
      status = bt.status();
      return;
    }
    d.a = *a;
    d.bt = *bt;
    d.rank = w.rank;
    d.scale = w.scale;
    device->max_rank_ = std::max(device->max_rank_, w.rank);
    device->extends_forward_ = device->extends_forward_ || h != nullptr || w.dora;
    if (!w.dora) return;
    device->has_dora_ = true;
    if (base == nullptr) {
      status = absl::FailedPreconditionError(
          "DoRA adapter: the base weights its norms are taken over were not given");
      return;
    }
    const kernels::WeightView weight = h != nullptr ? base->lm_head : base->projection(l, m);
    absl::StatusOr<std::vector<float>> norms =
        MergedRowNorms(backend, weight, d.a, d.bt, d.rank, d.scale);
    if (!norms.ok()) {
      status = norms.status();
      return;
    }
    std::vector<float> scale(norms->size());
    for (size_t i = 0; i < scale.size(); ++i) {
      // A zero row stays zero whatever its magnitude (PEFT would give NaN).
      scale[i] = (*norms)[i] > 0 ? w.magnitude[i] / (*norms)[i] : 0.0f;
    }
    absl::StatusOr<void*> on_device = upload(scale, /*as_float32=*/true);
    if (!on_device.ok()) {
      status = on_device.status();
      return;
    }
    d.dora_scale = static_cast<const float*>(*on_device);
  });
  RETURN_IF_ERROR(status);

  const SavedModules& saved = adapter.saved();
  DeviceSavedModules& out = device->saved_;
  const DType table = backend->WeightDType(DType::kF32);
  for (auto [copy, view] : {std::pair{&saved.embed_tokens, &out.embed_tokens},
                            std::pair{&saved.lm_head, &out.lm_head}}) {
    if (copy->empty()) continue;
    const int64_t cols = adapter.hidden_size();
    const int64_t rows = static_cast<int64_t>(copy->size()) / cols;
    RETURN_IF_ERROR(backend->UploadWeight(cursor, copy->data(), DType::kF32, rows, cols));
    *view = {cursor, table, rows, cols};
    cursor += Aligned(kernels::WeightBytes(table, rows, cols));
  }
  auto upload_norm = [&](const std::vector<float>& norm) -> absl::StatusOr<const float*> {
    if (norm.empty()) return nullptr;
    ASSIGN_OR_RETURN(void* at, upload(norm, /*as_float32=*/true));
    return static_cast<const float*>(at);
  };
  ASSIGN_OR_RETURN(out.norm, upload_norm(saved.norm));
  for (auto [from, to] : {std::pair{&saved.input_norms, &out.input_norms},
                          std::pair{&saved.post_attention_norms, &out.post_attention_norms}}) {
    for (const std::vector<float>& norm : *from) {
      ASSIGN_OR_RETURN(const float* at, upload_norm(norm));
      to->push_back(at);
    }
  }
  device->extends_forward_ = device->extends_forward_ || !saved.empty();
  return device;
}

}  // namespace loraserve::adapters
