// Reading tokenizer.json and tokenizer_config.json: malformed files are
// refused with errors that name the file and the field.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/tokenizer/tokenizer.h"
#include "tests/support/status_matchers.h"
#include "tests/support/tokenizer_goldens.h"

namespace loraserve::model {
namespace {

using ::loraserve::test_support::ReadFileOrDie;
using ::loraserve::test_support::SharedTokenizerDir;
using ::loraserve::test_support::StatusIs;

using json = nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

class MalformedTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char dir[] = "/tmp/tokenizer_test_XXXXXX";
    ASSERT_NE(mkdtemp(dir), nullptr);
    dir_ = dir;
    base_ = json::parse(ReadFileOrDie(SharedTokenizerDir() + "/tokenizer.json"));
  }
  void TearDown() override {
    std::remove((dir_ + "/tokenizer.json").c_str());
    std::remove((dir_ + "/tokenizer_config.json").c_str());
    rmdir(dir_.c_str());
  }
  void Write(const std::string& name, const std::string& contents) {
    std::ofstream(dir_ + "/" + name) << contents;
  }
  // Loads `tokenizer_json` (no config, so tokenizer.json is read as is).
  absl::Status LoadWith(const json& tokenizer_json) {
    Write("tokenizer.json", tokenizer_json.dump());
    return Tokenizer::Load(dir_).status();
  }

  std::string dir_;
  json base_;
};

TEST_F(MalformedTokenizerTest, MissingFile) {
  absl::Status status = Tokenizer::Load(dir_).status();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(status.message(), HasSubstr("tokenizer.json"));
}

TEST_F(MalformedTokenizerTest, NotJson) {
  Write("tokenizer.json", "{\"model\": ");
  absl::Status status = Tokenizer::Load(dir_).status();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("tokenizer.json"));
}

TEST_F(MalformedTokenizerTest, BadConfig) {
  Write("tokenizer.json", base_.dump());
  Write("tokenizer_config.json", "[1, 2");
  absl::Status status = Tokenizer::Load(dir_).status();
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(status.message(), HasSubstr("tokenizer_config.json"));
}

TEST_F(MalformedTokenizerTest, ErrorsNameFileAndField) {
  struct Case {
    std::string label;
    json tokenizer;
    std::string field;
  };
  std::vector<Case> cases;
  json t = base_;
  t.erase("model");
  cases.push_back({"missing model", t, "'model'"});
  t = base_;
  t["model"]["type"] = "WordPiece";
  cases.push_back({"unknown model type", t, "'model.type'"});
  t = base_;
  t["model"]["vocab"] = json::array({1, 2});
  cases.push_back({"vocab not an object", t, "'model.vocab'"});
  t = base_;
  t["model"]["vocab"]["zzz"] = 2147483647;
  cases.push_back({"id out of range", t, "'model.vocab'"});
  t = base_;
  t["model"]["merges"] = json::array({"in"});
  cases.push_back({"merge without a pair", t, "'model.merges[0]'"});
  t = base_;
  t["model"]["merges"] = json::array({json::array({"q", "zz"})});
  cases.push_back({"merge outside the vocabulary", t, "'model.merges[0]'"});
  t = base_;
  t["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  cases.push_back({"unknown pre-tokenizer", t, "'pre_tokenizer.type'"});
  t = base_;
  t["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", {{{"type", "ByteLevel"}}, {{"type", "Whitespace"}}}}};
  cases.push_back(
      {"unknown pre-tokenizer in a sequence", t, "'pre_tokenizer.pretokenizers[1].type'"});
  t = base_;
  t["normalizer"]["normalizers"][1] = {{"type", "NFKD"}};
  cases.push_back({"unknown normalizer", t, "'normalizer.normalizers[1].type'"});
  t = base_;
  t["pre_tokenizer"] = {
      {"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  cases.push_back({"regex that does not compile", t, "'pre_tokenizer.pattern'"});
  t = base_;
  t["decoder"] = {{"type", "WordPiece"}};
  cases.push_back({"unknown decoder", t, "'decoder.type'"});
  t = base_;
  t["post_processor"] = {{"type", "RobertaProcessing"}};
  cases.push_back({"unknown post-processor", t, "'post_processor.type'"});
  t = base_;
  t["added_tokens"][0]["content"] = 5;
  cases.push_back({"added token content", t, "'added_tokens[0].content'"});
  // Found by tests/fuzz (tokenizer_load): template ids were not checked, so
  // Encode returned ids outside the vocabulary.
  t = base_;
  t["post_processor"]["special_tokens"]["<s>"]["ids"] = json::array({970});
  cases.push_back({"special token id past the vocabulary", t, "'post_processor'"});
  t = base_;
  t["post_processor"]["special_tokens"]["<s>"]["ids"] = json::array({-1});
  cases.push_back({"negative special token id", t, "'post_processor.special_tokens.<s>.ids'"});
  t = base_;
  t["post_processor"]["special_tokens"]["<s>"]["ids"] = json::array({4294967297});
  cases.push_back({"special token id past int32", t, "'post_processor.special_tokens.<s>.ids'"});

  for (const Case& c : cases) {
    absl::Status status = LoadWith(c.tokenizer);
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument)) << c.label << ": " << status;
    EXPECT_THAT(status.message(), HasSubstr("tokenizer.json")) << c.label;
    EXPECT_THAT(status.message(), HasSubstr(c.field)) << c.label;
  }
}

// Found by reading the code behind the tokenizer_load fuzz target: the
// config's special tokens take the ids after the vocabulary, and with its
// largest id at 2^31 - 2 the next one overflowed int32.
TEST_F(MalformedTokenizerTest, NoIdLeftForTheConfigsSpecialTokens) {
  const std::string tokenizer_json =
      R"({"model": {"type": "BPE", "vocab": {"a": 2147483646}, "merges": []}})";
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::FromJson(tokenizer_json, R"({"bos_token": "<b>", "eos_token": "<e>"})", "inline");
  ASSERT_FALSE(tokenizer.ok());
  EXPECT_THAT(tokenizer, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(tokenizer.status().message(),
              AllOf(HasSubstr("tokenizer_config.json"), HasSubstr("'bos_token'"),
                    HasSubstr("no token id is left")));
  tokenizer = Tokenizer::FromJson(tokenizer_json, "", "inline");
  ASSERT_OK(tokenizer);
  EXPECT_EQ((*tokenizer)->vocab_size(), 2147483647);
}

TEST_F(MalformedTokenizerTest, TokenizerJsonAloneIsReadAsIs) {
  // Without tokenizer_config.json nothing is rebuilt: the Prepend/Replace
  // normalizer of the file applies (a leading space gives two markers) and
  // the post-processor adds BOS.
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::FromJson(base_.dump(), "", "inline");
  ASSERT_OK(tokenizer);
  absl::StatusOr<std::vector<int32_t>> ids = (*tokenizer)->Encode(" x", true);
  ASSERT_OK(ids);
  EXPECT_EQ(*ids, (std::vector<int32_t>{1, 429, 429, 458}));
  EXPECT_FALSE((*tokenizer)->bos_token_id().has_value());
}

// Either file nesting past base/json_depth.h's bound is refused before parsing:
// code that walks JSON values recurses once per level.
TEST_F(MalformedTokenizerTest, DeepNestingIsRefusedInEitherFile) {
  const std::string deep = R"({"x": )" + std::string(100, '[') + std::string(100, ']') + "}";
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::FromJson(deep, "", "inline");
  EXPECT_THAT(tokenizer, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(tokenizer.status().message(),
              AllOf(HasSubstr("inline/tokenizer.json"), HasSubstr("deeper than 64 levels")));
  tokenizer = Tokenizer::FromJson(base_.dump(), deep, "inline");
  EXPECT_THAT(tokenizer, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(tokenizer.status().message(),
              AllOf(HasSubstr("inline/tokenizer_config.json"), HasSubstr("deeper than 64 levels")));
}

}  // namespace
}  // namespace loraserve::model
