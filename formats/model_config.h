// The architecture of a Llama-family checkpoint, read from its config.json.
//
// Understands model_type llama, mistral and qwen2 (all the same decoder with
// small differences: GQA, q/k/v biases, sliding window ignored) and named
// `--load-format dummy` presets with the shapes of well-known models.
//
// Example:
//   ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig("/models/llama"));
//   int head_dim = config.head_dim;
#ifndef LORASERVE_FORMATS_MODEL_CONFIG_H_
#define LORASERVE_FORMATS_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace loraserve::formats {

enum class RopeScalingType { kNone, kLlama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::kNone;
  // llama3 parameters (Hugging Face `_compute_llama3_parameters`).
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string model_type;  // "llama", "mistral" or "qwen2"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // defaults to num_attention_heads
  int64_t head_dim = 0;             // defaults to hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (true for qwen2)
  int64_t max_position_embeddings = 2048;
  int64_t bos_token_id = -1;           // -1 when absent
  std::vector<int64_t> eos_token_ids;  // int or list in config.json
  std::string torch_dtype;             // the checkpoint's dtype (--dtype auto keeps it)
};

// Parses config.json text; `source` names the file in error messages.
// Every missing required field or impossible value (heads not dividing hidden
// size, kv heads not dividing heads, unknown model_type, unknown rope_scaling
// type...) is an InvalidArgument naming the field and what was expected.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);

// Reads and parses `<model_dir>/config.json`; generation_config.json, when
// present, supplies eos_token_id/bos_token_id that config.json lacks.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// Shapes of well-known models for `--load-format dummy`: at least "tiny",
// "tinyllama-1.1b", "llama-3-8b", "llama-2-7b", "qwen2-7b", "mistral-7b".
// Unknown names are NotFound listing the known ones.
absl::StatusOr<ModelConfig> DummyPreset(absl::string_view name);
std::vector<std::string> DummyPresetNames();

// Parameter count of the model described by `config` (embeddings included,
// lm_head counted once when tied).
int64_t ParameterCount(const ModelConfig& config);

}  // namespace loraserve::formats

#endif  // LORASERVE_FORMATS_MODEL_CONFIG_H_
