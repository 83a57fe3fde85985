// ParseModelConfig on arbitrary text and, when the input has a second part
// after a NUL, LoadModelConfig of a directory with that part as
// generation_config.json. An accepted config must describe a buildable model.
#include <cstdint>
#include <string>

#include "formats/model_config.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

void CheckConfig(const loraserve::formats::ModelConfig& config) {
  FUZZ_CHECK(config.vocab_size > 0 && config.hidden_size > 0 && config.intermediate_size > 0);
  FUZZ_CHECK(config.num_hidden_layers > 0 && config.num_attention_heads > 0);
  FUZZ_CHECK(config.num_key_value_heads > 0 && config.head_dim > 0);
  FUZZ_CHECK(config.num_attention_heads % config.num_key_value_heads == 0);
  FUZZ_CHECK(config.max_position_embeddings > 0);
  FUZZ_CHECK(loraserve::formats::ParameterCount(config) > 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve;
  const std::vector<absl::string_view> parts =
      fuzz::SplitInput(fuzz::AsText(data, size), absl::string_view("\0", 1), 2);
  absl::StatusOr<formats::ModelConfig> config = formats::ParseModelConfig(parts[0], "config.json");
  if (config.ok()) CheckConfig(*config);
  if (parts.size() == 2) {
    const std::string& dir = fuzz::FreshScratchDir();
    fuzz::WriteFileOrDie(dir + "/config.json", parts[0]);
    fuzz::WriteFileOrDie(dir + "/generation_config.json", parts[1]);
    absl::StatusOr<formats::ModelConfig> loaded = formats::LoadModelConfig(dir);
    if (loaded.ok()) CheckConfig(*loaded);
  }
  return 0;
}
