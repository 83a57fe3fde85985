#include "adapters/testing.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "formats/safetensors.h"
#include "gtest/gtest.h"

namespace loraserve::adapters::test_support {

BaseModelShape SharedModelShape() {
  return LlamaBaseShape(/*num_layers=*/4, /*hidden_size=*/64, /*intermediate_size=*/172,
                        /*num_heads=*/4, /*num_kv_heads=*/4, /*head_dim=*/16,
                        /*vocab_size=*/512);
}

std::string FreshDir(const std::string& tag) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string dir = ::testing::TempDir() + "adapters_" + info->test_suite_name() + "_" +
                          info->name() + "_" + tag;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

nlohmann::json LoraConfigJson(int r, double alpha, const std::vector<std::string>& targets) {
  return {{"peft_type", "LORA"},    {"r", r},         {"lora_alpha", alpha},
          {"target_modules", targets}, {"bias", "none"}, {"task_type", "CAUSAL_LM"}};
}

std::vector<TestTensor> LoraTensors(const BaseModelShape& base, int r,
                                    const std::vector<std::string>& targets, int seed) {
  std::vector<TestTensor> tensors;
  for (int64_t layer = 0; layer < base.num_layers; ++layer) {
    for (LoraModule module : kAllLoraModules) {
      const std::string leaf = LoraModuleName(module);
      if (std::find(targets.begin(), targets.end(), leaf) == targets.end()) continue;
      const auto [in, out] = base.modules.at(leaf);
      const std::string prefix = "base_model.model." + LoraModulePath(layer, module);
      for (const auto& [suffix, shape] :
           {std::pair<std::string, std::vector<int64_t>>{".lora_A.weight", {r, in}},
            {".lora_B.weight", {out, r}}}) {
        TestTensor tensor{prefix + suffix, shape, {}};
        tensor.values.resize(shape[0] * shape[1]);
        for (size_t i = 0; i < tensor.values.size(); ++i) {
          tensor.values[i] = static_cast<float>((i * 31 + layer * 7 + seed * 13) % 17) / 16 - 0.5f;
        }
        tensors.push_back(std::move(tensor));
      }
    }
  }
  return tensors;
}

std::string WriteAdapter(const std::string& dir, const nlohmann::json& config,
                         const std::vector<TestTensor>& tensors) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << config.dump(2);
  std::vector<formats::SerializedTensor> serialized;
  for (const TestTensor& tensor : tensors) {
    serialized.push_back({tensor.name, "F32", tensor.shape,
                          std::string(reinterpret_cast<const char*>(tensor.values.data()),
                                      tensor.values.size() * sizeof(float))});
  }
  const absl::Status written =
      formats::WriteSafetensors(dir + "/adapter_model.safetensors", serialized, {{"format", "pt"}});
  EXPECT_TRUE(written.ok()) << written;
  return dir;
}

std::string WriteSmallAdapter(const std::string& dir, int r, int seed) {
  const std::vector<std::string> targets = {"q_proj", "v_proj"};
  return WriteAdapter(dir, LoraConfigJson(r, 2.0 * r, targets),
                      LoraTensors(SharedModelShape(), r, targets, seed));
}

}  // namespace loraserve::adapters::test_support
