#include "formats/model_config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace loraserve::formats {
namespace {

using json = nlohmann::json;

constexpr const char* kSupportedTypes[] = {"llama", "mistral", "qwen2"};

// Far above any model (2^60 ≈ 1.2e18 parameters), and low enough that the
// parameter count and its float32 bytes fit in int64_t.
constexpr long double kMaxParameters = 1152921504606846976.0L;  // 2^60

// ParameterCount's sum in long double, which cannot overflow for any sizes.
long double ApproxParameterCount(const ModelConfig& c) {
  const long double hidden = c.hidden_size;
  const long double q_width = static_cast<long double>(c.num_attention_heads) * c.head_dim;
  const long double kv_width = static_cast<long double>(c.num_key_value_heads) * c.head_dim;
  const long double embeddings = static_cast<long double>(c.vocab_size) * hidden;
  const long double attention = hidden * (q_width + 2 * kv_width) + q_width * hidden +
                                (c.attention_bias ? q_width + 2 * kv_width : 0);
  const long double mlp = 3 * hidden * c.intermediate_size;
  return embeddings * (c.tie_word_embeddings ? 1 : 2) +
         static_cast<long double>(c.num_hidden_layers) * (attention + mlp + 2 * hidden) + hidden;
}

// `--load-format dummy` presets, written as the config.json of each model so
// that they go through the same parsing, defaults and validation as real ones.
struct Preset {
  const char* name;
  const char* config_json;
};
constexpr Preset kPresets[] = {
    // The shape of ../shared/models/aidreams-260k.
    {"tiny", R"({"model_type": "llama", "vocab_size": 512, "hidden_size": 64,
       "intermediate_size": 172, "num_hidden_layers": 4, "num_attention_heads": 4,
       "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "tie_word_embeddings": true, "max_position_embeddings": 128,
       "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"})"},
    // TinyLlama/TinyLlama-1.1B-Chat-v1.0.
    {"tinyllama-1.1b", R"({"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
       "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
       "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2,
       "torch_dtype": "bfloat16"})"},
    // meta-llama/Llama-2-7b-hf.
    {"llama-2-7b", R"({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
       "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2,
       "torch_dtype": "float16"})"},
    // meta-llama/Llama-3.1-8B-Instruct (its llama3 rope scaling and 128k
    // context; the eos list is the Instruct one).
    {"llama-3-8b", R"({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
       "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
       "max_position_embeddings": 131072, "bos_token_id": 128000,
       "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"})"},
    // meta-llama/Llama-3.2-1B-Instruct.
    {"llama-3.2-1b", R"({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
       "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
       "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
       "rope_theta": 500000.0, "tie_word_embeddings": true,
       "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
       "max_position_embeddings": 131072, "bos_token_id": 128000,
       "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16"})"},
    // mistralai/Mistral-7B-Instruct-v0.2 (rope_theta 1e6, no sliding window).
    {"mistral-7b", R"({"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
       "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
       "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2,
       "torch_dtype": "bfloat16"})"},
    // Qwen/Qwen2-7B-Instruct.
    {"qwen2-7b", R"({"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
       "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
       "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
       "max_position_embeddings": 32768, "bos_token_id": 151643, "eos_token_id": 151645,
       "torch_dtype": "bfloat16"})"},
};

// Reads the fields of one JSON object; every error names `source` and the
// field (prefixed, for nested objects such as rope_scaling).
class FieldReader {
 public:
  FieldReader(const json& object, absl::string_view source, std::string prefix = "")
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  absl::Status Error(absl::string_view field, absl::string_view what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(source_, ": field '", prefix_, field, "' ", what));
  }

  // nullptr when the field is absent or null: Hugging Face writes null for
  // "use the default".
  const json* Find(const char* field) const {
    auto it = object_.find(field);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }

  absl::StatusOr<int64_t> PositiveInt(const char* field,
                                      std::optional<int64_t> default_value = std::nullopt) const {
    const json* value = Find(field);
    if (value == nullptr) {
      if (default_value.has_value()) return *default_value;
      return Error(field, "is missing; expected a positive integer");
    }
    // Integers above INT64_MAX read back negative and are refused here too.
    if (!value->is_number_integer() || value->get<int64_t>() <= 0) {
      return Error(field, absl::StrCat("is ", value->dump(), "; expected a positive integer"));
    }
    return value->get<int64_t>();
  }

  absl::StatusOr<double> PositiveNumber(const char* field,
                                        std::optional<double> default_value = std::nullopt) const {
    const json* value = Find(field);
    if (value == nullptr) {
      if (default_value.has_value()) return *default_value;
      return Error(field, "is missing; expected a positive number");
    }
    if (!value->is_number() || !(value->get<double>() > 0) ||
        !std::isfinite(value->get<double>())) {
      return Error(field, absl::StrCat("is ", value->dump(), "; expected a positive number"));
    }
    return value->get<double>();
  }

  absl::StatusOr<bool> Bool(const char* field, bool default_value) const {
    const json* value = Find(field);
    if (value == nullptr) return default_value;
    if (!value->is_boolean()) {
      return Error(field, absl::StrCat("is ", value->dump(), "; expected true or false"));
    }
    return value->get<bool>();
  }

  absl::StatusOr<std::string> String(const char* field, const std::string& default_value) const {
    const json* value = Find(field);
    if (value == nullptr) return default_value;
    if (!value->is_string()) {
      return Error(field, absl::StrCat("is ", value->dump(), "; expected a string"));
    }
    return value->get<std::string>();
  }

  // A token id, or a list of them (eos_token_id may be either).
  absl::StatusOr<std::vector<int64_t>> TokenIds(const char* field) const {
    const json* value = Find(field);
    std::vector<int64_t> ids;
    if (value == nullptr) return ids;
    const json list = value->is_array() ? *value : json::array({*value});
    for (const json& id : list) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0) {
        return Error(field, absl::StrCat("is ", value->dump(),
                                         "; expected a token id or a list of token ids"));
      }
      ids.push_back(id.get<int64_t>());
    }
    return ids;
  }

 private:
  const json& object_;
  absl::string_view source_;
  std::string prefix_;
};

absl::StatusOr<json> ParseJsonObject(absl::string_view text, absl::string_view source) {
  RETURN_IF_ERROR(CheckJsonDepth(text, source));
  json object;
  try {
    object = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON: ", e.what()));
  }
  if (!object.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": is a JSON ", object.type_name(), "; expected an object"));
  }
  return object;
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return text.str();
}

// Reads bos_token_id / eos_token_id from `reader` into `config` where
// `config` has none yet.
absl::Status FillTokenIds(const FieldReader& reader, ModelConfig& config) {
  if (config.bos_token_id < 0) {
    ASSIGN_OR_RETURN(std::vector<int64_t> bos, reader.TokenIds("bos_token_id"));
    if (bos.size() > 1) {
      return reader.Error("bos_token_id", "is a list; expected a single token id");
    }
    if (!bos.empty()) config.bos_token_id = bos[0];
  }
  if (config.eos_token_ids.empty()) {
    ASSIGN_OR_RETURN(config.eos_token_ids, reader.TokenIds("eos_token_id"));
  }
  return absl::OkStatus();
}

absl::Status CheckTokenIdsInVocab(const ModelConfig& config, absl::string_view source) {
  std::vector<int64_t> ids = config.eos_token_ids;
  if (config.bos_token_id >= 0) ids.push_back(config.bos_token_id);
  for (int64_t id : ids) {
    if (id >= config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": token id ", id,
                                                     " in bos_token_id/eos_token_id; expected "
                                                     "ids below vocab_size ",
                                                     config.vocab_size));
    }
  }
  return absl::OkStatus();
}

// Transformers 4 writes rope_theta at the top level and the scaling in
// "rope_scaling" ({"rope_type" or "type": ...}); transformers 5 writes both
// into "rope_parameters". Either is read.
absl::Status ParseRope(const FieldReader& top, absl::string_view source, ModelConfig& config) {
  ASSIGN_OR_RETURN(config.rope_theta, top.PositiveNumber("rope_theta", 10000.0));
  const char* key = top.Find("rope_parameters") != nullptr ? "rope_parameters" : "rope_scaling";
  const json* rope = top.Find(key);
  if (rope == nullptr) return absl::OkStatus();
  if (!rope->is_object()) {
    return top.Error(key, absl::StrCat("is ", rope->dump(), "; expected an object or null"));
  }
  FieldReader reader(*rope, source, absl::StrCat(key, "."));
  ASSIGN_OR_RETURN(config.rope_theta, reader.PositiveNumber("rope_theta", config.rope_theta));
  const char* type_key = reader.Find("rope_type") != nullptr ? "rope_type" : "type";
  ASSIGN_OR_RETURN(std::string type, reader.String(type_key, ""));
  if (type.empty()) {
    return reader.Error("rope_type", "is missing; expected \"default\" or \"llama3\"");
  }
  if (type == "default") return absl::OkStatus();
  if (type != "llama3") {
    return reader.Error(type_key, absl::StrCat("is \"", type,
                                               "\", which is not supported; expected \"default\" "
                                               "or \"llama3\""));
  }
  RopeScaling& scaling = config.rope_scaling;
  scaling.type = RopeScalingType::kLlama3;
  ASSIGN_OR_RETURN(scaling.factor, reader.PositiveNumber("factor"));
  ASSIGN_OR_RETURN(scaling.low_freq_factor, reader.PositiveNumber("low_freq_factor"));
  ASSIGN_OR_RETURN(scaling.high_freq_factor, reader.PositiveNumber("high_freq_factor"));
  ASSIGN_OR_RETURN(scaling.original_max_position_embeddings,
                   reader.PositiveInt("original_max_position_embeddings"));
  // The llama3 formula divides by high_freq_factor - low_freq_factor.
  if (scaling.high_freq_factor <= scaling.low_freq_factor) {
    return reader.Error("high_freq_factor", absl::StrCat("is ", scaling.high_freq_factor,
                                                         "; expected more than low_freq_factor ",
                                                         scaling.low_freq_factor));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseConfigObject(const json& root, absl::string_view source) {
  FieldReader top(root, source);
  ModelConfig config;

  const json* model_type = top.Find("model_type");
  if (model_type == nullptr || !model_type->is_string()) {
    return top.Error("model_type",
                     absl::StrCat("is ", model_type ? model_type->dump() : "missing",
                                  "; expected one of ", absl::StrJoin(kSupportedTypes, ", ")));
  }
  config.model_type = model_type->get<std::string>();
  if (std::find(std::begin(kSupportedTypes), std::end(kSupportedTypes), config.model_type) ==
      std::end(kSupportedTypes)) {
    return top.Error("model_type", absl::StrCat("is \"", config.model_type,
                                                "\", which is not supported; expected one of ",
                                                absl::StrJoin(kSupportedTypes, ", ")));
  }
  const bool is_qwen2 = config.model_type == "qwen2";
  const bool is_llama = config.model_type == "llama";

  // The forward pass implements a SiLU-gated MLP without biases only.
  ASSIGN_OR_RETURN(std::string hidden_act, top.String("hidden_act", "silu"));
  if (hidden_act != "silu") {
    return top.Error("hidden_act", absl::StrCat("is \"", hidden_act, "\"; expected \"silu\""));
  }
  ASSIGN_OR_RETURN(bool mlp_bias, top.Bool("mlp_bias", false));
  if (mlp_bias) return top.Error("mlp_bias", "is true; expected false (MLP biases unsupported)");

  ASSIGN_OR_RETURN(config.vocab_size, top.PositiveInt("vocab_size"));
  ASSIGN_OR_RETURN(config.hidden_size, top.PositiveInt("hidden_size"));
  ASSIGN_OR_RETURN(config.intermediate_size, top.PositiveInt("intermediate_size"));
  ASSIGN_OR_RETURN(config.num_hidden_layers, top.PositiveInt("num_hidden_layers"));
  ASSIGN_OR_RETURN(config.num_attention_heads, top.PositiveInt("num_attention_heads"));
  ASSIGN_OR_RETURN(config.num_key_value_heads,
                   top.PositiveInt("num_key_value_heads", config.num_attention_heads));
  if (config.num_attention_heads % config.num_key_value_heads != 0) {
    return top.Error(
        "num_key_value_heads",
        absl::StrCat("is ", config.num_key_value_heads,
                     "; expected a divisor of num_attention_heads ", config.num_attention_heads));
  }
  if (top.Find("head_dim") != nullptr) {
    // Explicit head_dim may differ from hidden_size / heads (e.g. Mistral Nemo).
    ASSIGN_OR_RETURN(config.head_dim, top.PositiveInt("head_dim"));
  } else if (config.hidden_size % config.num_attention_heads != 0) {
    return top.Error(
        "num_attention_heads",
        absl::StrCat("is ", config.num_attention_heads, "; expected a divisor of hidden_size ",
                     config.hidden_size, " when head_dim is not given"));
  } else {
    config.head_dim = config.hidden_size / config.num_attention_heads;
  }
  if (config.head_dim % 2 != 0) {
    return top.Error("head_dim", absl::StrCat("is ", config.head_dim,
                                              "; expected an even size (rotary embedding "
                                              "rotates pairs)"));
  }

  ASSIGN_OR_RETURN(config.rms_norm_eps, top.PositiveNumber("rms_norm_eps", 1e-6));
  RETURN_IF_ERROR(ParseRope(top, source, config));
  ASSIGN_OR_RETURN(config.tie_word_embeddings, top.Bool("tie_word_embeddings", false));

  if (is_qwen2) {
    config.attention_bias = true;  // Qwen2 has q/k/v biases, always
  } else if (is_llama) {
    // Llama's attention_bias puts a bias on o_proj too, which the forward
    // pass does not implement. (Mistral has no such option.)
    ASSIGN_OR_RETURN(bool attention_bias, top.Bool("attention_bias", false));
    if (attention_bias) {
      return top.Error("attention_bias",
                       "is true, which for llama adds biases to q/k/v and o_proj; expected false "
                       "(only q/k/v biases, as in qwen2, are supported)");
    }
  }

  // Hugging Face's defaults per model type.
  const int64_t default_max_positions = is_llama ? 2048 : is_qwen2 ? 32768 : 131072;
  ASSIGN_OR_RETURN(config.max_position_embeddings,
                   top.PositiveInt("max_position_embeddings", default_max_positions));
  RETURN_IF_ERROR(FillTokenIds(top, config));
  RETURN_IF_ERROR(CheckTokenIdsInVocab(config, source));
  // transformers 5 renamed torch_dtype to dtype.
  ASSIGN_OR_RETURN(config.torch_dtype,
                   top.String(top.Find("torch_dtype") != nullptr ? "torch_dtype" : "dtype", ""));
  // Each size may be valid alone and their products still overflow.
  if (const long double parameters = ApproxParameterCount(config); parameters > kMaxParameters) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": the sizes (vocab_size, hidden_size, intermediate_size, num_hidden_layers, ",
        "heads, head_dim) make ", static_cast<double>(parameters),
        " parameters; expected at most 2^60"));
  }
  return config;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                             absl::string_view source) {
  ASSIGN_OR_RETURN(json root, ParseJsonObject(json_text, source));
  return ParseConfigObject(root, source);
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  const std::string path = model_dir + "/config.json";
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(path));
  ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(text, path));
  if (config.bos_token_id >= 0 && !config.eos_token_ids.empty()) return config;

  const std::string generation_path = model_dir + "/generation_config.json";
  std::error_code error;
  if (!std::filesystem::is_regular_file(generation_path, error)) return config;
  ASSIGN_OR_RETURN(std::string generation_text, ReadTextFile(generation_path));
  ASSIGN_OR_RETURN(json generation, ParseJsonObject(generation_text, generation_path));
  RETURN_IF_ERROR(FillTokenIds(FieldReader(generation, generation_path), config));
  RETURN_IF_ERROR(CheckTokenIdsInVocab(config, generation_path));
  return config;
}

absl::StatusOr<ModelConfig> DummyPreset(absl::string_view name) {
  for (const Preset& preset : kPresets) {
    if (name == preset.name) {
      return ParseModelConfig(preset.config_json, absl::StrCat("dummy preset ", name));
    }
  }
  return absl::NotFoundError(absl::StrCat("unknown dummy model preset \"", name,
                                          "\"; expected one of ",
                                          absl::StrJoin(DummyPresetNames(), ", ")));
}

std::vector<std::string> DummyPresetNames() {
  std::vector<std::string> names;
  for (const Preset& preset : kPresets) names.push_back(preset.name);
  return names;
}

int64_t ParameterCount(const ModelConfig& config) {
  const int64_t hidden = config.hidden_size;
  const int64_t q_width = config.num_attention_heads * config.head_dim;
  const int64_t kv_width = config.num_key_value_heads * config.head_dim;
  const int64_t embeddings = config.vocab_size * hidden;
  int64_t attention = hidden * (q_width + 2 * kv_width) + q_width * hidden;
  if (config.attention_bias) attention += q_width + 2 * kv_width;
  const int64_t mlp = 3 * hidden * config.intermediate_size;
  const int64_t norms = 2 * hidden;
  return embeddings + config.num_hidden_layers * (attention + mlp + norms) + hidden +
         (config.tie_word_embeddings ? 0 : embeddings);
}

}  // namespace loraserve::formats
