// A PEFT LoRA adapter loaded from disk, validated against the base model and
// held in float32 on the host, laid out for the forward pass.
//
// LoadLoraAdapter reads `dir/adapter_config.json` (see peft_config.h) and
// `dir/adapter_model.safetensors` (F32, F16 or BF16 tensors, converted to
// float32). Tensor names may carry PEFT's "base_model.model." prefix or not,
// and the adapter name or not: both
//   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
//   model.layers.0.self_attn.q_proj.lora_A.default.weight
// name the A matrix of layer 0's q_proj. Nothing is returned unless all of
// this holds, and each failure names the tensor or module and what was
// expected:
//  - every tensor is the lora_A or lora_B of one of the seven projections of
//    a layer the base model has, or of lm_head, or the lora_embedding_A / B
//    of embed_tokens, and the config targets that module;
//  - every module the config targets has both its A and its B, and with
//    use_dora its lora_magnitude_vector [out_features] (DoRA; not on
//    embed_tokens);
//  - A is [rank, in_features] and B is [out_features, rank], where rank is
//    the module's rank from rank_pattern or r and in/out come from the base
//    model (a mismatch there means the adapter belongs to another base);
//    embed_tokens counts as in_features = vocab, out_features = hidden;
//  - the other tensors are the adapter's own copies of whole modules
//    (SavedModules): of the modules_to_save, which may be embed_tokens,
//    lm_head and RMS norms, each present with the base module's shape; or the
//    embed_tokens / lm_head copies PEFT writes beside their LoRA
//    (`*.base_layer.weight`, save_embedding_layers);
//  - rank <= AdapterLimits::max_rank (the --max-lora-rank flag);
//  - every value is finite.
// adapter_model.bin (a pickle) is refused with a hint to convert it.
//
// Ownership: a LoraAdapter owns its weights; it is immutable after loading and
// may be read from any thread. It is movable, not copyable (adapters are large
// and shared through the registry's handles).
//
// Example:
//   BaseModelShape base = LlamaBaseShape(/*num_layers=*/4, /*hidden=*/64,
//                                        /*intermediate=*/172, /*num_heads=*/4,
//                                        /*num_kv_heads=*/4, /*head_dim=*/16);
//   ASSIGN_OR_RETURN(LoraAdapter adapter,
//                    LoadLoraAdapter(dir, base, AdapterLimits{.max_rank = 64}));
//   const LoraWeights& w = adapter.weights(/*layer=*/0, LoraModule::kQProj);
//   if (!w.empty()) { /* y += w.scale * (x · w.aᵀ) · w.bᵀ */ }
#ifndef LORASERVE_ADAPTERS_LORA_ADAPTER_H_
#define LORASERVE_ADAPTERS_LORA_ADAPTER_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "formats/peft_config.h"

namespace loraserve::adapters {

// The linear layers of a Llama decoder layer that LoRA may adapt.
enum class LoraModule : int { kQProj, kKProj, kVProj, kOProj, kGateProj, kUpProj, kDownProj };
inline constexpr int kNumLoraModules = 7;
inline constexpr std::array<LoraModule, kNumLoraModules> kAllLoraModules = {
    LoraModule::kQProj,    LoraModule::kKProj,  LoraModule::kVProj,   LoraModule::kOProj,
    LoraModule::kGateProj, LoraModule::kUpProj, LoraModule::kDownProj};

// "q_proj", ..., "down_proj".
const char* LoraModuleName(LoraModule module);
// The module's name in the base model, e.g. "model.layers.3.self_attn.q_proj".
std::string LoraModulePath(int64_t layer, LoraModule module);

// The modules outside the decoder layers that LoRA may adapt.
enum class HeadModule : int { kEmbedTokens, kLmHead };
inline constexpr int kNumHeadModules = 2;
inline constexpr std::array<HeadModule, kNumHeadModules> kAllHeadModules = {
    HeadModule::kEmbedTokens, HeadModule::kLmHead};
// "embed_tokens", "lm_head".
const char* HeadModuleName(HeadModule module);
// "model.embed_tokens", "lm_head".
std::string HeadModulePath(HeadModule module);

// What an adapter is checked against; adapters/ does not know the model
// config, so whoever does fills this in (LlamaBaseShape for Llama).
struct BaseModelShape {
  int64_t num_layers = 0;
  int64_t hidden_size = 0;
  int64_t vocab_size = 0;  // 0: embed_tokens and lm_head cannot be adapted or saved
  // Module short name ("q_proj", ..., "embed_tokens", "lm_head") ->
  // {in_features, out_features}. A module absent here cannot be adapted.
  std::map<std::string, std::pair<int64_t, int64_t>> modules;
};

// The seven projections of a Llama-family model: q [heads*head_dim, hidden],
// k and v [kv_heads*head_dim, hidden], o [hidden, heads*head_dim], gate and up
// [intermediate, hidden], down [hidden, intermediate] (as [out, in]); with a
// vocab_size, embed_tokens {vocab, hidden} and lm_head [vocab, hidden] too.
BaseModelShape LlamaBaseShape(int64_t num_layers, int64_t hidden_size, int64_t intermediate_size,
                              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t vocab_size = 0);

struct CompositionPart;  // adapter_composition.h

struct AdapterLimits {
  int max_rank = 64;  // --max-lora-rank
};

// One adapted linear layer: y += scale · (x · aᵀ) · bᵀ; with DoRA
// y = m / ‖W + scale·B·A‖ ⊙ (W·x + scale · (x · aᵀ) · bᵀ), the norm taken over
// each output row of the base weight W (PEFT's "column-wise" norm). For
// embed_tokens x is the token's one-hot row: y += scale · aᵀ[token] · bᵀ.
struct LoraWeights {
  int rank = 0;  // 0: the module is not adapted and a, b are empty
  float scale = 0;
  int64_t in_features = 0;
  int64_t out_features = 0;
  std::vector<float> a;  // [rank, in_features]; empty when read as AdapterRead::kMetadata
  std::vector<float> b;  // [out_features, rank]; likewise
  bool dora = false;
  std::vector<float> magnitude;  // [out_features] DoRA's m; likewise

  bool empty() const { return rank == 0; }
};

// Whole modules an adapter brings its own copy of (modules_to_save), used
// instead of the base's for its tokens. Empty: the base's.
struct SavedModules {
  std::vector<float> embed_tokens;  // [vocab, hidden]
  std::vector<float> lm_head;       // [vocab, hidden]
  std::vector<float> norm;          // [hidden] model.norm
  // [num_layers] -> [hidden] or empty, when any layer's norm is saved.
  std::vector<std::vector<float>> input_norms;
  std::vector<std::vector<float>> post_attention_norms;
  // The names of the saved modules (read as metadata too), in file order.
  std::vector<std::string> paths;

  bool empty() const { return paths.empty(); }
};

// How much of an adapter's files LoadLoraAdapter reads.
enum class AdapterRead {
  kWeights,   // everything: the float32 weights and the content hash
  kMetadata,  // adapter_config.json and the safetensors header only: every
              // check of names, shapes, dtypes, ranks and targets, but no
              // tensor bytes (weights stay empty, content_hash() is "")
};

struct CompactionTarget;
struct CompactionReport;

class LoraAdapter {
 public:
  LoraAdapter(LoraAdapter&&) = default;
  LoraAdapter& operator=(LoraAdapter&&) = default;
  LoraAdapter(const LoraAdapter&) = delete;
  LoraAdapter& operator=(const LoraAdapter&) = delete;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // 0 <= layer < num_layers().
  const LoraWeights& weights(int64_t layer, LoraModule module) const {
    return layers_[layer][static_cast<int>(module)];
  }
  const LoraWeights& head_weights(HeadModule module) const {
    return heads_[static_cast<int>(module)];
  }
  const SavedModules& saved() const { return saved_; }
  // The base model's hidden size (the width of saved embedding rows).
  int64_t hidden_size() const { return hidden_size_; }
  const formats::PeftLoraConfig& config() const { return config_; }
  // sha256 (hex) of adapter_config.json's bytes and of every tensor's name,
  // dtype, shape and bytes as stored, in name order: equal hashes mean equal
  // adapters, whatever their names.
  const std::string& content_hash() const { return content_hash_; }
  // Float32 bytes of all A and B matrices, magnitudes and saved modules.
  size_t bytes() const { return bytes_; }
  // Distinct ranks of the adapted modules, ascending.
  std::vector<int> ranks() const;
  // Short names of the modules adapted in at least one layer, in LoraModule
  // order, then the adapted head modules.
  std::vector<std::string> target_modules() const;

 private:
  explicit LoraAdapter(formats::PeftLoraConfig config) : config_(std::move(config)) {}
  friend absl::StatusOr<LoraAdapter> LoadLoraAdapter(const std::string&, const BaseModelShape&,
                                                     const AdapterLimits&, AdapterRead);
  // Rewrites modules at lower ranks (rank_compaction.h).
  friend absl::StatusOr<CompactionReport> CompactRanks(const CompactionTarget&, LoraAdapter*);
  // Builds a sum of adapters (adapter_composition.h).
  friend absl::StatusOr<LoraAdapter> ComposeLoraAdapters(const std::vector<CompositionPart>&,
                                                         const AdapterLimits&, std::string);

  formats::PeftLoraConfig config_;
  std::vector<std::array<LoraWeights, kNumLoraModules>> layers_;  // [num_layers][module]
  std::array<LoraWeights, kNumHeadModules> heads_;
  SavedModules saved_;
  int64_t hidden_size_ = 0;
  std::string content_hash_;
  size_t bytes_ = 0;
};

// Reads the PEFT adapter in `dir` (adapter_config.json +
// adapter_model.safetensors) for `base`, refusing anything it cannot serve
// exactly as trained: tensors of unknown or untargeted modules, missing or
// mismatched A/B pairs, wrong shapes, ranks above `limits`, non-finite values
// (kWeights only: they are in the bytes).
absl::StatusOr<LoraAdapter> LoadLoraAdapter(const std::string& dir, const BaseModelShape& base,
                                            const AdapterLimits& limits,
                                            AdapterRead read = AdapterRead::kWeights);

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_LORA_ADAPTER_H_
