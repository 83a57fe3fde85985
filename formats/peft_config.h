// adapter_config.json of a PEFT LoRA adapter: parsing, refusal of what we do
// not serve, and PEFT's rules for which module gets which rank and alpha.
//
// A PeftLoraConfig answers questions about modules by their name in the base
// model ("model.layers.3.self_attn.q_proj"), with the semantics of PEFT 0.21
// (peft/tuners/tuners_utils.py `check_target_module_exists`,
// peft/utils/other.py `get_pattern_key`):
//  - target_modules as a list: a module is targeted when its name equals an
//    entry or ends with "." + entry; then, when layers_to_transform is set,
//    only if its layer index is listed. The index is the first number after a
//    `layers_pattern` segment ("(?:^|.*?\.)PATTERN\.(\d+)\."), or with no
//    layers_pattern the first number segment after any segment
//    (".*?\.[^.]*\.(\d+)\."). An exact name match ignores layers_to_transform,
//    as in PEFT.
//  - target_modules as a string: a regex that must match the whole name
//    (re.fullmatch); "all-linear" means every linear projection.
//  - exclude_modules (list or regex) removes modules before anything else.
//  - rank_pattern / alpha_pattern: the first key, in file order, for which
//    "(.*\.)?(KEY)$" matches the name from its start gives the module's rank /
//    alpha; otherwise r / lora_alpha.
//  - scale = alpha / r, or alpha / sqrt(r) with use_rslora.
// Patterns are compiled with PCRE2, whose syntax is a superset of what PEFT
// configs use from Python's `re`.
//
//  - modules_to_save: a module is saved (the adapter carries its own copy)
//    when its name ends with an entry, as a plain string suffix: PEFT's
//    `_set_trainable`, so "norm" saves model.norm and every layer's
//    input_layernorm and post_attention_layernorm.
//  - use_dora: DoRA's magnitude vectors come with every adapted module.
// Whether a targeted or saved module can be served (embed_tokens and lm_head
// can; a saved projection cannot) is for the adapter loader to say.
//
// Refused, each by its field name: peft_type other than LORA,
// fan_in_fan_out, bias other than "none", and the LoRA variants that change the forward
// pass (lora_bias, use_bdlora, use_qalora, kasa/monteclora/arrow configs,
// alora_invocation_tokens, layer_replication, trainable_token_indices,
// target_parameters). Keys we do not know are ignored: PEFT writes many that
// only matter for training. Missing r / lora_alpha take PEFT's defaults (8, 8);
// a missing target_modules takes PEFT's Llama default (q_proj, v_proj).
//
// Objects are immutable after Parse and may be shared across threads.
//
// Example:
//   ASSIGN_OR_RETURN(PeftLoraConfig config,
//                    PeftLoraConfig::Parse(text, dir + "/adapter_config.json"));
//   if (config.TargetsModule("model.layers.0.self_attn.q_proj")) {
//     int rank = config.RankFor("model.layers.0.self_attn.q_proj");
//   }
#ifndef LORASERVE_FORMATS_PEFT_CONFIG_H_
#define LORASERVE_FORMATS_PEFT_CONFIG_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace loraserve::formats {

// A compiled pattern; defined in peft_config.cc.
class PeftPattern;

class PeftLoraConfig {
 public:
  // Parses `json_text`, the contents of adapter_config.json; `path` only
  // names the file in error messages.
  static absl::StatusOr<PeftLoraConfig> Parse(absl::string_view json_text, const std::string& path);

  // Whether PEFT would put a LoRA layer on the base module `module_name`.
  bool TargetsModule(absl::string_view module_name) const;
  int RankFor(absl::string_view module_name) const;
  double AlphaFor(absl::string_view module_name) const;
  // The factor applied to B·A for that module.
  double ScaleFor(absl::string_view module_name) const;

  const std::string& path() const { return path_; }
  int r() const { return r_; }
  double lora_alpha() const { return lora_alpha_; }
  bool use_rslora() const { return use_rslora_; }
  bool use_dora() const { return use_dora_; }
  // Whether `module_name` is one of the modules_to_save.
  bool SavesModule(absl::string_view module_name) const;
  const std::vector<std::string>& modules_to_save() const { return modules_to_save_; }
  // Informative only: which model the adapter was trained on ("" if absent).
  const std::string& base_model_name_or_path() const { return base_model_name_or_path_; }

 private:
  using Pattern = std::shared_ptr<const PeftPattern>;

  PeftLoraConfig() = default;
  std::optional<int64_t> LayerIndex(absl::string_view module_name) const;

  std::string path_;
  std::string base_model_name_or_path_;
  int r_ = 8;
  double lora_alpha_ = 8;
  bool use_rslora_ = false;
  bool use_dora_ = false;
  std::vector<std::string> modules_to_save_;
  // Exactly one of the two is used: the list form or the regex form.
  std::vector<std::string> target_names_;
  Pattern target_regex_;
  std::vector<std::string> exclude_names_;
  Pattern exclude_regex_;
  // Empty: every layer.
  std::vector<int64_t> layers_to_transform_;
  // Empty: PEFT's default layer-index pattern (in default_layer_pattern_).
  std::vector<Pattern> layer_patterns_;
  Pattern default_layer_pattern_;
  // (compiled "(.*\.)?(KEY)$", value), in file order.
  std::vector<std::pair<Pattern, int>> rank_pattern_;
  std::vector<std::pair<Pattern, double>> alpha_pattern_;
};

}  // namespace loraserve::formats

#endif  // LORASERVE_FORMATS_PEFT_CONFIG_H_
