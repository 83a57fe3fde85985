#include "tests/support/tokenizer_goldens.h"

#include <fstream>
#include <map>
#include <sstream>
#include <utility>

#include "tests/support/status_matchers.h"

namespace loraserve::test_support {

using json = nlohmann::json;

std::string SharedTokenizerDir() {
  return std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k";
}

std::string TokenizerGoldenDir() {
  return std::string(LORASERVE_SOURCE_DIR) + "/tests/golden/data/tokenizer";
}

std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

void PrintTo(const TokenizerGoldenSet& set, std::ostream* os) { *os << set.name; }

std::vector<TokenizerGoldenSet> TokenizerGoldenSets() {
  return {TokenizerGoldenSet{"aidreams-260k", SharedTokenizerDir()},
          TokenizerGoldenSet{"bytelevel", TokenizerGoldenDir() + "/bytelevel"}};
}

std::string TokenizerGoldenSetName(const ::testing::TestParamInfo<TokenizerGoldenSet>& info) {
  return info.param.name == "bytelevel" ? std::string("ByteLevel") : std::string("SharedModel");
}

void TokenizerGoldenTest::SetUp() {
  absl::StatusOr<std::unique_ptr<model::Tokenizer>> tokenizer =
      model::Tokenizer::Load(GetParam().model_dir);
  ASSERT_OK(tokenizer);
  tokenizer_ = *std::move(tokenizer);
  golden_ = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/" + GetParam().name + ".json"));
  ASSERT_GE(golden_["cases"].size(), 200u);
}

void SharedTokenizerTest::SetUp() {
  absl::StatusOr<std::unique_ptr<model::Tokenizer>> tokenizer =
      model::Tokenizer::Load(SharedTokenizerDir());
  ASSERT_OK(tokenizer);
  tokenizer_ = *std::move(tokenizer);
}

absl::StatusOr<std::vector<TokenizerVariant>> LoadTokenizerVariants() {
  const json golden = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/variants.json"));
  const std::map<std::string, std::string> base_dirs = {
      {"aidreams-260k", SharedTokenizerDir()}, {"bytelevel", TokenizerGoldenDir() + "/bytelevel"}};
  std::vector<TokenizerVariant> variants;
  for (const json& variant : golden["variants"]) {
    const std::string name = variant["name"];
    const std::string dir = base_dirs.at(variant["base"].get<std::string>());
    json tokenizer_json = json::parse(ReadFileOrDie(dir + "/tokenizer.json"));
    json config_json = json::parse(ReadFileOrDie(dir + "/tokenizer_config.json"));
    tokenizer_json.merge_patch(variant["tokenizer_patch"]);
    config_json.merge_patch(variant["config_patch"]);
    absl::StatusOr<std::unique_ptr<model::Tokenizer>> tokenizer =
        model::Tokenizer::FromJson(tokenizer_json.dump(), config_json.dump(), name);
    if (!tokenizer.ok()) return tokenizer.status();
    variants.push_back({name, *std::move(tokenizer), variant["cases"]});
  }
  return variants;
}

}  // namespace loraserve::test_support
