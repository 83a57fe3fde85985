#include "formats/peft_config.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace loraserve::formats {

// pcre2_code is read-only after compilation, so one PeftPattern may be matched
// from many threads; each match gets its own match data.
class PeftPattern {
 public:
  // `what` names the pattern in the error (file and field).
  static absl::StatusOr<std::shared_ptr<const PeftPattern>> Compile(const std::string& pattern,
                                                                    const std::string& what) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     0, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": \"", pattern, "\" is not a valid regular expression: ",
                       reinterpret_cast<const char*>(message), " at offset ", offset));
    }
    return std::shared_ptr<const PeftPattern>(new PeftPattern(code));
  }

  ~PeftPattern() { pcre2_code_free(code_); }
  PeftPattern(const PeftPattern&) = delete;
  PeftPattern& operator=(const PeftPattern&) = delete;

  // Python's re.match (anchored at the start) or, with `full`, re.fullmatch.
  // Returns capture group `group` of the match (group 0: the whole match), or
  // nullopt when the pattern does not match or the group did not take part.
  std::optional<std::string> Match(absl::string_view text, bool full, int group = 0) const {
    pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
    const uint32_t options = PCRE2_ANCHORED | (full ? PCRE2_ENDANCHORED : 0);
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0,
                               options, data, nullptr);
    std::optional<std::string> result;
    if (rc > group) {
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
      if (ovector[2 * group] != PCRE2_UNSET) {
        result = std::string(
            text.substr(ovector[2 * group], ovector[2 * group + 1] - ovector[2 * group]));
      }
    }
    pcre2_match_data_free(data);
    return result;
  }

 private:
  explicit PeftPattern(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

namespace {

using Json = nlohmann::ordered_json;  // rank_pattern / alpha_pattern: file order matters

// PEFT's Llama defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
// and the linear layers "all-linear" stands for in a Llama (lm_head excluded).
const std::vector<std::string> kDefaultTargets = {"q_proj", "v_proj"};
const std::vector<std::string> kAllLinearTargets = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"};

// Fields that select a LoRA variant with a different forward pass (or one that
// changes the base model); refused when set to anything but a null, false or
// empty value.
const char* const kUnsupportedVariants[] = {"lora_bias",
                                            "use_bdlora",
                                            "use_qalora",
                                            "kasa_config",
                                            "monteclora_config",
                                            "arrow_config",
                                            "alora_invocation_tokens",
                                            "layer_replication",
                                            "trainable_token_indices",
                                            "target_parameters"};

class FieldReader {
 public:
  FieldReader(const Json& json, const std::string& path) : json_(json), path_(path) {}

  // nullptr when the field is absent or null.
  const Json* Find(const char* field) const {
    auto it = json_.find(field);
    if (it == json_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  // "PATH: field "FIELD"", the prefix of every message about that field.
  std::string Where(const char* field) const {
    return absl::StrCat(path_, ": field \"", field, "\"");
  }
  absl::Status Error(const char* field, absl::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat(Where(field), ": ", message));
  }
  absl::Status TypeError(const char* field, const char* expected, const Json& got) const {
    return Error(field, absl::StrCat("expected ", expected, ", got ", got.dump()));
  }

  absl::StatusOr<std::optional<std::string>> String(const char* field) const {
    const Json* value = Find(field);
    if (value == nullptr) return std::optional<std::string>();
    if (!value->is_string()) return TypeError(field, "a string", *value);
    return std::optional<std::string>(value->get<std::string>());
  }
  absl::StatusOr<bool> Bool(const char* field, bool fallback) const {
    const Json* value = Find(field);
    if (value == nullptr) return fallback;
    if (!value->is_boolean()) return TypeError(field, "true or false", *value);
    return value->get<bool>();
  }
  absl::StatusOr<double> Number(const char* field, double fallback) const {
    const Json* value = Find(field);
    if (value == nullptr) return fallback;
    if (!value->is_number() || !std::isfinite(value->get<double>())) {
      return TypeError(field, "a finite number", *value);
    }
    return value->get<double>();
  }
  absl::StatusOr<int> PositiveInt(const char* field, int fallback) const {
    const Json* value = Find(field);
    if (value == nullptr) return fallback;
    if (!value->is_number_integer() || value->get<int64_t>() < 1 ||
        value->get<int64_t>() > (int64_t{1} << 30)) {
      return TypeError(field, "a positive integer", *value);
    }
    return value->get<int>();
  }
  // A string or a list of strings (PEFT accepts both for several fields);
  // `is_single` says which it was.
  absl::StatusOr<std::vector<std::string>> Strings(const char* field, bool* is_single) const {
    const Json* value = Find(field);
    *is_single = false;
    if (value == nullptr) return std::vector<std::string>();
    if (value->is_string()) {
      *is_single = true;
      return std::vector<std::string>{value->get<std::string>()};
    }
    if (!value->is_array()) return TypeError(field, "a string or a list of strings", *value);
    std::vector<std::string> out;
    for (const Json& item : *value) {
      if (!item.is_string()) return TypeError(field, "a string or a list of strings", *value);
      out.push_back(item.get<std::string>());
    }
    return out;
  }

 private:
  const Json& json_;
  const std::string& path_;
};

bool IsSet(const Json& value) {
  if (value.is_null()) return false;
  if (value.is_boolean()) return value.get<bool>();
  if (value.is_array() || value.is_object() || value.is_string()) return !value.empty();
  if (value.is_number()) return value.get<double>() != 0;
  return true;
}

// "(.*\.)?(KEY)$" for each key of a rank_pattern / alpha_pattern object, as in
// PEFT's get_pattern_key; `parse_value` checks and converts the value.
template <typename T, typename ParseValue>
absl::StatusOr<std::vector<std::pair<std::shared_ptr<const PeftPattern>, T>>> KeyPatterns(
    const FieldReader& reader, const char* field, const char* expected, ParseValue parse_value) {
  std::vector<std::pair<std::shared_ptr<const PeftPattern>, T>> out;
  const Json* object = reader.Find(field);
  if (object == nullptr) return out;
  if (!object->is_object()) return reader.TypeError(field, "an object", *object);
  for (const auto& [key, value] : object->items()) {
    std::optional<T> parsed = parse_value(value);
    if (!parsed.has_value()) {
      return reader.Error(
          field, absl::StrCat("key \"", key, "\": expected ", expected, ", got ", value.dump()));
    }
    ASSIGN_OR_RETURN(auto pattern,
                     PeftPattern::Compile(absl::StrCat("(.*\\.)?(", key, ")$"),
                                          absl::StrCat(reader.Where(field), " key \"", key, "\"")));
    out.emplace_back(std::move(pattern), *parsed);
  }
  return out;
}

}  // namespace

absl::StatusOr<PeftLoraConfig> PeftLoraConfig::Parse(absl::string_view json_text,
                                                     const std::string& path) {
  RETURN_IF_ERROR(CheckJsonDepth(json_text, path));
  const Json json = Json::parse(json_text.begin(), json_text.end(), nullptr,
                                /*allow_exceptions=*/false);
  if (json.is_discarded() || !json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  const FieldReader reader(json, path);
  PeftLoraConfig config;
  config.path_ = path;

  ASSIGN_OR_RETURN(std::optional<std::string> peft_type, reader.String("peft_type"));
  if (peft_type != "LORA") {
    return reader.Error("peft_type", absl::StrCat("expected \"LORA\", got ",
                                                  peft_type ? "\"" + *peft_type + "\"" : "none"));
  }
  ASSIGN_OR_RETURN(config.use_dora_, reader.Bool("use_dora", false));
  ASSIGN_OR_RETURN(bool fan_in_fan_out, reader.Bool("fan_in_fan_out", false));
  if (fan_in_fan_out) {
    return reader.Error("fan_in_fan_out",
                        "true is for Conv1D (GPT-2 style) weights; Llama linear layers need false");
  }
  ASSIGN_OR_RETURN(std::optional<std::string> bias, reader.String("bias"));
  if (bias.has_value() && *bias != "none") {
    return reader.Error("bias", absl::StrCat("only \"none\" is supported, got \"", *bias, "\""));
  }
  if (const Json* modules_to_save = reader.Find("modules_to_save");
      modules_to_save != nullptr && !modules_to_save->is_null()) {
    // PEFT takes a list only (a string would be iterated character by character).
    bool single = false;
    ASSIGN_OR_RETURN(config.modules_to_save_, reader.Strings("modules_to_save", &single));
    if (single) return reader.Error("modules_to_save", "expected a list of module names");
  }
  for (const char* field : kUnsupportedVariants) {
    if (const Json* value = reader.Find(field); value != nullptr && IsSet(*value)) {
      return reader.Error(field,
                          absl::StrCat("this LoRA variant is not supported, got ", value->dump()));
    }
  }

  ASSIGN_OR_RETURN(config.r_, reader.PositiveInt("r", config.r_));
  ASSIGN_OR_RETURN(config.lora_alpha_, reader.Number("lora_alpha", config.lora_alpha_));
  ASSIGN_OR_RETURN(config.use_rslora_, reader.Bool("use_rslora", false));
  ASSIGN_OR_RETURN(std::optional<std::string> base, reader.String("base_model_name_or_path"));
  config.base_model_name_or_path_ = base.value_or("");

  bool target_is_regex = false;
  ASSIGN_OR_RETURN(std::vector<std::string> targets,
                   reader.Strings("target_modules", &target_is_regex));
  if (reader.Find("target_modules") == nullptr) {
    config.target_names_ = kDefaultTargets;
  } else if (target_is_regex && absl::AsciiStrToLower(targets[0]) == "all-linear") {
    config.target_names_ = kAllLinearTargets;
  } else if (target_is_regex) {
    ASSIGN_OR_RETURN(config.target_regex_,
                     PeftPattern::Compile(targets[0], reader.Where("target_modules")));
  } else {
    config.target_names_ = std::move(targets);
  }

  bool exclude_is_regex = false;
  ASSIGN_OR_RETURN(std::vector<std::string> excludes,
                   reader.Strings("exclude_modules", &exclude_is_regex));
  if (exclude_is_regex) {
    ASSIGN_OR_RETURN(config.exclude_regex_,
                     PeftPattern::Compile(excludes[0], reader.Where("exclude_modules")));
  } else {
    config.exclude_names_ = std::move(excludes);
  }

  if (const Json* layers = reader.Find("layers_to_transform"); layers != nullptr) {
    if (target_is_regex) {
      return reader.Error("layers_to_transform",
                          "cannot be used when target_modules is a string (as in PEFT)");
    }
    const char* expected = "an integer or a list of integers";
    if (layers->is_number_integer()) {
      config.layers_to_transform_.push_back(layers->get<int64_t>());
    } else if (layers->is_array()) {
      for (const Json& item : *layers) {
        if (!item.is_number_integer())
          return reader.TypeError("layers_to_transform", expected, *layers);
        config.layers_to_transform_.push_back(item.get<int64_t>());
      }
    } else {
      return reader.TypeError("layers_to_transform", expected, *layers);
    }
  }
  bool single_layer_pattern = false;
  ASSIGN_OR_RETURN(std::vector<std::string> layer_patterns,
                   reader.Strings("layers_pattern", &single_layer_pattern));
  if (!layer_patterns.empty() && reader.Find("layers_to_transform") == nullptr) {
    return reader.Error("layers_pattern", "needs layers_to_transform as well (as in PEFT)");
  }
  if (!layer_patterns.empty() && target_is_regex) {
    return reader.Error("layers_pattern",
                        "cannot be used when target_modules is a string (as in PEFT)");
  }
  for (const std::string& pattern : layer_patterns) {
    if (pattern.empty()) continue;  // PEFT: an empty pattern means "any layer pattern"
    ASSIGN_OR_RETURN(Pattern compiled,
                     PeftPattern::Compile(absl::StrCat("(?:^|.*?\\.)", pattern, "\\.(\\d+)\\."),
                                          reader.Where("layers_pattern")));
    config.layer_patterns_.push_back(std::move(compiled));
  }
  // The lazy ".*?" takes the first numbered segment (the layer), not a later
  // one (an expert index, say).
  ASSIGN_OR_RETURN(config.default_layer_pattern_,
                   PeftPattern::Compile(".*?\\.[^.]*\\.(\\d+)\\.", "default layer pattern"));

  ASSIGN_OR_RETURN(config.rank_pattern_,
                   KeyPatterns<int>(reader, "rank_pattern", "a positive integer",
                                    [](const Json& value) -> std::optional<int> {
                                      if (!value.is_number_integer() || value.get<int64_t>() < 1 ||
                                          value.get<int64_t>() > (int64_t{1} << 30)) {
                                        return std::nullopt;
                                      }
                                      return value.get<int>();
                                    }));
  ASSIGN_OR_RETURN(
      config.alpha_pattern_,
      KeyPatterns<double>(reader, "alpha_pattern", "a finite number",
                          [](const Json& value) -> std::optional<double> {
                            if (!value.is_number() || !std::isfinite(value.get<double>())) {
                              return std::nullopt;
                            }
                            return value.get<double>();
                          }));

  return config;
}

bool PeftLoraConfig::SavesModule(absl::string_view module_name) const {
  return std::any_of(modules_to_save_.begin(), modules_to_save_.end(),
                     [module_name](const std::string& name) {
                       return absl::EndsWith(module_name, name);
                     });
}

std::optional<int64_t> PeftLoraConfig::LayerIndex(absl::string_view module_name) const {
  std::optional<std::string> digits;
  if (layer_patterns_.empty()) {
    digits = default_layer_pattern_->Match(module_name, /*full=*/false, 1);
  } else {
    for (const Pattern& pattern : layer_patterns_) {
      digits = pattern->Match(module_name, /*full=*/false, 1);
      if (digits.has_value()) break;
    }
  }
  int64_t index = 0;
  if (!digits.has_value() || !absl::SimpleAtoi(*digits, &index)) return std::nullopt;
  return index;
}

bool PeftLoraConfig::TargetsModule(absl::string_view module_name) const {
  const auto names_match = [module_name](const std::vector<std::string>& names) {
    return std::any_of(names.begin(), names.end(), [module_name](const std::string& name) {
      return module_name == name || absl::EndsWith(module_name, absl::StrCat(".", name));
    });
  };
  if (exclude_regex_ ? exclude_regex_->Match(module_name, /*full=*/true).has_value()
                     : names_match(exclude_names_)) {
    return false;
  }
  if (target_regex_) return target_regex_->Match(module_name, /*full=*/true).has_value();
  if (std::find(target_names_.begin(), target_names_.end(), module_name) != target_names_.end()) {
    return true;
  }
  if (!names_match(target_names_)) return false;
  if (layers_to_transform_.empty()) return true;
  const std::optional<int64_t> layer = LayerIndex(module_name);
  return layer.has_value() && std::find(layers_to_transform_.begin(), layers_to_transform_.end(),
                                        *layer) != layers_to_transform_.end();
}

int PeftLoraConfig::RankFor(absl::string_view module_name) const {
  for (const auto& [pattern, rank] : rank_pattern_) {
    if (pattern->Match(module_name, /*full=*/false).has_value()) return rank;
  }
  return r_;
}

double PeftLoraConfig::AlphaFor(absl::string_view module_name) const {
  for (const auto& [pattern, alpha] : alpha_pattern_) {
    if (pattern->Match(module_name, /*full=*/false).has_value()) return alpha;
  }
  return lora_alpha_;
}

double PeftLoraConfig::ScaleFor(absl::string_view module_name) const {
  const double rank = RankFor(module_name);
  return AlphaFor(module_name) / (use_rslora_ ? std::sqrt(rank) : rank);
}

}  // namespace loraserve::formats
