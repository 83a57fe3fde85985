#include "adapters/lora_adapter.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/sha256.h"
#include "base/status_macros.h"
#include "formats/safetensors.h"
#include "kernels/backend.h"

namespace loraserve::adapters {
namespace {

namespace fs = std::filesystem;
using formats::TensorInfo;

bool IsAttention(LoraModule module) {
  return module == LoraModule::kQProj || module == LoraModule::kKProj ||
         module == LoraModule::kVProj || module == LoraModule::kOProj;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// What a tensor of an adapter file is, by its name's ending; `module` is
// the rest, the module's path in the base model.
enum class TensorRole { kLoraA, kLoraB, kMagnitude, kSaved };
struct TensorKey {
  std::string module;
  TensorRole role = TensorRole::kLoraA;
  bool embedding_form = false;  // lora_embedding_A / B (PEFT's Embedding layer)
  bool base_layer = false;      // `*.base_layer.weight`: a copy of the base module
};

// Strips "base_model.model." and the adapter name ("default") where PEFT
// leaves it; later entries are only tried when earlier ones do not match.
std::optional<TensorKey> ParseTensorKey(absl::string_view name) {
  struct Ending {
    const char* text;
    TensorRole role;
    bool embedding_form = false;
    bool base_layer = false;
  };
  static const Ending kEndings[] = {
      {".lora_A.default.weight", TensorRole::kLoraA},
      {".lora_A.weight", TensorRole::kLoraA},
      {".lora_B.default.weight", TensorRole::kLoraB},
      {".lora_B.weight", TensorRole::kLoraB},
      {".lora_embedding_A.default", TensorRole::kLoraA, true},
      {".lora_embedding_A", TensorRole::kLoraA, true},
      {".lora_embedding_B.default", TensorRole::kLoraB, true},
      {".lora_embedding_B", TensorRole::kLoraB, true},
      {".lora_magnitude_vector.default.weight", TensorRole::kMagnitude},
      {".lora_magnitude_vector.weight", TensorRole::kMagnitude},
      {".lora_magnitude_vector.default", TensorRole::kMagnitude},
      {".lora_magnitude_vector", TensorRole::kMagnitude},
      {".modules_to_save.default.weight", TensorRole::kSaved},
      {".base_layer.weight", TensorRole::kSaved, false, true},
      {".weight", TensorRole::kSaved},
  };
  absl::ConsumePrefix(&name, "base_model.model.");
  for (const Ending& ending : kEndings) {
    absl::string_view module = name;
    if (absl::ConsumeSuffix(&module, ending.text) && !module.empty()) {
      return TensorKey{std::string(module), ending.role, ending.embedding_form, ending.base_layer};
    }
  }
  return std::nullopt;
}

// The layer index of "model.layers.N.<anything>", if the path is one.
std::optional<int64_t> LayerOf(absl::string_view path) {
  if (!absl::ConsumePrefix(&path, "model.layers.")) return std::nullopt;
  int64_t layer = 0;
  if (!absl::SimpleAtoi(path.substr(0, path.find('.')), &layer) || layer < 0) return std::nullopt;
  return layer;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return text.str();
}

// Length-prefixed so that no two different tensor lists hash the same.
void HashField(Sha256& hash, absl::string_view field) {
  const uint64_t size = field.size();
  hash.Update(&size, sizeof(size));
  hash.Update(field);
}

// The tensors found for one module.
struct ModuleTensors {
  const formats::TensorInfo* a = nullptr;
  const formats::TensorInfo* b = nullptr;
  const formats::TensorInfo* magnitude = nullptr;
  const formats::TensorInfo* saved = nullptr;  // a copy of the whole module
  bool saved_as_base_layer = false;
};

// A module LoRA may adapt, and where its weights go.
struct LoraSlot {
  std::string path;
  LoraWeights* weights = nullptr;
  int64_t in = 0;
  int64_t out = 0;
  bool embedding = false;  // embed_tokens: lora_embedding_A / B, no DoRA
};

// A module an adapter may bring its own copy of, and where it goes.
struct SavedSlot {
  std::string path;
  std::vector<float>* values = nullptr;
  std::vector<int64_t> shape;
  bool head = false;  // embed_tokens or lm_head: PEFT may write it as base_layer
};

// Checks one matrix's shape: [rows, cols] expected, where the base model
// fixes `base_dim` (0: rows, 1: cols) and the rank fixes the other.
absl::Status CheckShape(const formats::TensorInfo& tensor, const std::string& module_path,
                        int64_t rows, int64_t cols, int base_dim, const BaseModelShape& base,
                        const formats::PeftLoraConfig& config) {
  const std::vector<int64_t> expected = {rows, cols};
  if (tensor.shape == expected) return absl::OkStatus();
  const std::string leaf = module_path.substr(module_path.rfind('.') + 1);
  const auto [in, out] = base.modules.at(leaf);
  if (tensor.shape.size() == 2 && tensor.shape[base_dim] != expected[base_dim]) {
    return absl::FailedPreconditionError(absl::StrCat(
        tensor.file, ": tensor \"", tensor.name, "\" has shape ", ShapeString(tensor.shape),
        " but the base model's ", leaf, " has in_features ", in, " and out_features ", out,
        " (expected ", ShapeString(expected), "): the adapter was trained for a different base "
        "model (its config names \"", config.base_model_name_or_path(), "\")"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      tensor.file, ": tensor \"", tensor.name, "\" has shape ", ShapeString(tensor.shape),
      ", expected ", ShapeString(expected), " (rank ", config.RankFor(module_path), " of ",
      module_path, " from ", config.path(), " r / rank_pattern)"));
}

// Converts to float32 and refuses NaN and infinities.
absl::StatusOr<std::vector<float>> ToFloat32(const formats::TensorInfo& tensor) {
  std::vector<float> values(static_cast<size_t>(tensor.NumElements()));
  kernels::ConvertToFloat32(tensor.data, tensor.dtype, tensor.NumElements(), values.data());
  const auto bad = std::find_if(values.begin(), values.end(),
                                [](float v) { return !std::isfinite(v); });
  if (bad != values.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        tensor.file, ": tensor \"", tensor.name, "\" has a non-finite value (", *bad,
        ") at element ", bad - values.begin(), "; every LoRA weight must be finite"));
  }
  return values;
}

}  // namespace

const char* LoraModuleName(LoraModule module) {
  static constexpr const char* kNames[kNumLoraModules] = {
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return kNames[static_cast<int>(module)];
}

std::string LoraModulePath(int64_t layer, LoraModule module) {
  return absl::StrCat("model.layers.", layer, IsAttention(module) ? ".self_attn." : ".mlp.",
                      LoraModuleName(module));
}

BaseModelShape LlamaBaseShape(int64_t num_layers, int64_t hidden_size, int64_t intermediate_size,
                              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t vocab_size) {
  BaseModelShape shape;
  shape.num_layers = num_layers;
  shape.hidden_size = hidden_size;
  shape.vocab_size = vocab_size;
  if (vocab_size > 0) {
    shape.modules["embed_tokens"] = {vocab_size, hidden_size};
    shape.modules["lm_head"] = {hidden_size, vocab_size};
  }
  shape.modules.insert({{"q_proj", {hidden_size, num_heads * head_dim}},
                   {"k_proj", {hidden_size, num_kv_heads * head_dim}},
                   {"v_proj", {hidden_size, num_kv_heads * head_dim}},
                   {"o_proj", {num_heads * head_dim, hidden_size}},
                   {"gate_proj", {hidden_size, intermediate_size}},
                   {"up_proj", {hidden_size, intermediate_size}},
                   {"down_proj", {intermediate_size, hidden_size}}});
  return shape;
}

const char* HeadModuleName(HeadModule module) {
  return module == HeadModule::kEmbedTokens ? "embed_tokens" : "lm_head";
}

std::string HeadModulePath(HeadModule module) {
  return module == HeadModule::kEmbedTokens ? "model.embed_tokens" : "lm_head";
}

std::vector<int> LoraAdapter::ranks() const {
  std::set<int> ranks;
  for (const auto& layer : layers_) {
    for (const LoraWeights& w : layer) {
      if (!w.empty()) ranks.insert(w.rank);
    }
  }
  for (const LoraWeights& w : heads_) {
    if (!w.empty()) ranks.insert(w.rank);
  }
  return {ranks.begin(), ranks.end()};
}

std::vector<std::string> LoraAdapter::target_modules() const {
  std::vector<std::string> names;
  for (LoraModule module : kAllLoraModules) {
    if (std::any_of(layers_.begin(), layers_.end(), [module](const auto& layer) {
          return !layer[static_cast<int>(module)].empty();
        })) {
      names.push_back(LoraModuleName(module));
    }
  }
  for (HeadModule module : kAllHeadModules) {
    if (!head_weights(module).empty()) names.push_back(HeadModuleName(module));
  }
  return names;
}

absl::StatusOr<LoraAdapter> LoadLoraAdapter(const std::string& dir, const BaseModelShape& base,
                                            const AdapterLimits& limits, AdapterRead read) {
  const bool weights = read == AdapterRead::kWeights;
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  const std::string weights_path = (fs::path(dir) / "adapter_model.safetensors").string();
  ASSIGN_OR_RETURN(const std::string config_text, ReadFile(config_path));
  ASSIGN_OR_RETURN(formats::PeftLoraConfig config,
                   formats::PeftLoraConfig::Parse(config_text, config_path));
  std::error_code error;
  if (!fs::exists(weights_path, error)) {
    const std::string bin_path = (fs::path(dir) / "adapter_model.bin").string();
    if (fs::exists(bin_path, error)) {
      return absl::FailedPreconditionError(absl::StrCat(
          bin_path, ": adapter_model.bin (pickle) is not supported; convert it to safetensors, "
          "e.g. PeftModel.from_pretrained(base, dir).save_pretrained(out, "
          "safe_serialization=True), or safetensors.torch.save_file(torch.load(\"",
          bin_path, "\"), \"", weights_path, "\")"));
    }
    return absl::NotFoundError(absl::StrCat(dir, ": no adapter_model.safetensors"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<formats::SafetensorsFile> file,
                   formats::SafetensorsFile::Open(weights_path, /*read_ahead=*/weights));

  for (const auto& [name, dtype] : file->UnexposedDtypes()) {
    return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensor \"", name,
                                                   "\" has dtype ", dtype,
                                                   "; LoRA weights must be F32, F16 or BF16"));
  }
  LoraAdapter adapter(std::move(config));
  const formats::PeftLoraConfig& cfg = adapter.config_;
  adapter.layers_.resize(base.num_layers);
  adapter.hidden_size_ = base.hidden_size;
  // Every module the base model lets an adapter adapt or replace.
  std::map<std::string, LoraSlot> lora_slots;
  std::map<std::string, SavedSlot> saved_slots;
  for (int64_t layer = 0; layer < base.num_layers; ++layer) {
    for (LoraModule module : kAllLoraModules) {
      const auto shape = base.modules.find(LoraModuleName(module));
      if (shape == base.modules.end()) continue;
      const std::string path = LoraModulePath(layer, module);
      lora_slots[path] = {path, &adapter.layers_[layer][static_cast<int>(module)],
                          shape->second.first, shape->second.second};
    }
  }
  for (HeadModule module : kAllHeadModules) {
    const auto shape = base.modules.find(HeadModuleName(module));
    if (shape == base.modules.end()) continue;
    const std::string path = HeadModulePath(module);
    lora_slots[path] = {path, &adapter.heads_[static_cast<int>(module)], shape->second.first,
                        shape->second.second, module == HeadModule::kEmbedTokens};
  }
  SavedModules& saved = adapter.saved_;
  if (base.vocab_size > 0) {
    const std::vector<int64_t> table = {base.vocab_size, base.hidden_size};
    saved_slots["model.embed_tokens"] = {"model.embed_tokens", &saved.embed_tokens, table, true};
    saved_slots["lm_head"] = {"lm_head", &saved.lm_head, table, true};
  }
  if (base.hidden_size > 0) {
    const std::vector<int64_t> norm = {base.hidden_size};
    saved_slots["model.norm"] = {"model.norm", &saved.norm, norm};
    saved.input_norms.resize(base.num_layers);
    saved.post_attention_norms.resize(base.num_layers);
    for (int64_t layer = 0; layer < base.num_layers; ++layer) {
      const std::string prefix = absl::StrCat("model.layers.", layer, ".");
      saved_slots[prefix + "input_layernorm"] = {prefix + "input_layernorm",
                                                 &saved.input_norms[layer], norm};
      saved_slots[prefix + "post_attention_layernorm"] = {
          prefix + "post_attention_layernorm", &saved.post_attention_norms[layer], norm};
    }
  }

  // Each modules_to_save entry must name only modules we keep copies of.
  for (const std::string& entry : cfg.modules_to_save()) {
    const auto ends = [&entry](const auto& slot) { return absl::EndsWith(slot.first, entry); };
    const auto projection = std::find_if(lora_slots.begin(), lora_slots.end(), ends);
    if (projection != lora_slots.end() && !saved_slots.count(projection->first)) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path, ": modules_to_save entry \"", entry, "\" reaches ", projection->first,
          "; only embed_tokens, lm_head and the RMS norms can be saved (adapt projections with "
          "LoRA instead)"));
    }
    if (std::none_of(saved_slots.begin(), saved_slots.end(), ends)) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path, ": modules_to_save entry \"", entry,
          "\" names none of the modules that can be saved (embed_tokens, lm_head, norm, "
          "input_layernorm, post_attention_layernorm)"));
    }
  }

  // Sort every tensor into its module, refusing anything that is not a LoRA
  // matrix of a module the config targets, or a copy of a saved module.
  std::map<std::string, ModuleTensors> found;
  for (const auto& [name, tensor] : file->tensors()) {
    const std::optional<TensorKey> key = ParseTensorKey(name);
    const std::optional<int64_t> layer = key ? LayerOf(key->module) : std::nullopt;
    if (layer.has_value() && *layer >= base.num_layers) {
      return absl::FailedPreconditionError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" is for layer ", *layer,
          " but the base model has ", base.num_layers, " layers"));
    }
    const bool lora_role = key && key->role != TensorRole::kSaved;
    const auto lora_slot = key ? lora_slots.find(key->module) : lora_slots.end();
    const auto saved_slot = key ? saved_slots.find(key->module) : saved_slots.end();
    if (!key || (lora_role && lora_slot == lora_slots.end()) ||
        (!lora_role && saved_slot == saved_slots.end())) {
      // A projection the base model does not have (else an unknown module,
      // or a known one under the wrong parent).
      const std::string leaf = key ? key->module.substr(key->module.rfind('.') + 1) : "";
      const bool projection =
          std::any_of(kAllLoraModules.begin(), kAllLoraModules.end(),
                      [&leaf](LoraModule m) { return leaf == LoraModuleName(m); });
      if (lora_role && layer.has_value() && projection && base.modules.count(leaf) == 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            weights_path, ": tensor \"", name, "\" adapts ", key->module,
            ", which the base model lacks"));
      }
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" is not a LoRA weight of a known module; expected "
          "[base_model.model.]model.layers.N.{self_attn.{q,k,v,o}_proj|mlp.{gate,up,down}_proj}"
          ".lora_{A,B}[.default].weight (or .lora_magnitude_vector), lm_head.lora_{A,B}.weight, "
          "model.embed_tokens.lora_embedding_{A,B}, or the .weight of a saved module "
          "(embed_tokens, lm_head, model.norm, a layer's input_layernorm / "
          "post_attention_layernorm)"));
    }
    ModuleTensors& tensors = found[key->module];
    if (lora_role) {
      if (!cfg.TargetsModule(key->module)) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor \"", name, "\" adapts ", key->module, ", which ", config_path,
            " does not target (target_modules / layers_to_transform / exclude_modules)"));
      }
      if (key->role != TensorRole::kMagnitude &&
          key->embedding_form != lora_slot->second.embedding) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor \"", name, "\": ", key->module, " takes ",
            lora_slot->second.embedding ? "lora_embedding_A / lora_embedding_B"
                                        : "lora_A / lora_B",
            " matrices"));
      }
    } else if (!(cfg.SavesModule(key->module) ||
                 (key->base_layer && saved_slot->second.head && cfg.TargetsModule(key->module)))) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" is a copy of ", key->module, ", which ",
          config_path, " does not list in modules_to_save"));
    }
    const formats::TensorInfo** slot =
        key->role == TensorRole::kLoraA   ? &tensors.a
        : key->role == TensorRole::kLoraB ? &tensors.b
        : key->role == TensorRole::kSaved ? &tensors.saved
                                          : &tensors.magnitude;
    if (*slot != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensors \"", (*slot)->name,
                                                     "\" and \"", name, "\" are the same matrix"));
    }
    *slot = &tensor;
    if (key->role == TensorRole::kSaved) tensors.saved_as_base_layer = key->base_layer;
  }

  bool any_target = false;
  for (const auto& [path, slot] : lora_slots) {
    if (!cfg.TargetsModule(path)) continue;
    if (cfg.SavesModule(path)) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path, ": ", path, " is both a LoRA target and in modules_to_save; PEFT keeps "
          "one or the other"));
    }
    any_target = true;
    const auto it = found.find(path);
    if (it == found.end() || (it->second.a == nullptr && it->second.b == nullptr)) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": ", config_path, " targets ", path,
          " but the file has no lora_A / lora_B tensors for it"));
    }
    const ModuleTensors& tensors = it->second;
    if (tensors.a == nullptr || tensors.b == nullptr) {
      const formats::TensorInfo& present = tensors.a != nullptr ? *tensors.a : *tensors.b;
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", present.name, "\" has no matching ",
          tensors.a != nullptr ? "lora_B" : "lora_A", " tensor for ", path));
    }
    const int rank = cfg.RankFor(path);
    RETURN_IF_ERROR(CheckShape(*tensors.a, path, rank, slot.in, /*base_dim=*/1, base, cfg));
    RETURN_IF_ERROR(CheckShape(*tensors.b, path, slot.out, rank, /*base_dim=*/0, base, cfg));
    if (rank > limits.max_rank) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": module ", path, " has rank ", rank, ", above the limit of ", limits.max_rank,
          " (raise it with --max-lora-rank)"));
    }
    if (cfg.use_dora() && slot.embedding) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path, ": use_dora with ", path, " in target_modules: DoRA on the embeddings "
          "is not supported (DoRA adapts the linear projections and lm_head)"));
    }
    if (cfg.use_dora() != (tensors.magnitude != nullptr)) {
      return absl::InvalidArgumentError(
          cfg.use_dora()
              ? absl::StrCat(weights_path, ": ", config_path, " sets use_dora but ", path,
                             " has no lora_magnitude_vector")
              : absl::StrCat(weights_path, ": tensor \"", tensors.magnitude->name,
                             "\" is a DoRA magnitude, but ", config_path,
                             " does not set use_dora"));
    }
    if (tensors.magnitude != nullptr && tensors.magnitude->shape != std::vector<int64_t>{slot.out}) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", tensors.magnitude->name, "\" has shape ",
          ShapeString(tensors.magnitude->shape), ", expected [", slot.out, "] (", path,
          "'s out_features)"));
    }
    LoraWeights& module_weights = *slot.weights;
    module_weights.rank = rank;
    module_weights.scale = static_cast<float>(cfg.ScaleFor(path));
    module_weights.in_features = slot.in;
    module_weights.out_features = slot.out;
    module_weights.dora = tensors.magnitude != nullptr;
    // What the float32 weights take, read or not.
    adapter.bytes_ += static_cast<size_t>(rank) * (slot.in + slot.out) * sizeof(float);
    if (module_weights.dora) adapter.bytes_ += static_cast<size_t>(slot.out) * sizeof(float);
    if (!weights) continue;
    ASSIGN_OR_RETURN(module_weights.a, ToFloat32(*tensors.a));
    ASSIGN_OR_RETURN(module_weights.b, ToFloat32(*tensors.b));
    if (module_weights.dora) {
      ASSIGN_OR_RETURN(module_weights.magnitude, ToFloat32(*tensors.magnitude));
    }
  }
  if (!any_target) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": target_modules selects none of the base model's projections (",
        absl::StrJoin(base.modules, ", ",
                      [](std::string* out, const auto& entry) { out->append(entry.first); }),
        ")"));
  }

  for (const auto& [path, slot] : saved_slots) {
    const auto it = found.find(path);
    const formats::TensorInfo* copy = it == found.end() ? nullptr : it->second.saved;
    if (copy == nullptr) {
      if (!cfg.SavesModule(path)) continue;
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": ", config_path, " lists ", path,
          " in modules_to_save but the file has no copy of it (", path, ".weight)"));
    }
    if (copy->shape != slot.shape) {
      return absl::FailedPreconditionError(absl::StrCat(
          weights_path, ": tensor \"", copy->name, "\" has shape ", ShapeString(copy->shape),
          " but the base model's ", path, " is ", ShapeString(slot.shape),
          ": the adapter was trained for a different base model"));
    }
    saved.paths.push_back(path);
    adapter.bytes_ += static_cast<size_t>(copy->NumElements()) * sizeof(float);
    if (weights) {
      ASSIGN_OR_RETURN(*slot.values, ToFloat32(*copy));
    }
  }
  if (std::all_of(saved.input_norms.begin(), saved.input_norms.end(),
                  [](const auto& v) { return v.empty(); }) &&
      std::all_of(saved.post_attention_norms.begin(), saved.post_attention_norms.end(),
                  [](const auto& v) { return v.empty(); })) {
    saved.input_norms.clear();
    saved.post_attention_norms.clear();
  }

  if (!weights) return adapter;
  Sha256 hash;
  HashField(hash, config_text);
  for (const auto& [name, tensor] : file->tensors()) {
    HashField(hash, name);
    HashField(hash, kernels::DTypeName(tensor.dtype));
    HashField(hash, ShapeString(tensor.shape));
    HashField(hash, absl::string_view(reinterpret_cast<const char*>(tensor.data), tensor.bytes));
  }
  adapter.content_hash_ = hash.HexDigest();
  return adapter;
}

}  // namespace loraserve::adapters
