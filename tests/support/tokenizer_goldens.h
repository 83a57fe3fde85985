// The tokenizer goldens of tests/golden/data/tokenizer (made by
// tests/golden/tokenizer_goldens.py with transformers) as gtest fixtures,
// shared by the tokenizer's tests (server/tokenizer) and the incremental
// decoder's (server/engine), which check their own halves of the same cases.
//
// Example:
//   using ::loraserve::test_support::TokenizerGoldenTest;
//   TEST_P(TokenizerGoldenTest, Encodes) { ... tokenizer_->Encode(...) ... golden_["cases"] ... }
//   INSTANTIATE_TEST_SUITE_P(Goldens, TokenizerGoldenTest,
//                            ::testing::ValuesIn(TokenizerGoldenSets()), TokenizerGoldenSetName);
#ifndef LORASERVE_TESTS_SUPPORT_TOKENIZER_GOLDENS_H_
#define LORASERVE_TESTS_SUPPORT_TOKENIZER_GOLDENS_H_

#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/tokenizer/tokenizer.h"

namespace loraserve::test_support {

// The shared test model's tokenizer (SentencePiece-style BPE with byte
// fallback): ../shared/models/aidreams-260k.
std::string SharedTokenizerDir();
// tests/golden/data/tokenizer: the goldens, and the byte-level BPE tokenizer
// in its bytelevel/ folder.
std::string TokenizerGoldenDir();

// The whole file; a test failure (and "") when it cannot be opened.
std::string ReadFileOrDie(const std::string& path);

// One tokenizer and its golden file: `name`.json in TokenizerGoldenDir().
struct TokenizerGoldenSet {
  std::string name;
  std::string model_dir;
};
void PrintTo(const TokenizerGoldenSet& set, std::ostream* os);

// The shared model's and the byte-level tokenizer's sets, and the test name
// suffix of each ("SharedModel", "ByteLevel").
std::vector<TokenizerGoldenSet> TokenizerGoldenSets();
std::string TokenizerGoldenSetName(const ::testing::TestParamInfo<TokenizerGoldenSet>& info);

// The set's tokenizer, loaded, and its goldens ("cases": text, ids,
// ids_no_special, decoded, decoded_skip_special; at least 200 of them).
class TokenizerGoldenTest : public ::testing::TestWithParam<TokenizerGoldenSet> {
 protected:
  void SetUp() override;

  std::unique_ptr<model::Tokenizer> tokenizer_;
  nlohmann::json golden_;
};

// The shared model's tokenizer, loaded.
class SharedTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override;

  std::unique_ptr<model::Tokenizer> tokenizer_;
};

// Variants of both tokenizers (tests/golden/tokenizer_goldens.py VARIANTS):
// the same JSON merge patches applied to a base tokenizer's two files, and
// the cases transformers gives for the result.
struct TokenizerVariant {
  std::string name;
  std::unique_ptr<model::Tokenizer> tokenizer;
  nlohmann::json cases;
};
// Every variant of variants.json, loaded; the first that does not load is
// the error.
absl::StatusOr<std::vector<TokenizerVariant>> LoadTokenizerVariants();

}  // namespace loraserve::test_support

#endif  // LORASERVE_TESTS_SUPPORT_TOKENIZER_GOLDENS_H_
