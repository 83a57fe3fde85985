// Encode and Decode of arbitrary text with real tokenizers, loaded once: the
// shared test model's SentencePiece-style one (LORASERVE_SHARED_TOKENIZER_DIR)
// and the byte-level BPE one of the goldens (LORASERVE_BYTELEVEL_TOKENIZER_DIR).
// Input: a flags byte (bit 0 the tokenizer, bit 1 add_special_tokens, bit 2
// skip_special_tokens, bits 3-7 where the prompt ends), then the text. The
// text's ids must be in the vocabulary and stream as the whole decode says;
// the text's bytes read as int32 ids must decode (and the first 64 stream)
// without fault.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "server/engine/incremental_decoder.h"
#include "server/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

using loraserve::engine::IncrementalDecoder;
using loraserve::model::Tokenizer;

std::unique_ptr<Tokenizer> LoadOrDie(const char* dir) {
  absl::StatusOr<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::Load(dir);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "cannot load the tokenizer of %s: %s\n", dir,
                 std::string(tokenizer.status().message()).c_str());
    std::abort();
  }
  return *std::move(tokenizer);
}

// Streams `ids` after the first `split` as the prompt; when the prompt's text
// is a prefix of the whole text (not cut inside a character), the streamed
// text is the rest.
void CheckStreaming(const Tokenizer& tok, const std::vector<int32_t>& ids, size_t split,
                    bool skip_special) {
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + split);
  const std::string full = tok.Decode(ids, skip_special);
  const std::string prompt_text = tok.Decode(prompt, skip_special);
  IncrementalDecoder decoder(tok, prompt, skip_special);
  std::string streamed;
  for (size_t i = split; i < ids.size(); ++i) {
    const std::string delta = decoder.Append(ids[i]);
    FUZZ_CHECK(loraserve::fuzz::IsValidUtf8(delta));
    streamed += delta;
  }
  streamed += decoder.Flush();
  FUZZ_CHECK(streamed == decoder.text());
  if (absl::StartsWith(full, prompt_text)) {
    FUZZ_CHECK(streamed == full.substr(prompt_text.size()));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::unique_ptr<Tokenizer> kShared = LoadOrDie(LORASERVE_SHARED_TOKENIZER_DIR);
  static const std::unique_ptr<Tokenizer> kByteLevel = LoadOrDie(LORASERVE_BYTELEVEL_TOKENIZER_DIR);
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  const Tokenizer& tok = (flags & 1) ? *kByteLevel : *kShared;
  const bool add_special = flags & 2;
  const bool skip_special = flags & 4;
  const absl::string_view text = loraserve::fuzz::AsText(data + 1, size - 1);

  absl::StatusOr<std::vector<int32_t>> ids = tok.Encode(text, add_special);
  FUZZ_CHECK(ids.ok() == loraserve::fuzz::IsValidUtf8(text));
  if (ids.ok()) {
    for (int32_t id : *ids) FUZZ_CHECK(id >= 0 && id < tok.vocab_size());
    const std::string decoded = tok.Decode(*ids, skip_special);
    FUZZ_CHECK(loraserve::fuzz::IsValidUtf8(decoded));
    CheckStreaming(tok, *ids, std::min<size_t>(flags >> 3, ids->size()), skip_special);
  }

  // The bytes as ids: anything, in or out of the vocabulary.
  std::vector<int32_t> raw(text.size() / sizeof(int32_t));
  if (!raw.empty()) std::memcpy(raw.data(), text.data(), raw.size() * sizeof(int32_t));
  FUZZ_CHECK(loraserve::fuzz::IsValidUtf8(tok.Decode(raw, skip_special)));
  // Streamed, the first few: ids that decode to nothing keep the decoder's
  // window from moving, so each step re-decodes all of them.
  IncrementalDecoder decoder(tok, {}, skip_special);
  std::string streamed;
  for (size_t i = 0; i < raw.size() && i < 64; ++i) streamed += decoder.Append(raw[i]);
  streamed += decoder.Flush();
  FUZZ_CHECK(streamed == decoder.text());
  return 0;
}
