// Added tokens (tokenizer.json's "added_tokens" and the config's special
// tokens), private to server/tokenizer: what they are, and finding them in
// text before the model runs, as tokenizers' AddedVocabulary does.
//
// Thread-safety: an AddedTokenMatcher is immutable once built; Split may
// run on any thread.
#ifndef LORASERVE_SERVER_TOKENIZER_ADDED_TOKENS_H_
#define LORASERVE_SERVER_TOKENIZER_ADDED_TOKENS_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "server/tokenizer/pattern.h"

namespace loraserve::model::tokenizer_internal {

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool single_word = false;
};

// A piece of text between added tokens (`id` < 0) or an added token.
struct Segment {
  absl::string_view text;
  size_t begin;
  int32_t id;
};

// Rust's char::is_alphanumeric, which decides single_word matches: the
// `word_char` an AddedTokenMatcher with single_word tokens needs.
inline constexpr char kWordCharRegex[] = R"([\p{Alphabetic}\p{N}])";

// Finds added tokens like tokenizers' AddedVocabulary::find_matches: the
// leftmost, then longest token wins; a single_word token must not touch a
// word character; lstrip/rstrip take the whitespace beside the token along.
//
// Ownership: borrows the tokens and `word_char`, which must outlive it.
class AddedTokenMatcher {
 public:
  AddedTokenMatcher() = default;
  // `word_char` (kWordCharRegex compiled) may be null when no token is
  // single_word.
  AddedTokenMatcher(std::vector<const AddedToken*> tokens, const Regex* word_char);

  // The whole of `text`, cut into added tokens and the text between them.
  std::vector<Segment> Split(absl::string_view text) const;

 private:
  const AddedToken* LongestAt(absl::string_view text, size_t pos) const;
  bool TouchesWordBefore(absl::string_view text, size_t pos) const;
  bool TouchesWordAfter(absl::string_view text, size_t pos) const;

  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;
  const Regex* word_char_ = nullptr;
};

}  // namespace loraserve::model::tokenizer_internal

#endif  // LORASERVE_SERVER_TOKENIZER_ADDED_TOKENS_H_
