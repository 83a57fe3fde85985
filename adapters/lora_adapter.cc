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

// Which matrix of which module a tensor is.
struct TensorKey {
  int64_t layer = 0;
  LoraModule module = LoraModule::kQProj;
  bool is_a = true;  // lora_A, else lora_B
};

// Parses "[base_model.model.]model.layers.N.{self_attn|mlp}.PROJ.lora_{A|B}[.default].weight".
std::optional<TensorKey> ParseTensorKey(absl::string_view name) {
  absl::ConsumePrefix(&name, "base_model.model.");
  const std::vector<absl::string_view> parts = absl::StrSplit(name, '.');
  // model layers N parent proj lora_X [default] weight
  if (parts.size() != 7 && parts.size() != 8) return std::nullopt;
  if (parts[0] != "model" || parts[1] != "layers" || parts.back() != "weight") return std::nullopt;
  if (parts.size() == 8 && parts[6] != "default") return std::nullopt;
  TensorKey key;
  if (!absl::SimpleAtoi(parts[2], &key.layer) || key.layer < 0) return std::nullopt;
  const auto module = std::find_if(kAllLoraModules.begin(), kAllLoraModules.end(),
                                   [&](LoraModule m) { return parts[4] == LoraModuleName(m); });
  if (module == kAllLoraModules.end()) return std::nullopt;
  key.module = *module;
  if (parts[3] != (IsAttention(key.module) ? "self_attn" : "mlp")) return std::nullopt;
  if (parts[5] != "lora_A" && parts[5] != "lora_B") return std::nullopt;
  key.is_a = parts[5] == "lora_A";
  return key;
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

// The A and B tensors found for one module.
struct ModuleTensors {
  const formats::TensorInfo* a = nullptr;
  const formats::TensorInfo* b = nullptr;
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
                              int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  BaseModelShape shape;
  shape.num_layers = num_layers;
  shape.modules = {{"q_proj", {hidden_size, num_heads * head_dim}},
                   {"k_proj", {hidden_size, num_kv_heads * head_dim}},
                   {"v_proj", {hidden_size, num_kv_heads * head_dim}},
                   {"o_proj", {num_heads * head_dim, hidden_size}},
                   {"gate_proj", {hidden_size, intermediate_size}},
                   {"up_proj", {hidden_size, intermediate_size}},
                   {"down_proj", {intermediate_size, hidden_size}}};
  return shape;
}

std::vector<int> LoraAdapter::ranks() const {
  std::set<int> ranks;
  for (const auto& layer : layers_) {
    for (const LoraWeights& w : layer) {
      if (!w.empty()) ranks.insert(w.rank);
    }
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
  // Sort every tensor into its module, refusing anything that is not a LoRA
  // matrix of a module the config targets in this base model.
  std::map<std::pair<int64_t, LoraModule>, ModuleTensors> found;
  for (const auto& [name, tensor] : file->tensors()) {
    const std::optional<TensorKey> key = ParseTensorKey(name);
    if (!key.has_value()) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" is not a LoRA weight of a known module; expected "
          "[base_model.model.]model.layers.N.{self_attn.{q,k,v,o}_proj|mlp.{gate,up,down}_proj}"
          ".lora_{A,B}[.default].weight"));
    }
    const std::string path = LoraModulePath(key->layer, key->module);
    if (key->layer >= base.num_layers) {
      return absl::FailedPreconditionError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" is for layer ", key->layer,
          " but the base model has ", base.num_layers, " layers"));
    }
    if (base.modules.count(LoraModuleName(key->module)) == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" adapts ", path, ", which the base model lacks"));
    }
    if (!config.TargetsModule(path)) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", name, "\" adapts ", path, ", which ", config_path,
          " does not target (target_modules / layers_to_transform / exclude_modules)"));
    }
    const formats::TensorInfo*& slot =
        key->is_a ? found[{key->layer, key->module}].a : found[{key->layer, key->module}].b;
    if (slot != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(weights_path, ": tensors \"", slot->name,
                                                     "\" and \"", name, "\" are the same matrix"));
    }
    slot = &tensor;
  }

  LoraAdapter adapter(std::move(config));
  const formats::PeftLoraConfig& cfg = adapter.config_;
  adapter.layers_.resize(base.num_layers);
  bool any_target = false;
  for (int64_t layer = 0; layer < base.num_layers; ++layer) {
    for (LoraModule module : kAllLoraModules) {
      const std::string path = LoraModulePath(layer, module);
      const auto base_module = base.modules.find(LoraModuleName(module));
      if (base_module == base.modules.end() || !cfg.TargetsModule(path)) continue;
      any_target = true;
      const auto it = found.find({layer, module});
      if (it == found.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": ", config_path, " targets ", path,
            " but the file has no lora_A / lora_B tensors for it"));
      }
      const auto [in, out] = base_module->second;
      const ModuleTensors& tensors = it->second;
      if (tensors.a == nullptr || tensors.b == nullptr) {
        const formats::TensorInfo& present = tensors.a != nullptr ? *tensors.a : *tensors.b;
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor \"", present.name, "\" has no matching ",
            tensors.a != nullptr ? "lora_B" : "lora_A", " tensor for ", path));
      }
      const int rank = cfg.RankFor(path);
      RETURN_IF_ERROR(CheckShape(*tensors.a, path, rank, in, /*base_dim=*/1, base, cfg));
      RETURN_IF_ERROR(CheckShape(*tensors.b, path, out, rank, /*base_dim=*/0, base, cfg));
      if (rank > limits.max_rank) {
        return absl::FailedPreconditionError(absl::StrCat(
            dir, ": module ", path, " has rank ", rank, ", above the limit of ", limits.max_rank,
            " (raise it with --max-lora-rank)"));
      }
      LoraWeights& module_weights = adapter.layers_[layer][static_cast<int>(module)];
      module_weights.rank = rank;
      module_weights.scale = static_cast<float>(cfg.ScaleFor(path));
      module_weights.in_features = in;
      module_weights.out_features = out;
      // What the float32 weights take, read or not.
      adapter.bytes_ += static_cast<size_t>(rank) * (in + out) * sizeof(float);
      if (!weights) continue;
      ASSIGN_OR_RETURN(module_weights.a, ToFloat32(*tensors.a));
      ASSIGN_OR_RETURN(module_weights.b, ToFloat32(*tensors.b));
    }
  }
  if (!any_target) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": target_modules selects none of the base model's projections (",
        absl::StrJoin(base.modules, ", ",
                      [](std::string* out, const auto& entry) { out->append(entry.first); }),
        ")"));
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
