#include "adapters/lora_adapter.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/testing.h"
#include "formats/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/status_matchers.h"

namespace loraserve::adapters {
namespace {

namespace fs = std::filesystem;
using test_support::FreshDir;
using test_support::LoraConfigJson;
using test_support::LoraTensors;
using test_support::SharedModelShape;
using test_support::TestTensor;
using test_support::WriteAdapter;
using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::vector<std::string> kQv = {"q_proj", "v_proj"};
const std::vector<std::string> kAll = {"q_proj",    "k_proj",  "v_proj",  "o_proj",
                                       "gate_proj", "up_proj", "down_proj"};

std::string SharedAdapter(const std::string& name) {
  return std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/" + name;
}

absl::StatusOr<LoraAdapter> Load(const std::string& dir, int max_rank = 64) {
  return LoadLoraAdapter(dir, SharedModelShape(), AdapterLimits{max_rank});
}

struct SharedCase {
  std::string name;
  std::vector<std::string> targets;
  int rank;
  float scale;
};

TEST(LoraAdapterTest, SharedAdaptersLoadWithTheirRanksAndScales) {
  const std::vector<SharedCase> cases = {
      {"ocean", kAll, 8, 2.0f},
      {"robot", kAll, 8, 2.0f},
      {"qv-r4", kQv, 4, 2.0f},
      {"attn-r8", {"q_proj", "k_proj", "v_proj", "o_proj"}, 8, 2.0f},
      {"mlp-r16-rslora", {"gate_proj", "up_proj", "down_proj"}, 16, 4.0f},  // 16 / sqrt(16)
      {"all-r8-bf16", kAll, 8, 4.0f},                                       // 32 / 8
  };
  const BaseModelShape base = SharedModelShape();
  std::set<std::string> hashes;
  for (const SharedCase& c : cases) {
    SCOPED_TRACE(c.name);
    absl::StatusOr<LoraAdapter> adapter = Load(SharedAdapter(c.name));
    ASSERT_OK(adapter);
    EXPECT_EQ(adapter->num_layers(), 4);
    EXPECT_EQ(adapter->target_modules(), c.targets);
    EXPECT_THAT(adapter->ranks(), ElementsAre(c.rank));
    EXPECT_EQ(adapter->config().base_model_name_or_path(), "aidreams-260k");
    size_t bytes = 0;
    for (int64_t layer = 0; layer < 4; ++layer) {
      for (LoraModule module : kAllLoraModules) {
        const LoraWeights& w = adapter->weights(layer, module);
        const bool targeted = std::find(c.targets.begin(), c.targets.end(),
                                        LoraModuleName(module)) != c.targets.end();
        ASSERT_EQ(w.empty(), !targeted) << LoraModulePath(layer, module);
        if (!targeted) continue;
        const auto [in, out] = base.modules.at(LoraModuleName(module));
        EXPECT_EQ(w.rank, c.rank);
        EXPECT_FLOAT_EQ(w.scale, c.scale);
        EXPECT_EQ(w.in_features, in);
        EXPECT_EQ(w.out_features, out);
        ASSERT_EQ(w.a.size(), static_cast<size_t>(c.rank * in));
        ASSERT_EQ(w.b.size(), static_cast<size_t>(out * c.rank));
        bytes += (w.a.size() + w.b.size()) * sizeof(float);
      }
    }
    EXPECT_EQ(adapter->bytes(), bytes);
    EXPECT_EQ(adapter->content_hash().size(), 64u);
    hashes.insert(adapter->content_hash());
  }
  EXPECT_EQ(hashes.size(), cases.size()) << "content hashes must differ";
}

// Read as metadata, an adapter has the same layers, ranks, scales, shapes
// and bytes, no weights and no content hash.
TEST(LoraAdapterTest, MetadataReadsTheShapesWithoutTheWeights) {
  for (const char* name : {"ocean", "qv-r4", "mlp-r16-rslora", "all-r8-bf16"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<LoraAdapter> full = Load(SharedAdapter(name));
    absl::StatusOr<LoraAdapter> meta = LoadLoraAdapter(SharedAdapter(name), SharedModelShape(),
                                                       AdapterLimits{64}, AdapterRead::kMetadata);
    ASSERT_OK(full);
    ASSERT_OK(meta);
    EXPECT_EQ(meta->ranks(), full->ranks());
    EXPECT_EQ(meta->target_modules(), full->target_modules());
    EXPECT_EQ(meta->bytes(), full->bytes());
    EXPECT_EQ(meta->content_hash(), "");
    for (int64_t layer = 0; layer < full->num_layers(); ++layer) {
      for (LoraModule module : kAllLoraModules) {
        const LoraWeights& f = full->weights(layer, module);
        const LoraWeights& m = meta->weights(layer, module);
        EXPECT_EQ(m.rank, f.rank);
        EXPECT_EQ(m.scale, f.scale);
        EXPECT_EQ(m.in_features, f.in_features);
        EXPECT_EQ(m.out_features, f.out_features);
        EXPECT_TRUE(m.a.empty() && m.b.empty());
      }
    }
  }
}

TEST(LoraAdapterTest, WeightsAreTheFileValuesInFloat32) {
  for (const std::string name : {"attn-r8", "all-r8-bf16"}) {
    SCOPED_TRACE(name);
    absl::StatusOr<LoraAdapter> adapter = Load(SharedAdapter(name));
    ASSERT_OK(adapter);
    auto file = formats::SafetensorsFile::Open(SharedAdapter(name) + "/adapter_model.safetensors");
    ASSERT_OK(file);
    for (const auto& [suffix, is_a] : {std::pair<std::string, bool>{"lora_A", true}, {"lora_B", false}}) {
      const formats::TensorInfo* tensor =
          (*file)->Find("base_model.model.model.layers.2.self_attn.k_proj." + suffix + ".weight");
      ASSERT_NE(tensor, nullptr);
      std::vector<float> expected(tensor->NumElements());
      kernels::ConvertToFloat32(tensor->data, tensor->dtype, tensor->NumElements(), expected.data());
      const LoraWeights& w = adapter->weights(2, LoraModule::kKProj);
      EXPECT_EQ(is_a ? w.a : w.b, expected);
    }
  }
}

TEST(LoraAdapterTest, ContentHashIsStableAndFollowsContent) {
  absl::StatusOr<LoraAdapter> first = Load(SharedAdapter("qv-r4"));
  absl::StatusOr<LoraAdapter> second = Load(SharedAdapter("qv-r4"));
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->content_hash(), second->content_hash());

  const std::string a = test_support::WriteSmallAdapter(FreshDir("a"), 4, /*seed=*/1);
  const std::string b = test_support::WriteSmallAdapter(FreshDir("b"), 4, /*seed=*/2);
  absl::StatusOr<LoraAdapter> loaded_a = Load(a);
  absl::StatusOr<LoraAdapter> loaded_b = Load(b);
  ASSERT_TRUE(loaded_a.ok() && loaded_b.ok());
  EXPECT_NE(loaded_a->content_hash(), loaded_b->content_hash());
}

TEST(LoraAdapterTest, AcceptsKeysWithoutPrefixAndWithTheAdapterName) {
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
  for (size_t i = 0; i < tensors.size(); ++i) {
    std::string& name = tensors[i].name;
    if (i % 2 == 0) name = name.substr(std::string("base_model.model.").size());
    if (i % 3 == 0) name.replace(name.rfind(".weight"), 7, ".default.weight");
  }
  absl::StatusOr<LoraAdapter> renamed =
      Load(WriteAdapter(FreshDir("renamed"), LoraConfigJson(4, 8, kQv), tensors));
  ASSERT_OK(renamed);
  absl::StatusOr<LoraAdapter> plain =
      Load(test_support::WriteSmallAdapter(FreshDir("plain"), 4, 1));
  ASSERT_OK(plain);
  for (int64_t layer = 0; layer < 4; ++layer) {
    EXPECT_EQ(renamed->weights(layer, LoraModule::kVProj).a, plain->weights(layer, LoraModule::kVProj).a);
    EXPECT_EQ(renamed->weights(layer, LoraModule::kVProj).b, plain->weights(layer, LoraModule::kVProj).b);
  }
}

TEST(LoraAdapterTest, RankPatternAlphaPatternAndLayersToTransform) {
  // Layer 1 and 3 only; q_proj rank 2 with alpha 6; v_proj rank 4, alpha 8.
  nlohmann::json config = LoraConfigJson(4, 8, kQv);
  config["layers_to_transform"] = {1, 3};
  config["rank_pattern"] = {{"q_proj", 2}};
  config["alpha_pattern"] = {{"layers.1.self_attn.q_proj", 6}};
  std::vector<TestTensor> tensors;
  for (const TestTensor& t : LoraTensors(SharedModelShape(), 4, kQv, 1)) {
    const bool wanted_layer = t.name.find("layers.1.") != std::string::npos ||
                              t.name.find("layers.3.") != std::string::npos;
    if (!wanted_layer) continue;
    if (t.name.find("q_proj") == std::string::npos) {
      tensors.push_back(t);
    }
  }
  for (const TestTensor& t : LoraTensors(SharedModelShape(), 2, {"q_proj"}, 1)) {
    if (t.name.find("layers.1.") != std::string::npos || t.name.find("layers.3.") != std::string::npos) {
      tensors.push_back(t);
    }
  }
  absl::StatusOr<LoraAdapter> adapter = Load(WriteAdapter(FreshDir("x"), config, tensors));
  ASSERT_OK(adapter);
  EXPECT_TRUE(adapter->weights(0, LoraModule::kQProj).empty());
  EXPECT_TRUE(adapter->weights(2, LoraModule::kVProj).empty());
  EXPECT_EQ(adapter->weights(1, LoraModule::kQProj).rank, 2);
  EXPECT_FLOAT_EQ(adapter->weights(1, LoraModule::kQProj).scale, 3.0f);
  EXPECT_FLOAT_EQ(adapter->weights(3, LoraModule::kQProj).scale, 4.0f);
  EXPECT_EQ(adapter->weights(3, LoraModule::kVProj).rank, 4);
  EXPECT_FLOAT_EQ(adapter->weights(3, LoraModule::kVProj).scale, 2.0f);
  EXPECT_THAT(adapter->ranks(), ElementsAre(2, 4));
}

// ---- broken adapters ---------------------------------------------------------

// Loads `dir` expecting failure with `code`; returns the message.
// The error of loading `dir`. Every refusal the files' names, shapes and
// config show is also the refusal of reading the metadata alone (a
// registered adapter is refused at registration); only what is in the
// tensor bytes (non-finite values) waits for the weights.
std::string LoadError(const std::string& dir, absl::StatusCode code, int max_rank = 64,
                      bool in_the_header = true) {
  absl::StatusOr<LoraAdapter> adapter = Load(dir, max_rank);
  EXPECT_FALSE(adapter.ok()) << dir;
  if (adapter.ok()) return "";
  EXPECT_EQ(adapter.status().code(), code) << adapter.status();
  absl::StatusOr<LoraAdapter> metadata =
      LoadLoraAdapter(dir, SharedModelShape(), AdapterLimits{max_rank}, AdapterRead::kMetadata);
  if (in_the_header) {
    EXPECT_EQ(metadata.status(), adapter.status());
  } else {
    EXPECT_OK(metadata);
  }
  return std::string(adapter.status().message());
}

TEST(LoraAdapterTest, TruncatedSafetensors) {
  const std::string dir = test_support::WriteSmallAdapter(FreshDir("x"));
  const std::string path = dir + "/adapter_model.safetensors";
  fs::resize_file(path, fs::file_size(path) - 100);
  absl::StatusOr<LoraAdapter> adapter = Load(dir);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(adapter.status().message(), HasSubstr(path));
}

TEST(LoraAdapterTest, RankDifferentFromTheConfig) {
  const std::string dir =
      WriteAdapter(FreshDir("x"), LoraConfigJson(8, 16, kQv), LoraTensors(SharedModelShape(), 4, kQv, 1));
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("layers.0.self_attn.q_proj.lora_A.weight"), HasSubstr("[4, 64]"),
                    HasSubstr("expected [8, 64]")));
}

TEST(LoraAdapterTest, RankAboveTheLimit) {
  const std::string dir = WriteAdapter(FreshDir("x"), LoraConfigJson(16, 16, kQv),
                                       LoraTensors(SharedModelShape(), 16, kQv, 1));
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kFailedPrecondition, /*max_rank=*/8),
              AllOf(HasSubstr("model.layers.0.self_attn.q_proj"), HasSubstr("rank 16"),
                    HasSubstr("limit of 8"), HasSubstr("--max-lora-rank")));
}

TEST(LoraAdapterTest, NonFiniteValues) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
    tensors[5].values[17] = bad;
    const std::string dir = WriteAdapter(FreshDir(std::to_string(bad)), LoraConfigJson(4, 8, kQv), tensors);
    EXPECT_THAT(
        LoadError(dir, absl::StatusCode::kInvalidArgument, 64, /*in_the_header=*/false),
        AllOf(HasSubstr(tensors[5].name), HasSubstr("non-finite"), HasSubstr("element 17")));
  }
}

TEST(LoraAdapterTest, UnknownModule) {
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
  tensors.push_back({"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", {4, 64},
                     std::vector<float>(256, 0.f)});
  const std::string dir = WriteAdapter(FreshDir("x"), LoraConfigJson(4, 8, kQv), tensors);
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("qkv_proj.lora_A.weight"), HasSubstr("not a LoRA weight of a known module")));
}

TEST(LoraAdapterTest, IntegerTensorIsRefusedByName) {
  const std::string dir = FreshDir("x");
  ASSERT_OK(
      formats::WriteSafetensors(dir + "/adapter_model.safetensors",
                                {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                  "I64",
                                  {4, 64},
                                  std::string(4 * 64 * 8, '\0')}}));
  std::ofstream(dir + "/adapter_config.json") << LoraConfigJson(4, 8, {"q_proj"}).dump();
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("q_proj.lora_A.weight"), HasSubstr("dtype I64")));
}

TEST(LoraAdapterTest, TensorForAModuleTheConfigDoesNotTarget) {
  const std::string dir = WriteAdapter(FreshDir("x"), LoraConfigJson(4, 8, {"q_proj"}),
                                       LoraTensors(SharedModelShape(), 4, kQv, 1));
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("v_proj.lora_A.weight"), HasSubstr("does not target")));
}

TEST(LoraAdapterTest, TargetedModuleWithoutTensors) {
  const std::string dir = WriteAdapter(FreshDir("x"), LoraConfigJson(4, 8, {"q_proj", "v_proj", "k_proj"}),
                                       LoraTensors(SharedModelShape(), 4, kQv, 1));
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("model.layers.0.self_attn.k_proj"), HasSubstr("no lora_A / lora_B")));
}

TEST(LoraAdapterTest, AWithoutB) {
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
  const auto b = std::find_if(tensors.begin(), tensors.end(), [](const TestTensor& t) {
    return t.name == "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight";
  });
  ASSERT_NE(b, tensors.end());
  tensors.erase(b);
  const std::string dir = WriteAdapter(FreshDir("x"), LoraConfigJson(4, 8, kQv), tensors);
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("layers.2.self_attn.v_proj.lora_A.weight"), HasSubstr("no matching lora_B")));
}

TEST(LoraAdapterTest, WrongBaseModel) {
  // Trained on a base with hidden size 32.
  const BaseModelShape other = LlamaBaseShape(4, 32, 86, 2, 2, 16);
  const std::string dir = WriteAdapter(FreshDir("x"), LoraConfigJson(4, 8, kQv), LoraTensors(other, 4, kQv, 1));
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kFailedPrecondition),
              AllOf(HasSubstr("layers.0.self_attn.q_proj.lora_A.weight"), HasSubstr("[4, 32]"),
                    HasSubstr("in_features 64"), HasSubstr("different base model")));
  // More layers than the base has.
  const BaseModelShape deeper = LlamaBaseShape(6, 64, 172, 4, 4, 16);
  const std::string deep_dir =
      WriteAdapter(FreshDir("deep"), LoraConfigJson(4, 8, kQv), LoraTensors(deeper, 4, kQv, 1));
  EXPECT_THAT(LoadError(deep_dir, absl::StatusCode::kFailedPrecondition),
              AllOf(HasSubstr("layer 4"), HasSubstr("has 4 layers")));
}

TEST(LoraAdapterTest, RefusedConfigFields) {
  const std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
  const std::vector<std::pair<nlohmann::json, std::string>> cases = {
      {{{"use_dora", true}}, "sets use_dora but model.layers.0.self_attn.q_proj has no "
                             "lora_magnitude_vector"},
      {{{"modules_to_save", {"lm_head"}}}, "lists lm_head in modules_to_save but the file has "
                                           "no copy of it"},
      {{{"modules_to_save", {"q_proj"}}}, "only embed_tokens, lm_head and the RMS norms"},
      {{{"modules_to_save", {"score"}}}, "names none of the modules that can be saved"},
      {{{"bias", "all"}}, "\"bias\""},
      {{{"target_modules", {"q_proj", "v_proj", "lm_head"}}},
       "targets lm_head but the file has no lora_A / lora_B"},
  };
  for (const auto& [fields, message] : cases) {
    nlohmann::json config = LoraConfigJson(4, 8, kQv);
    config.update(fields);
    const std::string dir = WriteAdapter(FreshDir(message.substr(0, 4)), config, tensors);
    EXPECT_THAT(LoadError(dir, absl::StatusCode::kInvalidArgument),
                AllOf(HasSubstr(dir + "/adapter_config.json"), HasSubstr(message)));
  }
}

// DoRA magnitudes, LoRA on embed_tokens and lm_head, and saved modules, as
// PEFT 0.21 names them.
std::vector<TestTensor> HeadTensors(int r) {
  const BaseModelShape base = SharedModelShape();
  auto values = [](int64_t n, float v) { return std::vector<float>(static_cast<size_t>(n), v); };
  std::vector<TestTensor> tensors = LoraTensors(base, r, kQv, 1);
  for (int64_t layer = 0; layer < base.num_layers; ++layer) {
    for (const char* module : {"q_proj", "v_proj"}) {
      tensors.push_back({absl::StrCat("base_model.model.model.layers.", layer, ".self_attn.",
                                      module, ".lora_magnitude_vector"),
                         {64},
                         values(64, 1.5f)});
    }
  }
  tensors.push_back({"base_model.model.lm_head.lora_A.weight", {r, 64}, values(r * 64, 0.1f)});
  tensors.push_back({"base_model.model.lm_head.lora_B.weight", {512, r}, values(512 * r, 0.2f)});
  tensors.push_back(
      {"base_model.model.lm_head.lora_magnitude_vector", {512}, values(512, 2.0f)});
  tensors.push_back({"base_model.model.model.norm.weight", {64}, values(64, 0.9f)});
  tensors.push_back({"base_model.model.model.layers.2.input_layernorm.weight", {64},
                     values(64, 0.8f)});
  return tensors;
}

nlohmann::json HeadConfig(int r) {
  nlohmann::json config = LoraConfigJson(r, 2 * r, {"q_proj", "v_proj", "lm_head"});
  config["use_dora"] = true;
  config["modules_to_save"] = {"model.norm", "layers.2.input_layernorm"};
  return config;
}

TEST(LoraAdapterTest, DoraHeadsAndSavedModules) {
  const std::string dir = WriteAdapter(FreshDir("x"), HeadConfig(4), HeadTensors(4));
  absl::StatusOr<LoraAdapter> adapter = LoadLoraAdapter(dir, SharedModelShape(), {});
  ASSERT_OK(adapter);
  const LoraWeights& q = adapter->weights(1, LoraModule::kQProj);
  EXPECT_TRUE(q.dora);
  EXPECT_EQ(q.magnitude, std::vector<float>(64, 1.5f));
  const LoraWeights& lm_head = adapter->head_weights(HeadModule::kLmHead);
  EXPECT_EQ(lm_head.rank, 4);
  EXPECT_EQ(lm_head.in_features, 64);
  EXPECT_EQ(lm_head.out_features, 512);
  EXPECT_TRUE(lm_head.dora);
  EXPECT_EQ(lm_head.magnitude.size(), 512u);
  EXPECT_TRUE(adapter->head_weights(HeadModule::kEmbedTokens).empty());
  const SavedModules& saved = adapter->saved();
  EXPECT_EQ(saved.paths,
            (std::vector<std::string>{"model.layers.2.input_layernorm", "model.norm"}));
  EXPECT_EQ(saved.norm, std::vector<float>(64, 0.9f));
  ASSERT_EQ(saved.input_norms.size(), 4u);
  EXPECT_EQ(saved.input_norms[2], std::vector<float>(64, 0.8f));
  EXPECT_TRUE(saved.input_norms[1].empty());
  EXPECT_TRUE(saved.lm_head.empty());
  EXPECT_EQ(adapter->target_modules(),
            (std::vector<std::string>{"q_proj", "v_proj", "lm_head"}));
  // A, B, magnitudes and the saved norms, all counted.
  const size_t floats = 4 * 2 * (4 * (64 + 64) + 64) + 4 * (64 + 512) + 512 + 2 * 64;
  EXPECT_EQ(adapter->bytes(), floats * sizeof(float));
  // The header alone gives the same shapes and bytes.
  absl::StatusOr<LoraAdapter> metadata =
      LoadLoraAdapter(dir, SharedModelShape(), {}, AdapterRead::kMetadata);
  ASSERT_OK(metadata);
  EXPECT_EQ(metadata->bytes(), adapter->bytes());
  EXPECT_TRUE(metadata->head_weights(HeadModule::kLmHead).dora);
  EXPECT_EQ(metadata->saved().paths, saved.paths);
}

TEST(LoraAdapterTest, EmbeddingLora) {
  nlohmann::json config = LoraConfigJson(4, 8, {"q_proj", "v_proj", "embed_tokens"});
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
  tensors.push_back({"base_model.model.model.embed_tokens.lora_embedding_A", {4, 512},
                     std::vector<float>(4 * 512, 0.5f)});
  tensors.push_back({"base_model.model.model.embed_tokens.lora_embedding_B", {64, 4},
                     std::vector<float>(64 * 4, 0.25f)});
  // save_embedding_layers: PEFT writes the base embedding beside its LoRA.
  tensors.push_back({"base_model.model.model.embed_tokens.base_layer.weight", {512, 64},
                     std::vector<float>(512 * 64, 0.125f)});
  const std::string dir = WriteAdapter(FreshDir("x"), config, tensors);
  absl::StatusOr<LoraAdapter> adapter = LoadLoraAdapter(dir, SharedModelShape(), {});
  ASSERT_OK(adapter);
  const LoraWeights& embed = adapter->head_weights(HeadModule::kEmbedTokens);
  EXPECT_EQ(embed.rank, 4);
  EXPECT_EQ(embed.in_features, 512);
  EXPECT_EQ(embed.out_features, 64);
  EXPECT_EQ(embed.a.size(), 4u * 512);
  EXPECT_EQ(adapter->saved().paths, std::vector<std::string>{"model.embed_tokens"});
  EXPECT_EQ(adapter->saved().embed_tokens.size(), 512u * 64);

  // lora_A / lora_B are the wrong names for an embedding.
  std::vector<TestTensor> linear_names = tensors;
  linear_names[linear_names.size() - 3].name = "base_model.model.model.embed_tokens.lora_A.weight";
  EXPECT_THAT(
      LoadError(WriteAdapter(FreshDir("names"), config, linear_names),
                absl::StatusCode::kInvalidArgument),
      HasSubstr("model.embed_tokens takes lora_embedding_A / lora_embedding_B matrices"));
  // DoRA does not cover embeddings.
  nlohmann::json dora = config;
  dora["use_dora"] = true;
  EXPECT_THAT(LoadError(WriteAdapter(FreshDir("dora"), dora, tensors),
                        absl::StatusCode::kInvalidArgument),
              HasSubstr("DoRA on the embeddings is not supported"));
}

TEST(LoraAdapterTest, DoraAndSavedModuleErrors) {
  // A magnitude without use_dora.
  nlohmann::json plain = HeadConfig(4);
  plain["use_dora"] = false;
  EXPECT_THAT(LoadError(WriteAdapter(FreshDir("plain"), plain, HeadTensors(4)),
                        absl::StatusCode::kInvalidArgument),
              HasSubstr("is a DoRA magnitude, but"));
  // A magnitude of the wrong length.
  std::vector<TestTensor> tensors = HeadTensors(4);
  for (TestTensor& t : tensors) {
    if (t.name == "base_model.model.lm_head.lora_magnitude_vector") {
      t.shape = {64};
      t.values.resize(64);
    }
  }
  EXPECT_THAT(LoadError(WriteAdapter(FreshDir("length"), HeadConfig(4), tensors),
                        absl::StatusCode::kInvalidArgument),
              AllOf(HasSubstr("lm_head.lora_magnitude_vector"), HasSubstr("expected [512]")));
  // A saved copy the config does not list.
  nlohmann::json unlisted = HeadConfig(4);
  unlisted["modules_to_save"] = {"model.norm"};
  EXPECT_THAT(LoadError(WriteAdapter(FreshDir("unlisted"), unlisted, HeadTensors(4)),
                        absl::StatusCode::kInvalidArgument),
              HasSubstr("is a copy of model.layers.2.input_layernorm, which"));
  // A saved module of another shape.
  tensors = HeadTensors(4);
  tensors.back().shape = {32};
  tensors.back().values.resize(32);
  EXPECT_THAT(LoadError(WriteAdapter(FreshDir("shape"), HeadConfig(4), tensors),
                        absl::StatusCode::kFailedPrecondition),
              AllOf(HasSubstr("input_layernorm.weight"), HasSubstr("is [64]")));
  // Both adapted and saved.
  nlohmann::json both = HeadConfig(4);
  both["modules_to_save"] = {"model.norm", "layers.2.input_layernorm", "lm_head"};
  EXPECT_THAT(LoadError(WriteAdapter(FreshDir("both"), both, HeadTensors(4)),
                        absl::StatusCode::kInvalidArgument),
              HasSubstr("both a LoRA target and in modules_to_save"));
}

TEST(LoraAdapterTest, PickleOnly) {
  const std::string dir = FreshDir("x");
  std::ofstream(dir + "/adapter_config.json") << LoraConfigJson(4, 8, kQv).dump();
  std::ofstream(dir + "/adapter_model.bin") << "pickle";
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kFailedPrecondition),
              AllOf(HasSubstr("adapter_model.bin (pickle) is not supported"),
                    HasSubstr("convert it to safetensors")));
}

TEST(LoraAdapterTest, MissingFiles) {
  const std::string dir = FreshDir("x");
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kNotFound), HasSubstr(dir + "/adapter_config.json"));
  std::ofstream(dir + "/adapter_config.json") << LoraConfigJson(4, 8, kQv).dump();
  EXPECT_THAT(LoadError(dir, absl::StatusCode::kNotFound), HasSubstr("adapter_model.safetensors"));
}

// ---- random PEFT adapters from the golden generator -----------------------

BaseModelShape ShapeFromConfig(const std::string& config_path) {
  nlohmann::json config = nlohmann::json::parse(std::ifstream(config_path));
  const int64_t hidden = config["hidden_size"];
  const int64_t heads = config["num_attention_heads"];
  const int64_t kv_heads = config.value("num_key_value_heads", heads);
  int64_t head_dim = hidden / heads;
  if (config.contains("head_dim") && !config["head_dim"].is_null()) head_dim = config["head_dim"];
  return LlamaBaseShape(config["num_hidden_layers"], hidden, config["intermediate_size"], heads,
                        kv_heads, head_dim, config["vocab_size"]);
}

TEST(LoraAdapterTest, GoldenGeneratorAdaptersLoad) {
  const fs::path root = LORASERVE_SOURCE_DIR;
  const fs::path manifest_path = root / "tests/golden/data/manifest.json";
  if (!fs::exists(manifest_path)) GTEST_SKIP() << manifest_path << " not generated yet";
  const nlohmann::json manifest = nlohmann::json::parse(std::ifstream(manifest_path));
  std::map<std::string, std::string> model_dirs;
  for (const auto& model : manifest.value("model_cases", nlohmann::json::array())) {
    model_dirs[model["name"]] = model["model_dir"];
  }
  int loaded = 0;
  for (const auto& entry : manifest.value("adapter_cases", nlohmann::json::array())) {
    const std::string name = entry["name"];
    SCOPED_TRACE(name);
    const std::string base = entry["base"];
    ASSERT_TRUE(model_dirs.count(base)) << "base " << base;
    const BaseModelShape shape = ShapeFromConfig((root / model_dirs[base] / "config.json").string());
    absl::StatusOr<LoraAdapter> adapter =
        LoadLoraAdapter((root / std::string(entry["adapter_dir"])).string(), shape, AdapterLimits{64});
    ASSERT_OK(adapter);
    ++loaded;
    if (name == "rank-alpha-pattern") {
      // q_proj r4, layer 1 down_proj r2, v_proj alpha 4, layer 0 o_proj alpha 32, others r8 alpha 16.
      EXPECT_EQ(adapter->weights(0, LoraModule::kQProj).rank, 4);
      EXPECT_FLOAT_EQ(adapter->weights(0, LoraModule::kQProj).scale, 16.0f / 4);
      EXPECT_EQ(adapter->weights(1, LoraModule::kDownProj).rank, 2);
      EXPECT_EQ(adapter->weights(0, LoraModule::kDownProj).rank, 8);
      EXPECT_FLOAT_EQ(adapter->weights(1, LoraModule::kVProj).scale, 4.0f / 8);
      EXPECT_FLOAT_EQ(adapter->weights(0, LoraModule::kOProj).scale, 32.0f / 8);
      EXPECT_FLOAT_EQ(adapter->weights(1, LoraModule::kOProj).scale, 16.0f / 8);
    } else if (name == "layers-to-transform") {
      EXPECT_TRUE(adapter->weights(0, LoraModule::kQProj).empty());
      EXPECT_EQ(adapter->weights(1, LoraModule::kQProj).rank, 4);
    } else if (name == "regex-targets") {
      EXPECT_FALSE(adapter->weights(0, LoraModule::kQProj).empty());
      EXPECT_TRUE(adapter->weights(0, LoraModule::kKProj).empty());
      EXPECT_TRUE(adapter->weights(1, LoraModule::kQProj).empty());
      EXPECT_FALSE(adapter->weights(1, LoraModule::kGateProj).empty());
    } else if (name == "rslora") {
      EXPECT_FLOAT_EQ(adapter->weights(0, LoraModule::kQProj).scale, 2.0f);
    } else if (name == "dora") {
      EXPECT_TRUE(adapter->weights(1, LoraModule::kDownProj).dora);
      EXPECT_EQ(adapter->weights(1, LoraModule::kDownProj).magnitude.size(), 64u);
    } else if (name == "dora-qwen2") {
      EXPECT_TRUE(adapter->head_weights(HeadModule::kLmHead).dora);
      // save_embedding_layers wrote the (tied) lm_head beside its LoRA.
      EXPECT_EQ(adapter->saved().paths, std::vector<std::string>{"lm_head"});
    } else if (name == "embed-lm-head") {
      EXPECT_EQ(adapter->head_weights(HeadModule::kEmbedTokens).rank, 8);
      EXPECT_EQ(adapter->head_weights(HeadModule::kLmHead).rank, 8);
      EXPECT_FALSE(adapter->head_weights(HeadModule::kLmHead).dora);
    } else if (name == "modules-to-save") {
      // "norm" ends model.norm and both norms of both layers.
      EXPECT_EQ(adapter->saved().paths.size(), 2u + 1 + 4);
      EXPECT_EQ(adapter->saved().lm_head.size(), 128u * 64);
    }
  }
  if (loaded == 0) GTEST_SKIP() << manifest_path << " lists no adapter cases yet";
}

}  // namespace
}  // namespace loraserve::adapters
