// Tokenizer::FromJson on arbitrary tokenizer.json text and, after a NUL,
// tokenizer_config.json text; an accepted tokenizer then encodes and decodes
// a few texts and every id of its vocabulary.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "server/engine/incremental_decoder.h"
#include "server/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

constexpr const char* kTexts[] = {"",
                                  "Hello world",
                                  " leading and  double  spaces ",
                                  "Tab\tnew\nline\r\n",
                                  "<s>special</s> <unk> <|endoftext|>",
                                  "caf\xC3\xA9 \xE2\x96\x81 \xF0\x9F\x98\x80 \xE4\xB8\xAD",
                                  "1234567890 !?.,;:'\"()[]{}"};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve;
  const std::vector<absl::string_view> parts =
      fuzz::SplitInput(fuzz::AsText(data, size), absl::string_view("\0", 1), 2);
  absl::StatusOr<std::unique_ptr<model::Tokenizer>> tokenizer =
      model::Tokenizer::FromJson(parts[0], parts.size() > 1 ? parts[1] : "", "fuzz");
  if (!tokenizer.ok()) return 0;
  const model::Tokenizer& tok = **tokenizer;
  const int64_t vocab = tok.vocab_size();
  FUZZ_CHECK(vocab >= 0);
  for (const char* text : kTexts) {
    for (bool special : {false, true}) {
      absl::StatusOr<std::vector<int32_t>> ids = tok.Encode(text, special);
      if (!ids.ok()) continue;
      for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < vocab);
      tok.Decode(*ids, !special);
      engine::IncrementalDecoder decoder(tok, {}, !special);
      std::string streamed;
      for (int32_t id : *ids) streamed += decoder.Append(id);
      streamed += decoder.Flush();
      FUZZ_CHECK(streamed == decoder.text());
    }
  }
  // Every id once, a few out of range, and the pieces.
  const int32_t last = static_cast<int32_t>(std::min<int64_t>(vocab, 1 << 16));
  std::vector<int32_t> all;
  for (int32_t id = -2; id < last + 2; ++id) all.push_back(id);
  tok.Decode(all, false);
  tok.Decode(all, true);
  for (int32_t id : all) tok.IdToPiece(id);
  tok.bos_token_id();
  tok.eos_token_id();
  tok.chat_template();
  return 0;
}
