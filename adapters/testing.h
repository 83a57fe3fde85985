// Test-only helpers: write PEFT adapters (adapter_config.json +
// adapter_model.safetensors) into temporary directories, well-formed or
// broken on purpose. Linked by the adapters tests only.
#ifndef LORASERVE_ADAPTERS_TESTING_H_
#define LORASERVE_ADAPTERS_TESTING_H_

#include <cstdint>
#include <string>
#include <vector>

#include "adapters/lora_adapter.h"
#include "nlohmann/json.hpp"

namespace loraserve::adapters::test_support {

// Written as F32 (the shared adapters cover F16 and BF16).
struct TestTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// The shared aidreams-260k model: 4 layers, hidden 64, intermediate 172,
// 4 heads of 16, vocabulary 512.
BaseModelShape SharedModelShape();

// A fresh, empty directory under the gtest temp dir, unique per test and tag.
std::string FreshDir(const std::string& tag);

// A PEFT-style config: peft_type LORA, r, lora_alpha, target_modules.
nlohmann::json LoraConfigJson(int r, double alpha, const std::vector<std::string>& targets);

// lora_A / lora_B tensors (PEFT names, "base_model.model." prefix) for every
// layer of `base` and every module in `targets`, with rank `r` and
// deterministic values derived from `seed`.
std::vector<TestTensor> LoraTensors(const BaseModelShape& base, int r,
                                    const std::vector<std::string>& targets, int seed);

// Writes dir/adapter_config.json and dir/adapter_model.safetensors; returns dir.
std::string WriteAdapter(const std::string& dir, const nlohmann::json& config,
                         const std::vector<TestTensor>& tensors);

// A valid adapter for SharedModelShape(): r, alpha 2r, q_proj and v_proj.
std::string WriteSmallAdapter(const std::string& dir, int r = 4, int seed = 1);

}  // namespace loraserve::adapters::test_support

#endif  // LORASERVE_ADAPTERS_TESTING_H_
