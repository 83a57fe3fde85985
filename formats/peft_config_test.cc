#include "formats/peft_config.h"

#include <cmath>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::formats {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr char kPath[] = "/adapters/x/adapter_config.json";

absl::StatusOr<PeftLoraConfig> Parse(const std::string& fields) {
  return PeftLoraConfig::Parse(R"({"peft_type": "LORA", )" + fields + "}", kPath);
}

std::string Error(const std::string& fields) {
  absl::StatusOr<PeftLoraConfig> config = Parse(fields);
  EXPECT_FALSE(config.ok()) << fields;
  return config.ok() ? "" : std::string(config.status().message());
}

std::string Module(int layer, const std::string& leaf) {
  const bool attention =
      leaf == "q_proj" || leaf == "k_proj" || leaf == "v_proj" || leaf == "o_proj";
  return "model.layers." + std::to_string(layer) + (attention ? ".self_attn." : ".mlp.") + leaf;
}

TEST(PeftConfigTest, TypicalConfigWithExtraKeys) {
  auto config = Parse(R"("r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
      "use_rslora": false, "bias": "none", "fan_in_fan_out": false, "modules_to_save": null,
      "use_dora": false, "lora_dropout": 0.05, "task_type": "CAUSAL_LM", "inference_mode": true,
      "megatron_config": null, "base_model_name_or_path": "aidreams-260k", "layers_to_transform": null,
      "layers_pattern": null, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": false,
      "some_future_key": {"nested": [1, 2]})");
  ASSERT_OK(config);
  EXPECT_EQ(config->r(), 8);
  EXPECT_EQ(config->lora_alpha(), 16);
  EXPECT_EQ(config->base_model_name_or_path(), "aidreams-260k");
  EXPECT_TRUE(config->TargetsModule(Module(0, "q_proj")));
  EXPECT_TRUE(config->TargetsModule(Module(3, "v_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(0, "k_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(0, "gate_proj")));
  EXPECT_EQ(config->RankFor(Module(0, "q_proj")), 8);
  EXPECT_DOUBLE_EQ(config->ScaleFor(Module(0, "q_proj")), 2.0);
}

TEST(PeftConfigTest, RsLoraScale) {
  auto config =
      Parse(R"("r": 16, "lora_alpha": 16, "use_rslora": true, "target_modules": ["up_proj"])");
  ASSERT_OK(config);
  EXPECT_DOUBLE_EQ(config->ScaleFor(Module(1, "up_proj")), 4.0);
}

TEST(PeftConfigTest, SuffixMatchNeedsAWholeSegment) {
  auto config = Parse(R"("target_modules": ["proj", "self_attn.o_proj"])");
  ASSERT_OK(config);
  EXPECT_FALSE(config->TargetsModule(Module(0, "q_proj")));  // "q_proj" does not end with ".proj"
  EXPECT_TRUE(config->TargetsModule(Module(0, "o_proj")));
}

TEST(PeftConfigTest, DefaultsWhenFieldsAreMissing) {
  auto config = Parse(R"("bias": "none")");
  ASSERT_OK(config);
  EXPECT_EQ(config->r(), 8);
  EXPECT_EQ(config->lora_alpha(), 8);
  EXPECT_TRUE(config->TargetsModule(Module(0, "q_proj")));
  EXPECT_TRUE(config->TargetsModule(Module(0, "v_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(0, "k_proj")));
}

TEST(PeftConfigTest, AllLinear) {
  auto config = Parse(R"("target_modules": "all-linear")");
  ASSERT_OK(config);
  for (const char* leaf :
       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}) {
    EXPECT_TRUE(config->TargetsModule(Module(2, leaf))) << leaf;
  }
}

TEST(PeftConfigTest, RegexTargetsMustMatchTheWholeName) {
  // The golden generator's regex-targets case.
  auto config = Parse(
      R"("target_modules": ".*\\.layers\\.0\\.self_attn\\.(q_proj|v_proj)$|.*\\.layers\\.1\\.mlp\\.(gate_proj|down_proj)$")");
  ASSERT_OK(config);
  EXPECT_TRUE(config->TargetsModule(Module(0, "q_proj")));
  EXPECT_TRUE(config->TargetsModule(Module(0, "v_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(1, "q_proj")));
  EXPECT_TRUE(config->TargetsModule(Module(1, "gate_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(0, "gate_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(1, "up_proj")));

  auto partial = Parse(R"("target_modules": "q_proj")");
  ASSERT_OK(partial);
  EXPECT_FALSE(partial->TargetsModule(Module(0, "q_proj")));  // fullmatch, not search
}

TEST(PeftConfigTest, LayersToTransform) {
  auto config = Parse(
      R"("target_modules": ["q_proj"], "layers_to_transform": [1, 3], "layers_pattern": "layers")");
  ASSERT_OK(config);
  EXPECT_FALSE(config->TargetsModule(Module(0, "q_proj")));
  EXPECT_TRUE(config->TargetsModule(Module(1, "q_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(2, "q_proj")));
  EXPECT_TRUE(config->TargetsModule(Module(3, "q_proj")));

  auto single = Parse(R"("target_modules": ["q_proj"], "layers_to_transform": 2)");
  ASSERT_OK(single);
  EXPECT_TRUE(single->TargetsModule(Module(2, "q_proj")));
  EXPECT_FALSE(single->TargetsModule(Module(12, "q_proj")));

  // A pattern naming no segment of the module selects nothing.
  auto other = Parse(
      R"("target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ["h", "blocks"])");
  ASSERT_OK(other);
  EXPECT_FALSE(other->TargetsModule(Module(0, "q_proj")));

  // An exact module name bypasses the layer filter, as in PEFT.
  auto exact =
      Parse(R"("target_modules": ["model.layers.0.self_attn.q_proj"], "layers_to_transform": [1])");
  ASSERT_OK(exact);
  EXPECT_TRUE(exact->TargetsModule(Module(0, "q_proj")));
}

TEST(PeftConfigTest, ExcludeModules) {
  auto config = Parse(
      R"("target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.1.self_attn.q_proj"])");
  ASSERT_OK(config);
  EXPECT_TRUE(config->TargetsModule(Module(0, "q_proj")));
  EXPECT_FALSE(config->TargetsModule(Module(1, "q_proj")));
  auto regex = Parse(R"("target_modules": ["q_proj", "v_proj"], "exclude_modules": ".*v_proj")");
  ASSERT_OK(regex);
  EXPECT_FALSE(regex->TargetsModule(Module(0, "v_proj")));
  EXPECT_TRUE(regex->TargetsModule(Module(0, "q_proj")));
}

TEST(PeftConfigTest, RankAndAlphaPatternsFirstKeyInFileOrderWins) {
  // The golden generator's rank-alpha-pattern case, plus order checks.
  auto config = Parse(R"("r": 8, "lora_alpha": 16,
      "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
      "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2, "down_proj": 6},
      "alpha_pattern": {"v_proj": 4, "layers.0.self_attn.o_proj": 32})");
  ASSERT_OK(config);
  EXPECT_EQ(config->RankFor(Module(0, "q_proj")), 4);
  EXPECT_EQ(config->RankFor(Module(1, "q_proj")), 4);
  EXPECT_EQ(config->RankFor(Module(1, "down_proj")), 2);  // the earlier key wins over "down_proj"
  EXPECT_EQ(config->RankFor(Module(0, "down_proj")), 6);
  EXPECT_EQ(config->RankFor(Module(0, "k_proj")), 8);
  EXPECT_DOUBLE_EQ(config->AlphaFor(Module(1, "v_proj")), 4);
  EXPECT_DOUBLE_EQ(config->AlphaFor(Module(0, "o_proj")), 32);
  EXPECT_DOUBLE_EQ(config->AlphaFor(Module(1, "o_proj")), 16);
  EXPECT_DOUBLE_EQ(config->ScaleFor(Module(0, "q_proj")), 16.0 / 4);
  EXPECT_DOUBLE_EQ(config->ScaleFor(Module(0, "v_proj")), 4.0 / 8);
  // A key must end the name at a segment boundary: "proj" does not match "q_proj".
  auto boundary = Parse(R"("target_modules": ["q_proj"], "rank_pattern": {"proj": 2})");
  ASSERT_OK(boundary);
  EXPECT_EQ(boundary->RankFor(Module(0, "q_proj")), 8);
}

TEST(PeftConfigTest, DoraHeadsAndSavedModules) {
  auto config = Parse(
      R"("use_dora": true, "target_modules": ["q_proj", "lm_head", "embed_tokens"],
         "modules_to_save": ["norm"])");
  ASSERT_OK(config);
  EXPECT_TRUE(config->use_dora());
  EXPECT_TRUE(config->TargetsModule("lm_head"));
  EXPECT_TRUE(config->TargetsModule("model.embed_tokens"));
  // A plain suffix, as PEFT's _set_trainable: "norm" ends every RMS norm's name.
  EXPECT_TRUE(config->SavesModule("model.norm"));
  EXPECT_TRUE(config->SavesModule("model.layers.1.post_attention_layernorm"));
  EXPECT_FALSE(config->SavesModule("lm_head"));
  EXPECT_EQ(config->modules_to_save(), std::vector<std::string>{"norm"});
  auto plain = Parse(R"("modules_to_save": null)");
  ASSERT_OK(plain);
  EXPECT_FALSE(plain->use_dora());
  EXPECT_FALSE(plain->SavesModule("lm_head"));
  // "all-linear" leaves the output head alone, as in PEFT.
  auto all_linear = Parse(R"("target_modules": "all-linear")");
  ASSERT_OK(all_linear);
  EXPECT_FALSE(all_linear->TargetsModule("lm_head"));
}

TEST(PeftConfigTest, RefusalsNameTheField) {
  EXPECT_THAT(Error(R"("fan_in_fan_out": true)"), HasSubstr("fan_in_fan_out"));
  EXPECT_THAT(Error(R"("bias": "all")"), AllOf(HasSubstr("\"bias\""), HasSubstr("\"all\"")));
  EXPECT_THAT(Error(R"("bias": "lora_only")"), HasSubstr("\"bias\""));
  EXPECT_THAT(Error(R"("modules_to_save": "lm_head")"),
              AllOf(HasSubstr("modules_to_save"), HasSubstr("a list")));
  EXPECT_THAT(Error(R"("modules_to_save": [1])"), HasSubstr("modules_to_save"));
  EXPECT_THAT(Error(R"("lora_bias": true)"), HasSubstr("lora_bias"));
  EXPECT_THAT(Error(R"("layer_replication": [[0, 2]])"), HasSubstr("layer_replication"));
  EXPECT_THAT(Error(R"("trainable_token_indices": [1, 2])"), HasSubstr("trainable_token_indices"));
}

// Found by reading the code behind the fuzz targets: a field's error message
// dumped the offending value, and dump() recurses once per level, so an
// uploaded config of nested arrays overflowed the server's stack.
TEST(PeftConfigTest, RefusesDeeplyNestedConfigsBeforeParsing) {
  const std::string deep = std::string(1000000, '[') + std::string(1000000, ']');
  EXPECT_THAT(Error(R"("target_modules": )" + deep),
              AllOf(HasSubstr(kPath), HasSubstr("deeper than 64 levels")));
  EXPECT_THAT(Error(R"("target_modules": [[["q_proj"]]])"), HasSubstr("target_modules"));
}

TEST(PeftConfigTest, MalformedFieldsNameTheFieldAndWhatWasExpected) {
  EXPECT_THAT(PeftLoraConfig::Parse("{", kPath).status().message(),
              AllOf(HasSubstr(kPath), HasSubstr("JSON")));
  EXPECT_THAT(PeftLoraConfig::Parse(R"({"peft_type": "IA3"})", kPath).status().message(),
              AllOf(HasSubstr("peft_type"), HasSubstr("LORA"), HasSubstr("IA3")));
  EXPECT_THAT(PeftLoraConfig::Parse(R"({"r": 8})", kPath).status().message(),
              HasSubstr("peft_type"));
  EXPECT_THAT(Error(R"("r": 0)"), AllOf(HasSubstr("\"r\""), HasSubstr("positive integer")));
  EXPECT_THAT(Error(R"("r": "8")"), HasSubstr("\"r\""));
  EXPECT_THAT(Error(R"("lora_alpha": "x")"), HasSubstr("lora_alpha"));
  EXPECT_THAT(Error(R"("target_modules": [1])"), HasSubstr("target_modules"));
  EXPECT_THAT(Error(R"("target_modules": "q_proj(")"),
              AllOf(HasSubstr("target_modules"), HasSubstr("regular expression")));
  EXPECT_THAT(Error(R"("rank_pattern": {"q_proj": 0})"),
              AllOf(HasSubstr("rank_pattern"), HasSubstr("q_proj")));
  EXPECT_THAT(Error(R"("rank_pattern": {"q_proj[": 4})"),
              AllOf(HasSubstr("rank_pattern"), HasSubstr("q_proj[")));
  EXPECT_THAT(Error(R"("alpha_pattern": {"q_proj": "big"})"), HasSubstr("alpha_pattern"));
  EXPECT_THAT(Error(R"("layers_to_transform": "0")"), HasSubstr("layers_to_transform"));
  EXPECT_THAT(Error(R"("target_modules": "q_proj", "layers_to_transform": [0])"),
              HasSubstr("layers_to_transform"));
  EXPECT_THAT(Error(R"("layers_pattern": "layers")"), HasSubstr("layers_pattern"));
}

}  // namespace
}  // namespace loraserve::formats
