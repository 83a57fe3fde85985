// PeftLoraConfig::Parse on arbitrary text (the part before the first NUL);
// an accepted config then answers for a Llama's module names and for each
// further NUL-separated part of the input taken as a module name.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "formats/peft_config.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

std::vector<std::string> LlamaModules() {
  std::vector<std::string> names = {"lm_head", "model.embed_tokens", "model.norm"};
  for (int layer : {0, 1, 3, 10, 31}) {
    for (const char* module :
         {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
      names.push_back(absl::StrCat("model.layers.", layer, ".", module));
    }
  }
  return names;
}

void CheckModule(const loraserve::formats::PeftLoraConfig& config, absl::string_view name) {
  const bool targeted = config.TargetsModule(name);
  const int rank = config.RankFor(name);
  FUZZ_CHECK(rank >= 1);
  FUZZ_CHECK(std::isfinite(config.AlphaFor(name)));
  FUZZ_CHECK(std::isfinite(config.ScaleFor(name)));
  FUZZ_CHECK(targeted == config.TargetsModule(name));  // no hidden state
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using loraserve::formats::PeftLoraConfig;
  static const std::vector<std::string> kModules = LlamaModules();
  const std::vector<absl::string_view> parts = loraserve::fuzz::SplitInput(
      loraserve::fuzz::AsText(data, size), absl::string_view("\0", 1), 8);
  absl::StatusOr<loraserve::formats::PeftLoraConfig> config =
      loraserve::formats::PeftLoraConfig::Parse(parts[0], "adapter_config.json");
  if (!config.ok()) return 0;
  FUZZ_CHECK(config->r() >= 1);
  for (const std::string& name : kModules) CheckModule(*config, name);
  for (size_t i = 1; i < parts.size(); ++i) CheckModule(*config, parts[i]);
  return 0;
}
