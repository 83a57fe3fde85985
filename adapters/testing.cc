#include "adapters/testing.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"

namespace loraserve::adapters::testing {

BaseModelShape SharedModelShape() {
  return LlamaBaseShape(/*num_layers=*/4, /*hidden_size=*/64, /*intermediate_size=*/172,
                        /*num_heads=*/4, /*num_kv_heads=*/4, /*head_dim=*/16);
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
        TestTensor tensor{prefix + suffix, "F32", shape, {}};
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

void WriteSafetensors(const std::string& path, const std::vector<TestTensor>& tensors) {
  nlohmann::json header = {{"__metadata__", {{"format", "pt"}}}};
  std::string data;
  for (const TestTensor& tensor : tensors) {
    const size_t begin = data.size();
    for (float value : tensor.values) {
      uint32_t bits;
      std::memcpy(&bits, &value, sizeof(bits));
      if (tensor.dtype == "BF16") {
        const uint16_t top = static_cast<uint16_t>(bits >> 16);
        data.append(reinterpret_cast<const char*>(&top), sizeof(top));
      } else {
        data.append(reinterpret_cast<const char*>(&bits), sizeof(bits));
      }
    }
    header[tensor.name] = {{"dtype", tensor.dtype},
                           {"shape", tensor.shape},
                           {"data_offsets", {begin, data.size()}}};
  }
  const std::string header_text = header.dump();
  const uint64_t header_size = header_text.size();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(&header_size), sizeof(header_size));
  out << header_text << data;
  ASSERT_TRUE(out.good()) << path;
}

std::string WriteAdapter(const std::string& dir, const nlohmann::json& config,
                         const std::vector<TestTensor>& tensors) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/adapter_config.json") << config.dump(2);
  WriteSafetensors(dir + "/adapter_model.safetensors", tensors);
  return dir;
}

std::string WriteSmallAdapter(const std::string& dir, int r, int seed) {
  const std::vector<std::string> targets = {"q_proj", "v_proj"};
  return WriteAdapter(dir, LoraConfigJson(r, 2.0 * r, targets),
                      LoraTensors(SharedModelShape(), r, targets, seed));
}

}  // namespace loraserve::adapters::testing
