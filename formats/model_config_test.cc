#include "formats/model_config.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::formats {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// A config.json as field -> raw JSON value, so each test can change one field.
using Fields = std::map<std::string, std::string>;

std::string ToJson(const Fields& fields) {
  std::string text = "{";
  for (const auto& [name, value] : fields) {
    if (text.size() > 1) text += ", ";
    text += "\"" + name + "\": " + value;
  }
  return text + "}";
}

Fields MinimalLlama() {
  return {{"model_type", "\"llama\""},  {"vocab_size", "512"},      {"hidden_size", "64"},
          {"intermediate_size", "172"}, {"num_hidden_layers", "4"}, {"num_attention_heads", "4"}};
}

Fields With(Fields fields, const std::string& name, const std::string& value) {
  fields[name] = value;
  return fields;
}

Fields Without(Fields fields, const std::string& name) {
  fields.erase(name);
  return fields;
}

absl::StatusOr<ModelConfig> Parse(const Fields& fields) {
  return ParseModelConfig(ToJson(fields), "test/config.json");
}

std::string TestDir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = ::testing::TempDir() + "model_config_test_" + info->name();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

void WriteText(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

TEST(ModelConfigTest, SharedTinyModel) {
  auto config = LoadModelConfig(LORASERVE_SHARED_DIR "/models/aidreams-260k");
  ASSERT_OK(config);
  EXPECT_EQ(config->model_type, "llama");
  EXPECT_EQ(config->vocab_size, 512);
  EXPECT_EQ(config->hidden_size, 64);
  EXPECT_EQ(config->intermediate_size, 172);
  EXPECT_EQ(config->num_hidden_layers, 4);
  EXPECT_EQ(config->num_attention_heads, 4);
  EXPECT_EQ(config->num_key_value_heads, 4);
  EXPECT_EQ(config->head_dim, 16);
  EXPECT_DOUBLE_EQ(config->rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(config->rope_theta, 10000.0);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_TRUE(config->tie_word_embeddings);
  EXPECT_FALSE(config->attention_bias);
  EXPECT_EQ(config->max_position_embeddings, 128);
  EXPECT_EQ(config->bos_token_id, 1);
  EXPECT_THAT(config->eos_token_ids, ElementsAre(2));
  EXPECT_EQ(config->torch_dtype, "float32");
  // The element count of its model.safetensors.
  EXPECT_EQ(ParameterCount(*config), 230976);
}

TEST(ModelConfigTest, DeepNestingIsRefusedBeforeParsing) {
  const std::string deep =
      R"({"model_type": "llama", "x": )" + std::string(100, '[') + std::string(100, ']') + "}";
  absl::StatusOr<ModelConfig> config = ParseModelConfig(deep, "deep/config.json");
  EXPECT_THAT(config, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(config.status().message(),
              AllOf(HasSubstr("deep/config.json"), HasSubstr("deeper than 64 levels")));
}

TEST(ModelConfigTest, DefaultsFollowHuggingFace) {
  auto llama = Parse(MinimalLlama());
  ASSERT_OK(llama);
  EXPECT_EQ(llama->num_key_value_heads, 4);
  EXPECT_EQ(llama->head_dim, 16);
  EXPECT_DOUBLE_EQ(llama->rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(llama->rope_theta, 10000.0);
  EXPECT_FALSE(llama->tie_word_embeddings);
  EXPECT_FALSE(llama->attention_bias);
  EXPECT_EQ(llama->max_position_embeddings, 2048);
  EXPECT_EQ(llama->bos_token_id, -1);
  EXPECT_THAT(llama->eos_token_ids, IsEmpty());
  EXPECT_EQ(llama->torch_dtype, "");

  auto mistral = Parse(With(MinimalLlama(), "model_type", "\"mistral\""));
  ASSERT_OK(mistral);
  EXPECT_EQ(mistral->max_position_embeddings, 131072);
  auto qwen2 = Parse(With(MinimalLlama(), "model_type", "\"qwen2\""));
  ASSERT_OK(qwen2);
  EXPECT_EQ(qwen2->max_position_embeddings, 32768);

  // null means "default" in Hugging Face configs.
  auto nulls = Parse(With(With(With(MinimalLlama(), "head_dim", "null"), "rope_scaling", "null"),
                          "num_key_value_heads", "null"));
  ASSERT_OK(nulls);
  EXPECT_EQ(nulls->head_dim, 16);
  EXPECT_EQ(nulls->num_key_value_heads, 4);
}

TEST(ModelConfigTest, ExplicitHeadDimMayDifferFromHiddenOverHeads) {
  // Mistral-Nemo: 5120 / 32 = 160, but head_dim is 128.
  Fields nemo = With(With(With(MinimalLlama(), "hidden_size", "5120"), "num_attention_heads", "32"),
                     "head_dim", "128");
  auto config = Parse(With(nemo, "num_key_value_heads", "8"));
  ASSERT_OK(config);
  EXPECT_EQ(config->head_dim, 128);
  EXPECT_EQ(config->num_key_value_heads, 8);
  // Heads need not divide the hidden size when head_dim is given.
  EXPECT_OK(Parse(With(With(MinimalLlama(), "num_attention_heads", "3"), "head_dim", "32")));
}

TEST(ModelConfigTest, AttentionBiasPerModelType) {
  auto qwen2 = Parse(With(MinimalLlama(), "model_type", "\"qwen2\""));
  ASSERT_OK(qwen2);
  EXPECT_TRUE(qwen2->attention_bias);
  // Mistral has no attention_bias option; transformers ignores the key.
  auto mistral =
      Parse(With(With(MinimalLlama(), "model_type", "\"mistral\""), "attention_bias", "true"));
  ASSERT_OK(mistral);
  EXPECT_FALSE(mistral->attention_bias);
  EXPECT_OK(Parse(With(MinimalLlama(), "attention_bias", "false")));
}

TEST(ModelConfigTest, TokenIdForms) {
  auto list = Parse(With(With(MinimalLlama(), "eos_token_id", "[2, 7, 3]"), "bos_token_id", "1"));
  ASSERT_OK(list);
  EXPECT_EQ(list->bos_token_id, 1);
  EXPECT_THAT(list->eos_token_ids, ElementsAre(2, 7, 3));
  auto single = Parse(With(MinimalLlama(), "eos_token_id", "5"));
  ASSERT_OK(single);
  EXPECT_THAT(single->eos_token_ids, ElementsAre(5));
  auto nulls = Parse(With(With(MinimalLlama(), "eos_token_id", "null"), "bos_token_id", "null"));
  ASSERT_OK(nulls);
  EXPECT_EQ(nulls->bos_token_id, -1);
  EXPECT_THAT(nulls->eos_token_ids, IsEmpty());
}

constexpr char kLlama3Rope[] =
    R"({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"})";

void ExpectLlama3(const absl::StatusOr<ModelConfig>& config, double theta) {
  ASSERT_OK(config);
  EXPECT_EQ(config->rope_scaling.type, RopeScalingType::kLlama3);
  EXPECT_DOUBLE_EQ(config->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(config->rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(config->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(config->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(config->rope_theta, theta);
}

TEST(ModelConfigTest, RopeScalingForms) {
  // transformers 4: rope_theta at the top level, "rope_type" or legacy "type".
  ExpectLlama3(
      Parse(With(With(MinimalLlama(), "rope_theta", "500000.0"), "rope_scaling", kLlama3Rope)),
      500000.0);
  ExpectLlama3(Parse(With(MinimalLlama(), "rope_scaling",
                          R"({"factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                              "original_max_position_embeddings": 8192, "type": "llama3"})")),
               10000.0);
  // transformers 5: both inside rope_parameters.
  ExpectLlama3(Parse(With(MinimalLlama(), "rope_parameters",
                          R"({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3",
                              "rope_theta": 500000.0})")),
               500000.0);
  auto plain = Parse(
      With(MinimalLlama(), "rope_parameters", R"({"rope_type": "default", "rope_theta": 1e6})"));
  ASSERT_OK(plain);
  EXPECT_EQ(plain->rope_scaling.type, RopeScalingType::kNone);
  EXPECT_DOUBLE_EQ(plain->rope_theta, 1e6);
}

struct BadField {
  Fields fields;
  std::vector<std::string> expected;  // substrings of the message
};

std::vector<BadField> BadFields() {
  const Fields base = MinimalLlama();
  return {
      {Without(base, "model_type"), {"'model_type' is missing", "llama, mistral, qwen2"}},
      {With(base, "model_type", "\"gpt2\""), {"'model_type' is \"gpt2\"", "llama, mistral, qwen2"}},
      {Without(base, "vocab_size"), {"'vocab_size' is missing", "positive integer"}},
      {With(base, "vocab_size", "0"), {"'vocab_size' is 0"}},
      {With(base, "vocab_size", "-5"), {"'vocab_size' is -5"}},
      {With(base, "vocab_size", "\"512\""), {"'vocab_size' is \"512\""}},
      {With(base, "vocab_size", "1.5"), {"'vocab_size' is 1.5"}},
      {With(base, "hidden_size", "0"), {"'hidden_size'"}},
      {Without(base, "intermediate_size"), {"'intermediate_size' is missing"}},
      {With(base, "num_hidden_layers", "0"), {"'num_hidden_layers'"}},
      {With(base, "num_attention_heads", "0"), {"'num_attention_heads'"}},
      {With(base, "num_key_value_heads", "3"),
       {"'num_key_value_heads' is 3", "divisor of num_attention_heads 4"}},
      {With(base, "num_attention_heads", "3"),
       {"'num_attention_heads' is 3", "divisor of hidden_size 64", "head_dim"}},
      {With(base, "head_dim", "0"), {"'head_dim' is 0"}},
      {With(base, "head_dim", "15"), {"'head_dim' is 15", "even"}},
      {With(base, "rms_norm_eps", "0"), {"'rms_norm_eps' is 0", "positive number"}},
      {With(base, "rms_norm_eps", "\"small\""), {"'rms_norm_eps'"}},
      {With(base, "rope_theta", "-1"), {"'rope_theta' is -1"}},
      {With(base, "rope_scaling", "5"), {"'rope_scaling' is 5", "object"}},
      {With(base, "rope_scaling", "{}"), {"'rope_scaling.rope_type' is missing", "llama3"}},
      {With(base, "rope_scaling", R"({"rope_type": "yarn", "factor": 4.0})"),
       {"'rope_scaling.rope_type' is \"yarn\"", "not supported", "\"default\" or \"llama3\""}},
      {With(base, "rope_scaling", R"({"type": "linear", "factor": 2.0})"),
       {"'rope_scaling.type' is \"linear\""}},
      {With(base, "rope_scaling",
            R"({"rope_type": "llama3", "low_freq_factor": 1, "high_freq_factor": 4,
                "original_max_position_embeddings": 8192})"),
       {"'rope_scaling.factor' is missing"}},
      {With(base, "rope_scaling",
            R"({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                "original_max_position_embeddings": 8192})"),
       {"'rope_scaling.high_freq_factor' is 4", "more than low_freq_factor"}},
      {With(base, "rope_parameters", R"({"rope_type": "dynamic", "factor": 2.0})"),
       {"'rope_parameters.rope_type' is \"dynamic\""}},
      {With(base, "tie_word_embeddings", "\"yes\""), {"'tie_word_embeddings'", "true or false"}},
      {With(base, "attention_bias", "true"), {"'attention_bias' is true", "o_proj"}},
      {With(base, "mlp_bias", "true"), {"'mlp_bias' is true"}},
      {With(base, "hidden_act", "\"gelu\""), {"'hidden_act' is \"gelu\"", "\"silu\""}},
      {With(base, "max_position_embeddings", "0"), {"'max_position_embeddings' is 0"}},
      {With(base, "bos_token_id", "[1, 2]"), {"'bos_token_id' is a list"}},
      {With(base, "eos_token_id", "\"</s>\""), {"'eos_token_id' is \"</s>\"", "token id"}},
      {With(base, "eos_token_id", "[2, -1]"), {"'eos_token_id' is [2,-1]"}},
      {With(base, "eos_token_id", "512"), {"token id 512", "eos_token_id", "vocab_size 512"}},
      {With(base, "torch_dtype", "5"), {"'torch_dtype' is 5"}},
  };
}

TEST(ModelConfigTest, EachInvalidFieldHasItsOwnError) {
  for (const BadField& bad : BadFields()) {
    SCOPED_TRACE(ToJson(bad.fields));
    auto config = Parse(bad.fields);
    ASSERT_FALSE(config.ok());
    EXPECT_THAT(config, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(config.status().message(), HasSubstr("test/config.json: "));
    for (const std::string& part : bad.expected) {
      EXPECT_THAT(config.status().message(), HasSubstr(part));
    }
  }
}

// Found by tests/fuzz (model_config): sizes each valid alone whose product
// overflowed int64_t in ParameterCount.
TEST(ModelConfigTest, RejectsSizesWhoseParameterCountOverflows) {
  const Fields huge =
      With(With(MinimalLlama(), "vocab_size", "1099511627776"), "hidden_size", "1099511627776");
  auto config = Parse(huge);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(config, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(config.status().message(),
              AllOf(HasSubstr("test/config.json: "), HasSubstr("expected at most 2^60")));
  // Large, but a count that fits: accepted, and counted exactly.
  auto large = Parse(With(MinimalLlama(), "vocab_size", "4294967296"));
  ASSERT_OK(large);
  EXPECT_EQ(ParameterCount(*large),
            ParameterCount(*Parse(MinimalLlama())) + (int64_t{4294967296} - 512) * 64 * 2);
}

TEST(ModelConfigTest, RejectsMalformedJson) {
  EXPECT_THAT(ParseModelConfig("{\"model_type\": ", "x.json").status().message(),
              AllOf(HasSubstr("x.json"), HasSubstr("not valid JSON")));
  EXPECT_THAT(ParseModelConfig("[1]", "x.json").status().message(),
              AllOf(HasSubstr("x.json"), HasSubstr("expected an object")));
}

TEST(ModelConfigTest, LoadReadsGenerationConfigForMissingTokenIds) {
  const std::string dir = TestDir();
  auto missing = LoadModelConfig(dir);
  EXPECT_THAT(missing, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(missing.status().message(), HasSubstr(dir + "/config.json"));

  WriteText(dir + "/config.json", ToJson(MinimalLlama()));
  auto no_generation = LoadModelConfig(dir);
  ASSERT_OK(no_generation);
  EXPECT_EQ(no_generation->bos_token_id, -1);

  WriteText(dir + "/generation_config.json", R"({"bos_token_id": 1, "eos_token_id": [2, 9]})");
  auto filled = LoadModelConfig(dir);
  ASSERT_OK(filled);
  EXPECT_EQ(filled->bos_token_id, 1);
  EXPECT_THAT(filled->eos_token_ids, ElementsAre(2, 9));

  // config.json wins where it has the ids.
  WriteText(dir + "/config.json", ToJson(With(MinimalLlama(), "eos_token_id", "3")));
  auto own = LoadModelConfig(dir);
  ASSERT_OK(own);
  EXPECT_EQ(own->bos_token_id, 1);
  EXPECT_THAT(own->eos_token_ids, ElementsAre(3));

  WriteText(dir + "/config.json", ToJson(MinimalLlama()));
  WriteText(dir + "/generation_config.json", R"({"eos_token_id": 100000})");
  EXPECT_THAT(LoadModelConfig(dir).status().message(),
              AllOf(HasSubstr(dir + "/generation_config.json"), HasSubstr("token id 100000")));
  WriteText(dir + "/generation_config.json", "{");
  EXPECT_THAT(LoadModelConfig(dir).status().message(),
              AllOf(HasSubstr(dir + "/generation_config.json"), HasSubstr("not valid JSON")));
}

TEST(ModelConfigTest, PresetsParseWithKnownParameterCounts) {
  // Published parameter counts of the models the presets are named after.
  const std::map<std::string, int64_t> expected = {
      {"tiny", 230976},           {"tinyllama-1.1b", 1100048384}, {"llama-2-7b", 6738415616},
      {"llama-3-8b", 8030261248}, {"llama-3.2-1b", 1235814400},   {"mistral-7b", 7241732096},
      {"qwen2-7b", 7615616512},
  };
  EXPECT_EQ(DummyPresetNames().size(), expected.size());
  for (const std::string& name : DummyPresetNames()) {
    SCOPED_TRACE(name);
    auto config = DummyPreset(name);
    ASSERT_OK(config);
    ASSERT_EQ(expected.count(name), 1u);
    EXPECT_EQ(ParameterCount(*config), expected.at(name));
  }

  auto llama3 = DummyPreset("llama-3-8b");
  ASSERT_OK(llama3);
  ExpectLlama3(llama3, 500000.0);
  EXPECT_EQ(llama3->num_key_value_heads, 8);
  EXPECT_THAT(llama3->eos_token_ids, ElementsAre(128001, 128008, 128009));
  auto qwen2 = DummyPreset("qwen2-7b");
  ASSERT_OK(qwen2);
  EXPECT_TRUE(qwen2->attention_bias);
  EXPECT_EQ(qwen2->head_dim, 128);
  auto small = DummyPreset("llama-3.2-1b");
  ASSERT_OK(small);
  EXPECT_TRUE(small->tie_word_embeddings);
  EXPECT_DOUBLE_EQ(small->rope_scaling.factor, 32.0);

  auto unknown = DummyPreset("gpt-5");
  EXPECT_THAT(unknown, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(unknown.status().message(),
              AllOf(HasSubstr("gpt-5"), HasSubstr("tinyllama-1.1b"), HasSubstr("qwen2-7b")));
}

}  // namespace
}  // namespace loraserve::formats
