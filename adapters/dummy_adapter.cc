#include "adapters/dummy_adapter.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "formats/safetensors.h"
#include "nlohmann/json.hpp"

namespace loraserve::adapters {
namespace {

// Uniform values with standard deviation `stddev`, as raw F32 bytes.
std::string RandomF32(int64_t count, float stddev, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> dist(-stddev * std::sqrt(3.0f), stddev * std::sqrt(3.0f));
  std::string bytes(static_cast<size_t>(count) * sizeof(float), '\0');
  auto* values = reinterpret_cast<float*>(bytes.data());
  for (int64_t i = 0; i < count; ++i) values[i] = dist(rng);
  return bytes;
}

}  // namespace

absl::Status WriteDummyAdapter(const std::string& dir, const BaseModelShape& base,
                               const DummyAdapterOptions& options) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", error.message()));
  std::mt19937_64 rng(options.seed);
  std::vector<formats::SerializedTensor> tensors;
  for (int64_t layer = 0; layer < base.num_layers; ++layer) {
    for (LoraModule module : kAllLoraModules) {
      const std::string name = LoraModuleName(module);
      if (std::find(options.target_modules.begin(), options.target_modules.end(), name) ==
          options.target_modules.end()) {
        continue;
      }
      auto dims = base.modules.find(name);
      if (dims == base.modules.end()) {
        return absl::InvalidArgumentError(absl::StrCat("dummy adapter: base has no ", name));
      }
      const auto [in, out] = dims->second;
      // Small enough that stacked layers stay finite, large enough to matter.
      const std::string path = absl::StrCat("base_model.model.", LoraModulePath(layer, module));
      tensors.push_back({path + ".lora_A.weight", "F32", {options.rank, in},
                         RandomF32(options.rank * in, 1.0f / std::sqrt(float(in)), rng)});
      tensors.push_back({path + ".lora_B.weight", "F32", {out, options.rank},
                         RandomF32(out * options.rank, 0.01f, rng)});
    }
  }
  const nlohmann::json config = {{"peft_type", "LORA"},
                                 {"task_type", "CAUSAL_LM"},
                                 {"r", options.rank},
                                 {"lora_alpha", options.alpha},
                                 {"target_modules", options.target_modules},
                                 {"bias", "none"},
                                 {"base_model_name_or_path", "dummy"}};
  std::ofstream(dir + "/adapter_config.json") << config.dump(2);
  return formats::WriteSafetensors(dir + "/adapter_model.safetensors", tensors);
}

}  // namespace loraserve::adapters
