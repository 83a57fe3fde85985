// A Llama-family decoder (llama, mistral, qwen2) whose weights live on a
// kernels::Backend, and its forward pass over a batch of sequences that share
// a paged KV cache.
//
// Weights are loaded once from a Hugging Face checkpoint directory (or made up
// from a seed for `--load-format dummy`) and never change afterwards: they are
// the golden copy every adapter path builds on.
//
// Ownership and threading: the model owns its weight buffers; the backend must
// outlive it. Forward is called by one thread at a time (the engine loop).
//
// Example:
//   ASSIGN_OR_RETURN(auto model, LlamaModel::Load(backend, "/models/llama", {}));
//   ForwardInput in = ...;  // one sequence: tokens, positions, block table
//   std::vector<float> logits;
//   RETURN_IF_ERROR(model->Forward(in, kv_view, &logits));
#ifndef LORASERVE_SERVER_MODEL_LLAMA_MODEL_H_
#define LORASERVE_SERVER_MODEL_LLAMA_MODEL_H_

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/device_adapter.h"
#include "formats/model_config.h"
#include "kernels/backend.h"

namespace loraserve::model {

// What the KV cache must hold per token.
struct KvShape {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
};

// The paged cache as the forward pass sees it: one K and one V pool per layer,
// of layout.dtype (the backend's KvCacheDType).
struct KvCacheView {
  kernels::KvLayout layout;
  std::vector<void*> k;  // [num_layers] -> [num_blocks, block_size, kv_heads, head_dim]
  std::vector<void*> v;
};

// The adapter a sequence runs with: none (base model), or an adapter on the
// backend with a per-request multiplier of its scale (adapter_scale).
struct AdapterChoice {
  const adapters::DeviceAdapter* adapter = nullptr;
  float scale = 1.0f;

  bool operator==(const AdapterChoice& other) const {
    return adapter == other.adapter && (adapter == nullptr || scale == other.scale);
  }
};

class MergedWeights;

// One step's batch, on the host. Tokens of a sequence are contiguous.
struct ForwardInput {
  std::vector<int32_t> tokens;        // [num_tokens]
  std::vector<int32_t> positions;     // [num_tokens]
  std::vector<int32_t> query_start;   // [num_seqs + 1]
  std::vector<int32_t> context_lens;  // [num_seqs] cached tokens after this step
  std::vector<int32_t> block_tables;  // [num_seqs, max_blocks_per_seq], unused entries 0
  int32_t max_blocks_per_seq = 0;
  std::vector<int32_t> slot_mapping;  // [num_tokens]
  std::vector<int32_t> logit_rows;    // token rows whose logits are wanted, in output order
  // [num_seqs] adapter of each sequence; empty = every sequence on the base.
  // Consecutive sequences with the same choice share one LoRA segment.
  std::vector<AdapterChoice> adapters;
  // When set, the step runs on these merged weights: sequences of the merged
  // adapter (at its scale) need no LoRA work, every other sequence gets its
  // own adapter plus the merged adapter's negation as low-rank corrections.
  const MergedWeights* merged = nullptr;
};

struct LoadOptions {
  // Called now and then while weights load: (bytes done, bytes total).
  std::function<void(int64_t, int64_t)> progress;
};

// A weight set with one adapter folded in (see LlamaModel::Merge).
class MergedWeights {
 public:
  const AdapterChoice& choice() const { return choice_; }
  int64_t bytes() const { return bytes_; }

 private:
  friend class LlamaModel;
  struct Layer {
    kernels::WeightView qkv, o, gate_up, down;
  };
  AdapterChoice choice_;
  std::vector<Layer> layers_;
  std::vector<kernels::DeviceBuffer> buffers_;
  int64_t bytes_ = 0;
};

class LlamaModel {
 public:
  // Loads config.json and the safetensors checkpoint of `model_dir`. Every
  // expected tensor must be present with its exact shape and no unexpected
  // tensor may be left over; errors name the tensor and file.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(kernels::Backend* backend,
                                                          const std::string& model_dir,
                                                          const LoadOptions& options);
  // Seeded random weights with the shapes of `config` (benchmarks).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> CreateDummy(kernels::Backend* backend,
                                                                 const formats::ModelConfig& config,
                                                                 uint64_t seed,
                                                                 const LoadOptions& options);
  ~LlamaModel();

  const formats::ModelConfig& config() const { return config_; }
  KvShape kv_shape() const;
  // Bytes of weights held on the backend.
  int64_t weight_bytes() const { return weight_bytes_; }
  // The backend the weights and ForwardOnDevice's logits live on.
  kernels::Backend* backend() const { return backend_; }

  // Runs the decoder over `input`, writing each token's K and V into the
  // cache, and returns logits for `input.logit_rows`: [rows, vocab] row-major.
  absl::Status Forward(const ForwardInput& input, const KvCacheView& kv,
                       std::vector<float>* logits);
  // As Forward, but the logits stay on the backend: [rows, vocab] in device
  // memory, valid until the next forward pass (so that sampling can run there
  // and only token ids cross to the host).
  absl::StatusOr<const float*> ForwardOnDevice(const ForwardInput& input, const KvCacheView& kv);

  // Decode steps (one token per sequence) are padded and run as step graphs
  // on a backend that records them (see decode_padding.h and
  // Backend::BeginStep); on by default. Results are the same either way.
  void set_step_graphs(bool enabled) { step_graphs_ = enabled; }
  struct StepGraphStats {
    int64_t graph_steps = 0;      // steps launched as a recorded graph
    int64_t eager_fallbacks = 0;  // steps a graph could not take (run op by op)
  };
  const StepGraphStats& step_graph_stats() const { return step_graph_stats_; }

  // Builds W' = W + s·B·A for every matrix `choice.adapter` adapts (s its
  // scale times choice.scale); matrices it leaves alone are shared with the
  // base. The base weights are not modified. The result must not outlive
  // this model or the adapter.
  absl::StatusOr<std::unique_ptr<MergedWeights>> Merge(const AdapterChoice& choice) const;
  // Bytes Merge would allocate for `adapter` (the matrices it adapts).
  int64_t MergeBytes(const adapters::DeviceAdapter& adapter) const;

  // The shapes LoRA adapters are validated against.
  adapters::BaseModelShape adapter_shape() const;
  // The weights DoRA adapters' norms are taken over (for DeviceAdapter::Upload).
  adapters::BaseWeights base_weights() const;

  // Where weights come from (a checkpoint or a seeded generator); defined in
  // llama_model.cc.
  class WeightSource;

 private:
  struct Layer;
  struct Scratch;
  explicit LlamaModel(kernels::Backend* backend, formats::ModelConfig config);
  absl::Status LoadWeights(WeightSource& source, const LoadOptions& options);
  absl::Status EnsureScratch(int64_t num_tokens, int64_t num_logit_rows);
  struct LoraPlan;
  // Device operands of one step, shared by its eager and graph runs.
  struct StepOperands {
    const ForwardInput* input;
    const KvCacheView* kv;
    const LoraPlan* lora;
    kernels::AttentionBatch batch;
    const int32_t* tokens;      // [num_tokens] device
    const int32_t* logit_rows;  // [rows] device
  };
  // Uploads the metadata of `input` and runs it, recorded as a step graph
  // when `as_graph` and the backend takes it, else operation by operation.
  absl::StatusOr<const float*> RunStep(const ForwardInput& input, const KvCacheView& kv,
                                       bool as_graph);
  // Queues the step's operations: embedding, layers, final norm and lm_head.
  absl::Status Encode(const StepOperands& step);
  // Grows the LoRA intermediate to the most `lora` over `num_tokens` can
  // need inside a step graph (where nothing may be allocated).
  absl::Status ReserveLoraIntermediate(const LoraPlan& lora, int64_t num_tokens);
  // The rank ReserveLoraIntermediate plans for at least.
  static constexpr int32_t kReservedLoraRank = 64;
  absl::Status RunLayer(int64_t layer_index, const Layer& layer, int64_t num_tokens,
                        const kernels::AttentionBatch& batch, const kernels::KvLayout& layout,
                        const MergedWeights* merged, const LoraPlan& lora, void* k_cache,
                        void* v_cache);
  // Where one module's LoRA terms go: y[:, 0:out], rows ldy floats apart.
  struct LoraTarget {
    adapters::LoraModule module;
    int64_t out;
    float* y;
    int64_t ldy;
  };
  // Modules of one layer that read the same input (q, k, v; gate, up).
  static constexpr size_t kMaxFusedLoraTargets = 3;
  // Adds the LoRA terms of every target for every segment of `lora`: one
  // shrink launch over x for all targets, one expand per target (inside a
  // step graph a shrink per target, into fixed regions of the intermediate).
  absl::Status ApplyLora(int64_t layer_index, std::initializer_list<LoraTarget> targets,
                         const float* x, int64_t in, const LoraPlan& lora);
  // Multiplies each target's rows of DoRA segments by their scales.
  absl::Status ScaleDora(int64_t layer_index, std::initializer_list<LoraTarget> targets,
                         const LoraPlan& lora);
  static bool HasDora(int64_t layer_index, adapters::LoraModule module, const LoraPlan& lora);
  // Grows the LoRA intermediate to `floats` (outside step graphs).
  absl::Status EnsureLoraIntermediate(int64_t floats);
  // Saved embeddings and embedding LoRA of `lora.heads`, into x.
  absl::Status EmbedHeads(const StepOperands& step, const LoraPlan& lora);
  // Saved final norms and lm_heads, lm_head LoRA (and DoRA), into the logits.
  absl::Status LmHeadHeads(const ForwardInput& in, const LoraPlan& lora);
  // A saved layer norm (`norms` of DeviceSavedModules) redone, with the
  // projection it feeds, for its adapter's rows.
  absl::Status NormHeads(const std::vector<const float*> adapters::DeviceSavedModules::*norms,
                         int64_t layer_index, const float* x, float* h,
                         const kernels::WeightView& w, float* y, const LoraPlan& lora);

  kernels::Backend* backend_;
  formats::ModelConfig config_;
  std::vector<kernels::DeviceBuffer> buffers_;  // owns every weight
  int64_t weight_bytes_ = 0;
  kernels::WeightView embed_tokens_;
  kernels::WeightView lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<Layer> layers_;
  kernels::DeviceBuffer inv_freq_;  // [head_dim / 2]
  std::unique_ptr<Scratch> scratch_;
  bool step_graphs_ = true;
  bool in_step_graph_ = false;  // between BeginStep and EndStep
  StepGraphStats step_graph_stats_;
};

}  // namespace loraserve::model

#endif  // LORASERVE_SERVER_MODEL_LLAMA_MODEL_H_
