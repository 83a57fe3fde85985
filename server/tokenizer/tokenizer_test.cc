#include "server/tokenizer/tokenizer.h"

#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/status_matchers.h"
#include "tests/support/tokenizer_goldens.h"

namespace loraserve::model {
namespace {

using ::loraserve::test_support::LoadTokenizerVariants;
using ::loraserve::test_support::ReadFileOrDie;
using ::loraserve::test_support::SharedTokenizerTest;
using ::loraserve::test_support::StatusIs;
using ::loraserve::test_support::TokenizerGoldenDir;
using ::loraserve::test_support::TokenizerGoldenSetName;
using ::loraserve::test_support::TokenizerGoldenSets;
using ::loraserve::test_support::TokenizerGoldenTest;
using ::loraserve::test_support::TokenizerVariant;

using json = nlohmann::json;
using ::testing::HasSubstr;

TEST_P(TokenizerGoldenTest, VocabularyAndSpecialIds) {
  EXPECT_EQ(tokenizer_->vocab_size(), golden_["vocab_size"].get<int64_t>());
  ASSERT_TRUE(tokenizer_->bos_token_id().has_value());
  ASSERT_TRUE(tokenizer_->eos_token_id().has_value());
  EXPECT_EQ(*tokenizer_->bos_token_id(), golden_["bos_token_id"].get<int32_t>());
  EXPECT_EQ(*tokenizer_->eos_token_id(), golden_["eos_token_id"].get<int32_t>());
}

TEST_P(TokenizerGoldenTest, EncodeMatchesTransformers) {
  for (const json& c : golden_["cases"]) {
    const std::string text = c["text"];
    absl::StatusOr<std::vector<int32_t>> with = tokenizer_->Encode(text, true);
    absl::StatusOr<std::vector<int32_t>> without = tokenizer_->Encode(text, false);
    ASSERT_TRUE(with.ok() && without.ok()) << with.status() << without.status();
    EXPECT_EQ(*with, c["ids"].get<std::vector<int32_t>>()) << "text: " << json(text).dump();
    EXPECT_EQ(*without, c["ids_no_special"].get<std::vector<int32_t>>())
        << "text: " << json(text).dump();
  }
}

TEST_P(TokenizerGoldenTest, DecodeMatchesTransformers) {
  for (const json& c : golden_["cases"]) {
    const std::vector<int32_t> ids = c["ids"];
    EXPECT_EQ(tokenizer_->Decode(ids, false), c["decoded"].get<std::string>())
        << "ids of " << c["text"];
    EXPECT_EQ(tokenizer_->Decode(ids, true), c["decoded_skip_special"].get<std::string>())
        << "ids of " << c["text"];
  }
}

INSTANTIATE_TEST_SUITE_P(Goldens, TokenizerGoldenTest, ::testing::ValuesIn(TokenizerGoldenSets()),
                         TokenizerGoldenSetName);

// Variants of both tokenizers (tests/golden/tokenizer_goldens.py VARIANTS):
// the same JSON merge patches applied here, the cases checked as above.
TEST(TokenizerVariantTest, MatchTransformers) {
  absl::StatusOr<std::vector<TokenizerVariant>> variants = LoadTokenizerVariants();
  ASSERT_OK(variants);
  ASSERT_GE(variants->size(), 8u);
  for (const TokenizerVariant& variant : *variants) {
    const std::string& name = variant.name;
    const Tokenizer& tokenizer = *variant.tokenizer;
    for (const json& c : variant.cases) {
      const std::string text = c["text"];
      const std::vector<int32_t> ids = c["ids"];
      EXPECT_EQ(*tokenizer.Encode(text, true), ids) << name << ": " << json(text).dump();
      EXPECT_EQ(*tokenizer.Encode(text, false), c["ids_no_special"].get<std::vector<int32_t>>())
          << name << ": " << json(text).dump();
      EXPECT_EQ(tokenizer.Decode(ids, false), c["decoded"].get<std::string>()) << name;
      EXPECT_EQ(tokenizer.Decode(ids, true), c["decoded_skip_special"].get<std::string>()) << name;
    }
  }
}

TEST_F(SharedTokenizerTest, GreedyOutputDecodes) {
  const json golden = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/aidreams-260k.json"));
  const std::vector<int32_t> ids = golden["greedy_ids"];
  const std::string text = tokenizer_->Decode(ids, true);
  EXPECT_EQ(text, golden["greedy_text"].get<std::string>());
  EXPECT_TRUE(absl::StartsWith(text, "\"Echoes of vectors unfold")) << text;
}

// Decode leaves these ids out before its decoders run (the incremental
// decoder relies on it to keep them out of its window).
TEST_F(SharedTokenizerTest, IdsDroppedByDecode) {
  EXPECT_TRUE(tokenizer_->IsDroppedByDecode(2, /*skip_special_tokens=*/true));  // </s>
  EXPECT_FALSE(tokenizer_->IsDroppedByDecode(2, /*skip_special_tokens=*/false));
  EXPECT_TRUE(tokenizer_->IsDroppedByDecode(100000, false));
  EXPECT_TRUE(tokenizer_->IsDroppedByDecode(-1, false));
  EXPECT_FALSE(tokenizer_->IsDroppedByDecode(13, true));  // <0x0A>
}

TEST_F(SharedTokenizerTest, Pieces) {
  EXPECT_EQ(tokenizer_->IdToPiece(13), "<0x0A>");
  EXPECT_EQ(tokenizer_->IdToPiece(1), "<s>");
  EXPECT_EQ(tokenizer_->IdToPiece(-1), "");
  EXPECT_EQ(tokenizer_->IdToPiece(100000), "");
  EXPECT_EQ(tokenizer_->chat_template(), "");
  // Ids outside the vocabulary decode to nothing.
  EXPECT_EQ(tokenizer_->Decode({-5, 100000}, false), "");
}

TEST_F(SharedTokenizerTest, RejectsInvalidUtf8) {
  for (const std::string& bad : {std::string("abc\xFF"), std::string("\xC3"),
                                 std::string("\xED\xA0\x80"), std::string("a\xE4\xB8")}) {
    absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(bad, true);
    EXPECT_THAT(ids, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(ids.status().message(), HasSubstr("UTF-8"));
  }
}

// BPE must stay near-linear: one 200k-character word (the SentencePiece
// path has no pre-tokenizer splitting) would take minutes if quadratic.
TEST_F(SharedTokenizerTest, LongWordIsFast) {
  std::string word;
  for (int i = 0; i < 20000; ++i) word += "abcdefghij";
  absl::StatusOr<std::vector<int32_t>> ids = tokenizer_->Encode(word, false);
  ASSERT_OK(ids);
  EXPECT_EQ(tokenizer_->Decode(*ids, true), word);
}

TEST_F(SharedTokenizerTest, ConcurrentEncodeAgrees) {
  const std::string text = "Echoes of vectors unfold, a gentle hum of precision. 😀 中文";
  const std::vector<int32_t> expected = *tokenizer_->Encode(text, true);
  std::vector<std::thread> threads;
  // Not vector<bool>: its elements share words, so the threads' writes would race.
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      bool all = true;
      for (int i = 0; i < 200; ++i) all &= *tokenizer_->Encode(text, true) == expected;
      ok[t] = all;
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int b : ok) EXPECT_TRUE(b);
}

TEST(ByteLevelTokenizerTest, ChatTemplate) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
      Tokenizer::Load(TokenizerGoldenDir() + "/bytelevel");
  ASSERT_OK(tokenizer);
  EXPECT_THAT((*tokenizer)->chat_template(), HasSubstr("<|eot_id|>"));
}

}  // namespace
}  // namespace loraserve::model
