// UTF-8 stepping for the tokenizer, private to server/tokenizer: text to
// encode is checked with it, BPE splits words into characters with it, and
// decoders turn byte runs back into text with it, all with the same rule for
// malformed input that the Rust `tokenizers` library applies.
#ifndef LORASERVE_SERVER_TOKENIZER_UTF8_H_
#define LORASERVE_SERVER_TOKENIZER_UTF8_H_

#include <cstddef>
#include <string>

#include "absl/strings/string_view.h"

namespace loraserve::model::tokenizer_internal {

inline constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// One step through possibly malformed UTF-8: `length` bytes starting at the
// position form either a whole character (`complete`) or the longest prefix
// of a well-formed sequence (at least one byte), which Unicode's "maximal
// subpart" rule — and Rust's String::from_utf8_lossy — turn into one U+FFFD.
struct Utf8Step {
  size_t length;
  bool complete;
};

// The step at s[i]; `i` < s.size().
Utf8Step NextUtf8(absl::string_view s, size_t i);

// Offset of the first byte that is not part of a well-formed character, or
// npos when `s` is valid UTF-8.
size_t FirstInvalidUtf8(absl::string_view s);

// `s` with each maximal ill-formed subpart replaced by one U+FFFD.
std::string LossyUtf8(absl::string_view s);

// The code point of the well-formed character at s[i]; `*length` gets its
// byte count.
char32_t CodePointAt(absl::string_view s, size_t i, size_t* length);

std::string EncodeUtf8(char32_t cp);

}  // namespace loraserve::model::tokenizer_internal

#endif  // LORASERVE_SERVER_TOKENIZER_UTF8_H_
