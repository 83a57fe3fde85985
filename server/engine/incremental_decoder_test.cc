#include "server/engine/incremental_decoder.h"

#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/tokenizer/tokenizer.h"
#include "tests/support/status_matchers.h"
#include "tests/support/tokenizer_goldens.h"

namespace loraserve::engine {
namespace {

using ::loraserve::model::Tokenizer;
using ::loraserve::test_support::LoadTokenizerVariants;
using ::loraserve::test_support::ReadFileOrDie;
using ::loraserve::test_support::TokenizerGoldenDir;
using ::loraserve::test_support::TokenizerGoldenSetName;
using ::loraserve::test_support::TokenizerGoldenSets;
using ::loraserve::test_support::TokenizerVariant;

using json = nlohmann::json;

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

// The tokenizer goldens' cases, streamed.
class IncrementalDecoderGoldenTest : public test_support::TokenizerGoldenTest {};

// Every prompt/continuation split of the short cases, a few of the long ones.
TEST_P(IncrementalDecoderGoldenTest, MatchesFullDecode) {
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

INSTANTIATE_TEST_SUITE_P(Goldens, IncrementalDecoderGoldenTest,
                         ::testing::ValuesIn(TokenizerGoldenSets()), TokenizerGoldenSetName);

// The tokenizer variants' cases (server/tokenizer/tokenizer_test.cc checks
// their Encode and Decode), streamed from an empty prompt.
TEST(IncrementalDecoderVariantTest, MatchesFullDecode) {
  absl::StatusOr<std::vector<TokenizerVariant>> variants = LoadTokenizerVariants();
  ASSERT_OK(variants);
  ASSERT_GE(variants->size(), 8u);
  for (const TokenizerVariant& variant : *variants) {
    for (const json& c : variant.cases) {
      const std::vector<int32_t> ids = c["ids"];
      for (bool skip_special : {false, true}) {
        CheckIncremental(*variant.tokenizer, {}, ids, skip_special,
                         variant.name + " " + c["text"].dump());
      }
    }
  }
}

// The shared model's tokenizer.
class IncrementalDecoderTest : public test_support::SharedTokenizerTest {};

TEST_F(IncrementalDecoderTest, GreedyOutputStreams) {
  const json golden = json::parse(ReadFileOrDie(TokenizerGoldenDir() + "/aidreams-260k.json"));
  const std::vector<int32_t> ids = golden["greedy_ids"];
  // Streamed after the BOS prompt, as the engine does.
  IncrementalDecoder decoder(*tokenizer_, {ids[0]}, true);
  for (size_t i = 1; i < ids.size(); ++i) decoder.Append(ids[i]);
  EXPECT_EQ(decoder.text(), golden["greedy_text"].get<std::string>());
}

// A stream that ends inside a character: the held-back bytes come out at the
// end exactly as Decode of the whole sequence renders them.
TEST_F(IncrementalDecoderTest, FlushEmitsAnIncompleteCharacterAtTheEnd) {
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
TEST_F(IncrementalDecoderTest, DroppedIdsInTheStreamChangeNoText) {
  // </s> (2) and ids outside the vocabulary are what Decode drops
  // (server/tokenizer/tokenizer_test.cc, IdsDroppedByDecode).
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

}  // namespace
}  // namespace loraserve::engine
