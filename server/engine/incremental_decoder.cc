#include "server/engine/incremental_decoder.h"

#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace loraserve::engine {

// As in vLLM: each step decodes a short window ids[prefix_offset_, end) and
// emits what it adds to the decoding of ids[prefix_offset_, read_offset_).
// Decoders treat the first token of their input specially (Strip drops a
// leading space, Metaspace drops the marker), so the window must start at a
// token that is neither the first visible one of a longer text nor inside a
// character: its decoding must be non-empty and not start with U+FFFD —
// otherwise the window reaches further back.

namespace {

// What Decode renders an incomplete character as (Tokenizer::Decode).
constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

constexpr size_t kInitialWindow = 5;  // prompt tokens re-decoded (vLLM's choice)

bool IsGoodWindowStart(const model::Tokenizer& tokenizer, absl::Span<const int32_t> window,
                       bool skip_special_tokens) {
  const std::string text = tokenizer.Decode(window, skip_special_tokens);
  return !text.empty() && !absl::StartsWith(text, kReplacementChar);
}

}  // namespace

IncrementalDecoder::IncrementalDecoder(const model::Tokenizer& tokenizer,
                                       std::vector<int32_t> prompt_ids, bool skip_special_tokens)
    : tokenizer_(tokenizer),
      ids_(std::move(prompt_ids)),
      skip_special_tokens_(skip_special_tokens) {
  read_offset_ = ids_.size();
  prefix_offset_ = read_offset_ > kInitialWindow ? read_offset_ - kInitialWindow : 0;
  const absl::Span<const int32_t> ids(ids_);
  while (prefix_offset_ > 0 &&
         !IsGoodWindowStart(tokenizer_, ids.subspan(prefix_offset_, read_offset_ - prefix_offset_),
                            skip_special_tokens_)) {
    --prefix_offset_;
  }
}

std::string IncrementalDecoder::Append(int32_t id) {
  // Decode drops such an id before its decoders run, so leaving it out of the
  // window changes no text; kept in, a long run of them (EOS after EOS with
  // ignore_eos) would make every step re-decode the whole run.
  if (tokenizer_.IsDroppedByDecode(id, skip_special_tokens_)) return "";
  ids_.push_back(id);
  return Advance(/*at_end=*/false);
}

std::string IncrementalDecoder::Flush() {
  return read_offset_ < ids_.size() ? Advance(/*at_end=*/true) : std::string();
}

std::string IncrementalDecoder::Advance(bool at_end) {
  const absl::Span<const int32_t> ids(ids_);
  const std::string prefix_text = tokenizer_.Decode(
      ids.subspan(prefix_offset_, read_offset_ - prefix_offset_), skip_special_tokens_);
  const std::string new_text = tokenizer_.Decode(ids.subspan(prefix_offset_), skip_special_tokens_);
  // Hold back while the newest bytes do not yet form a whole character.
  if (new_text.size() <= prefix_text.size() ||
      (!at_end && absl::EndsWith(new_text, kReplacementChar))) {
    return "";
  }
  // A window that re-decodes differently (malformed byte runs) can only emit
  // past the part both decodings share.
  size_t common = 0;
  while (common < prefix_text.size() && prefix_text[common] == new_text[common]) ++common;
  while (common > 0 && (static_cast<unsigned char>(new_text[common]) & 0xC0) == 0x80) --common;
  std::string delta = new_text.substr(common);

  if (IsGoodWindowStart(tokenizer_, ids.subspan(read_offset_), skip_special_tokens_)) {
    prefix_offset_ = read_offset_;
  }
  read_offset_ = ids_.size();
  emitted_ += delta;
  return delta;
}

}  // namespace loraserve::engine
