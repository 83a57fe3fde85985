#include "server/tokenizer/tokenizer.h"

#include <map>
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

using ::loraserve::test_support::ReadFileOrDie;
using ::loraserve::test_support::SharedTokenizerDir;
using ::loraserve::test_support::SharedTokenizerTest;
using ::loraserve::test_support::StatusIs;
using ::loraserve::test_support::TokenizerGoldenDir;
using ::loraserve::test_support::TokenizerGoldenSetName;
using ::loraserve::test_support::TokenizerGoldenSets;
using ::loraserve::test_support::TokenizerGoldenTest;

using json = nlohmann::json;
using ::testing::HasSubstr;

bool IsValidUtf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = s[i];
    size_t len = c < 0x80           ? 1
                 : (c >> 5) == 0x6  ? 2
                 : (c >> 4) == 0xE  ? 3
                 : (c >> 3) == 0x1E ? 4
                                    : 0;
    if (len == 0 || i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += len;
  }
  return true;
}

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

// Streams `generated` after `prompt` and checks the deltas against the
// contract: valid UTF-8 each, concatenating to Decode(all) minus
// Decode(prompt). Returns false when that difference is undefined.
bool CheckIncremental(const Tokenizer& tokenizer, const std::vector<int32_t>& prompt,
                      const std::vector<int32_t>& generated, bool skip_special,
                      const std::string& label) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), generated.begin(), generated.end());
  const std::string full = tokenizer.Decode(all, skip_special);
  const std::string prompt_text = tokenizer.Decode(prompt, skip_special);
  // A prompt cut inside a character decodes to U+FFFD that the full text
  // does not have; "minus" is undefined there. Nothing else may differ.
  if (!absl::StartsWith(full, prompt_text)) {
    EXPECT_TRUE(absl::EndsWith(prompt_text, "\xEF\xBF\xBD"))
        << label << ": prompt of " << prompt.size() << " tokens decodes to " << prompt_text;
    return false;
  }
  IncrementalDecoder decoder(tokenizer, prompt, skip_special);
  std::string streamed;
  for (int32_t id : generated) {
    const std::string delta = decoder.Append(id);
    EXPECT_TRUE(IsValidUtf8(delta)) << label << ": a delta splits a character";
    streamed += delta;
  }
  EXPECT_EQ(streamed, full.substr(prompt_text.size()))
      << label << " prompt " << prompt.size() << " tokens, skip_special " << skip_special;
  EXPECT_EQ(decoder.text(), streamed);
  return true;
}

// Every prompt/continuation split of the short cases, a few of the long ones.
TEST_P(TokenizerGoldenTest, IncrementalDecodingMatchesFullDecode) {
  int checked = 0, undefined = 0;
  for (const json& c : golden_["cases"]) {
    const std::vector<int32_t> ids = c["ids"];
    const std::string label = c["text"].dump();
    std::vector<size_t> splits;
    if (ids.size() <= 64) {
      for (size_t split = 0; split < ids.size(); ++split) splits.push_back(split);
    } else {
      splits = {0, 1, ids.size() / 3, ids.size() / 2, ids.size() - 1};
    }
    for (bool skip_special : {false, true}) {
      for (size_t split : splits) {
        const bool defined =
            CheckIncremental(*tokenizer_, {ids.begin(), ids.begin() + split},
                             {ids.begin() + split, ids.end()}, skip_special, label);
        (defined ? checked : undefined)++;
      }
    }
  }
  EXPECT_GT(checked, 3000) << checked << " splits checked, " << undefined << " inside a character";
}

INSTANTIATE_TEST_SUITE_P(Goldens, TokenizerGoldenTest, ::testing::ValuesIn(TokenizerGoldenSets()),
                         TokenizerGoldenSetName);

// Variants of both tokenizers (tests/golden/tokenizer_goldens.py VARIANTS):
// the same JSON merge patches applied here, the cases checked as above.
TEST(TokenizerVariantTest, MatchTransformers) {
  const json golden = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/variants.json"));
  const std::map<std::string, std::string> base_dirs = {
      {"aidreams-260k", SharedTokenizerDir()}, {"bytelevel", TokenizerGoldenDir() + "/bytelevel"}};
  ASSERT_GE(golden["variants"].size(), 8u);
  for (const json& variant : golden["variants"]) {
    const std::string name = variant["name"];
    const std::string dir = base_dirs.at(variant["base"].get<std::string>());
    json tokenizer_json = json::parse(ReadFileOrDie(dir + "/tokenizer.json"));
    json config_json = json::parse(ReadFileOrDie(dir + "/tokenizer_config.json"));
    tokenizer_json.merge_patch(variant["tokenizer_patch"]);
    config_json.merge_patch(variant["config_patch"]);
    absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer =
        Tokenizer::FromJson(tokenizer_json.dump(), config_json.dump(), name);
    ASSERT_OK(tokenizer);
    for (const json& c : variant["cases"]) {
      const std::string text = c["text"];
      const std::vector<int32_t> ids = c["ids"];
      EXPECT_EQ(*(*tokenizer)->Encode(text, true), ids) << name << ": " << json(text).dump();
      EXPECT_EQ(*(*tokenizer)->Encode(text, false), c["ids_no_special"].get<std::vector<int32_t>>())
          << name << ": " << json(text).dump();
      EXPECT_EQ((*tokenizer)->Decode(ids, false), c["decoded"].get<std::string>()) << name;
      EXPECT_EQ((*tokenizer)->Decode(ids, true), c["decoded_skip_special"].get<std::string>())
          << name;
      for (bool skip_special : {false, true}) {
        CheckIncremental(**tokenizer, {}, ids, skip_special, name + " " + json(text).dump());
      }
    }
  }
}

TEST_F(SharedTokenizerTest, GreedyOutputDecodes) {
  const json golden = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/aidreams-260k.json"));
  const std::vector<int32_t> ids = golden["greedy_ids"];
  const std::string text = tokenizer_->Decode(ids, true);
  EXPECT_EQ(text, golden["greedy_text"].get<std::string>());
  EXPECT_TRUE(absl::StartsWith(text, "\"Echoes of vectors unfold")) << text;
  // Streamed after the BOS prompt, as the engine does.
  IncrementalDecoder decoder(*tokenizer_, {ids[0]}, true);
  for (size_t i = 1; i < ids.size(); ++i) decoder.Append(ids[i]);
  EXPECT_EQ(decoder.text(), text);
}

// A stream that ends inside a character: the held-back bytes come out at the
// end exactly as Decode of the whole sequence renders them.
TEST_F(SharedTokenizerTest, FlushEmitsAnIncompleteCharacterAtTheEnd) {
  const std::vector<int32_t> prompt = {1};
  const std::vector<int32_t> check_mark_head = {3 + 0xE2, 3 + 0x9C};  // "✓" minus its last byte
  IncrementalDecoder decoder(*tokenizer_, prompt, true);
  for (int32_t id : check_mark_head) EXPECT_EQ(decoder.Append(id), "");
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), check_mark_head.begin(), check_mark_head.end());
  const std::string expected =
      tokenizer_->Decode(all, true).substr(tokenizer_->Decode(prompt, true).size());
  EXPECT_FALSE(expected.empty());
  EXPECT_EQ(decoder.Flush(), expected);
  EXPECT_EQ(decoder.text(), expected);
  EXPECT_EQ(decoder.Flush(), "");
}

// Ids that Decode drops (skipped special tokens, ids outside the vocabulary) are
// left out of the decoder's window: the text is the same, even between the bytes
// of one character, and a long run of them costs nothing at each step.
TEST_F(SharedTokenizerTest, DroppedIdsInTheStreamChangeNoText) {
  EXPECT_TRUE(tokenizer_->IsDroppedByDecode(2, /*skip_special_tokens=*/true));  // </s>
  EXPECT_FALSE(tokenizer_->IsDroppedByDecode(2, /*skip_special_tokens=*/false));
  EXPECT_TRUE(tokenizer_->IsDroppedByDecode(100000, false));
  EXPECT_TRUE(tokenizer_->IsDroppedByDecode(-1, false));
  EXPECT_FALSE(tokenizer_->IsDroppedByDecode(13, true));  // <0x0A>

  const json golden = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/aidreams-260k.json"));
  const std::vector<int32_t> greedy = golden["greedy_ids"];
  std::vector<int32_t> generated(greedy.begin() + 1, greedy.begin() + 20);
  generated.insert(generated.end(), 5000, 2);  // ignore_eos: EOS after EOS
  generated.push_back(3 + 0xE2);               // "✓", byte by byte, EOS between
  generated.push_back(2);
  generated.push_back(3 + 0x9C);
  generated.push_back(100000);
  generated.push_back(3 + 0x93);
  generated.insert(generated.end(), greedy.begin() + 20, greedy.end());
  for (bool skip_special : {true, false}) {
    EXPECT_TRUE(CheckIncremental(*tokenizer_, {greedy[0]}, generated, skip_special,
                                 "greedy with dropped ids"));
  }
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
