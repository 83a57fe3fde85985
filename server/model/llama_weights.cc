// LlamaModel's weights: where they come from (a checkpoint's safetensors or a
// seeded generator in a config's shapes) and how they reach the backend
// (checked shapes, stacked q/k/v and gate/up, the backend's weight dtype).
#include <cmath>
#include <cstring>
#include <random>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "formats/safetensors.h"
#include "server/model/llama_layer.h"
#include "server/model/llama_model.h"

namespace loraserve::model {

using kernels::DeviceBuffer;
using kernels::DType;
using kernels::WeightView;

// Where weights come from: a checkpoint on disk or a seeded generator.
class LlamaModel::WeightSource {
 public:
  struct Tensor {
    const void* data = nullptr;
    DType dtype = DType::kF32;
  };
  virtual ~WeightSource() = default;
  // The tensor `name`, which must have exactly `shape`.
  virtual absl::StatusOr<Tensor> Get(const std::string& name,
                                     const std::vector<int64_t>& shape) = 0;
  // Fails when the source holds tensors nobody asked for.
  virtual absl::Status CheckAllConsumed() const = 0;
};

namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

class CheckpointSource : public LlamaModel::WeightSource {
 public:
  explicit CheckpointSource(std::unique_ptr<formats::Checkpoint> checkpoint)
      : checkpoint_(std::move(checkpoint)) {}

  absl::StatusOr<Tensor> Get(const std::string& name, const std::vector<int64_t>& shape) override {
    const formats::TensorInfo* info = checkpoint_->Find(name);
    if (info == nullptr) {
      return absl::NotFoundError(absl::StrCat("checkpoint is missing tensor ", name,
                                              " (expected shape ", ShapeString(shape), ")"));
    }
    if (info->shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " in ", info->file,
                                                     " has shape ", ShapeString(info->shape),
                                                     ", expected ", ShapeString(shape)));
    }
    consumed_.insert(name);
    return Tensor{info->data, info->dtype};
  }

  absl::Status CheckAllConsumed() const override {
    for (const std::string& name : checkpoint_->Names()) {
      // Old conversions store the rotary table; it is recomputed from config.
      if (consumed_.count(name) || absl::EndsWith(name, ".rotary_emb.inv_freq")) continue;
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected tensor ", name, " in ", checkpoint_->Find(name)->file,
                       ": not part of a Llama-family model with this config.json"));
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<formats::Checkpoint> checkpoint_;
  std::set<std::string> consumed_;
};

// Uniform weights with std 0.02 (HF's initializer_range); norms are ones.
class DummySource : public LlamaModel::WeightSource {
 public:
  explicit DummySource(uint64_t seed) : rng_(seed) {}

  absl::StatusOr<Tensor> Get(const std::string& name, const std::vector<int64_t>& shape) override {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    values_.resize(count);
    if (absl::StrContains(name, "norm")) {
      std::fill(values_.begin(), values_.end(), 1.0f);
    } else {
      const float bound = 0.02f * std::sqrt(3.0f);
      // A cheap linear generator: billions of values must be made quickly.
      uint64_t state = rng_();
      for (float& v : values_) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        const float u = static_cast<float>(state >> 40) * 0x1.0p-24f;  // [0, 1)
        v = (2.0f * u - 1.0f) * bound;
      }
    }
    return Tensor{values_.data(), DType::kF32};
  }
  absl::Status CheckAllConsumed() const override { return absl::OkStatus(); }

 private:
  std::mt19937_64 rng_;
  std::vector<float> values_;
};

// Hugging Face's rotary inverse frequencies, in float32 as transformers computes them.
std::vector<float> RopeInverseFrequencies(const formats::ModelConfig& config) {
  const int64_t dim = config.head_dim;
  std::vector<float> inv_freq(dim / 2);
  for (int64_t i = 0; i < dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(dim);
    inv_freq[i] = 1.0f / std::pow(static_cast<float>(config.rope_theta), exponent);
  }
  if (config.rope_scaling.type == formats::RopeScalingType::kLlama3) {
    const formats::RopeScaling& s = config.rope_scaling;
    const float factor = static_cast<float>(s.factor);
    const float old_context = static_cast<float>(s.original_max_position_embeddings);
    const float low_freq_wavelen = old_context / static_cast<float>(s.low_freq_factor);
    const float high_freq_wavelen = old_context / static_cast<float>(s.high_freq_factor);
    for (float& f : inv_freq) {
      const float wavelen = 2.0f * static_cast<float>(M_PI) / f;
      if (wavelen > low_freq_wavelen) {
        f = f / factor;
      } else if (wavelen >= high_freq_wavelen) {  // medium frequencies: interpolate
        const float smooth = (old_context / wavelen - static_cast<float>(s.low_freq_factor)) /
                             static_cast<float>(s.high_freq_factor - s.low_freq_factor);
        f = (1.0f - smooth) * f / factor + smooth * f;
      }
    }
  }
  return inv_freq;
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(kernels::Backend* backend,
                                                             const std::string& model_dir,
                                                             const LoadOptions& options) {
  ASSIGN_OR_RETURN(formats::ModelConfig config, formats::LoadModelConfig(model_dir));
  ASSIGN_OR_RETURN(std::unique_ptr<formats::Checkpoint> checkpoint,
                   formats::Checkpoint::Open(model_dir));
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel(backend, std::move(config)));
  CheckpointSource source(std::move(checkpoint));
  RETURN_IF_ERROR(model->LoadWeights(source, options));
  return model;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::CreateDummy(
    kernels::Backend* backend, const formats::ModelConfig& config, uint64_t seed,
    const LoadOptions& options) {
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel(backend, config));
  DummySource source(seed);
  RETURN_IF_ERROR(model->LoadWeights(source, options));
  return model;
}

absl::Status LlamaModel::LoadWeights(WeightSource& source, const LoadOptions& options) {
  const formats::ModelConfig& c = config_;
  const int64_t hidden = c.hidden_size;
  const int64_t q_dim = c.num_attention_heads * c.head_dim;
  const int64_t kv_dim = c.num_key_value_heads * c.head_dim;
  const int64_t total_bytes = formats::ParameterCount(c) * 4;  // for progress only
  int64_t done_bytes = 0;

  // Uploads the [rows, cols] `tensor` at `dst` and accounts progress.
  auto upload = [&](void* dst, const WeightSource::Tensor& tensor, const std::string& name,
                    int64_t rows, int64_t cols) -> absl::Status {
    if (absl::Status s = backend_->UploadWeight(dst, tensor.data, tensor.dtype, rows, cols);
        !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("tensor ", name, ": ", s.message()));
    }
    done_bytes += rows * cols * 4;
    if (options.progress) options.progress(done_bytes, total_bytes);
    return absl::OkStatus();
  };
  auto allocate = [&](size_t bytes) -> absl::StatusOr<void*> {
    ASSIGN_OR_RETURN(DeviceBuffer buffer, backend_->Allocate(bytes));
    void* data = buffer.data();
    weight_bytes_ += static_cast<int64_t>(bytes);
    buffers_.push_back(std::move(buffer));
    return data;
  };
  // Tensors (name, rows) stacked by rows, in this order.
  using Parts = std::vector<std::pair<std::string, int64_t>>;
  // A matrix of `parts` ([sum of rows, cols]) in the backend's weight dtype.
  auto matrix = [&](const Parts& parts, int64_t cols) -> absl::StatusOr<WeightView> {
    std::vector<WeightSource::Tensor> tensors;
    int64_t rows = 0;
    for (const auto& [name, part_rows] : parts) {
      ASSIGN_OR_RETURN(WeightSource::Tensor t, source.Get(name, {part_rows, cols}));
      tensors.push_back(t);
      rows += part_rows;
    }
    const DType stored = backend_->WeightDType(tensors[0].dtype);
    const int64_t row_bytes = kernels::WeightRowBytes(stored, cols);
    ASSIGN_OR_RETURN(void* data, allocate(static_cast<size_t>(rows * row_bytes)));
    size_t offset = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      if (backend_->WeightDType(tensors[i].dtype) != stored) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor ", parts[i].first, " has dtype ", kernels::DTypeName(tensors[i].dtype),
            " unlike ", parts[0].first, " (", kernels::DTypeName(tensors[0].dtype), ")"));
      }
      const int64_t part_rows = parts[i].second;
      RETURN_IF_ERROR(
          upload(static_cast<char*>(data) + offset, tensors[i], parts[i].first, part_rows, cols));
      offset += static_cast<size_t>(part_rows * row_bytes);
    }
    return WeightView{data, stored, rows, cols};
  };
  // A float32 vector of `parts` (norm weights, biases).
  auto vector = [&](const Parts& parts) -> absl::StatusOr<const float*> {
    std::vector<float> host;
    for (const auto& [name, size] : parts) {
      ASSIGN_OR_RETURN(WeightSource::Tensor t, source.Get(name, {size}));
      host.resize(host.size() + size);
      kernels::ConvertToFloat32(t.data, t.dtype, size, host.data() + host.size() - size);
    }
    const size_t bytes = host.size() * sizeof(float);
    ASSIGN_OR_RETURN(void* data, allocate(bytes));
    RETURN_IF_ERROR(backend_->CopyToDevice(data, host.data(), bytes));
    return static_cast<const float*>(data);
  };

  ASSIGN_OR_RETURN(embed_tokens_, matrix({{"model.embed_tokens.weight", c.vocab_size}}, hidden));
  layers_.resize(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    Layer& layer = layers_[l];
    ASSIGN_OR_RETURN(layer.input_norm, vector({{p + "input_layernorm.weight", hidden}}));
    ASSIGN_OR_RETURN(layer.post_attention_norm,
                     vector({{p + "post_attention_layernorm.weight", hidden}}));
    // q, k and v share one GEMM, and gate and up another: their rows are
    // stacked at load.
    const std::string attn = p + "self_attn.";
    ASSIGN_OR_RETURN(layer.qkv, matrix({{attn + "q_proj.weight", q_dim},
                                        {attn + "k_proj.weight", kv_dim},
                                        {attn + "v_proj.weight", kv_dim}},
                                       hidden));
    ASSIGN_OR_RETURN(layer.o, matrix({{attn + "o_proj.weight", hidden}}, q_dim));
    if (c.attention_bias) {
      ASSIGN_OR_RETURN(layer.qkv_bias, vector({{attn + "q_proj.bias", q_dim},
                                               {attn + "k_proj.bias", kv_dim},
                                               {attn + "v_proj.bias", kv_dim}}));
    }
    ASSIGN_OR_RETURN(layer.gate_up, matrix({{p + "mlp.gate_proj.weight", c.intermediate_size},
                                            {p + "mlp.up_proj.weight", c.intermediate_size}},
                                           hidden));
    ASSIGN_OR_RETURN(layer.down,
                     matrix({{p + "mlp.down_proj.weight", hidden}}, c.intermediate_size));
  }
  ASSIGN_OR_RETURN(final_norm_, vector({{"model.norm.weight", hidden}}));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_tokens_;
  } else {
    ASSIGN_OR_RETURN(lm_head_, matrix({{"lm_head.weight", c.vocab_size}}, hidden));
  }
  RETURN_IF_ERROR(source.CheckAllConsumed());

  const std::vector<float> inv_freq = RopeInverseFrequencies(c);
  ASSIGN_OR_RETURN(inv_freq_, backend_->Allocate(inv_freq.size() * sizeof(float)));
  return backend_->CopyToDevice(inv_freq_.data(), inv_freq.data(), inv_freq.size() * sizeof(float));
}

}  // namespace loraserve::model
