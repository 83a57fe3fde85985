#include "server/tokenizer/added_tokens.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "server/tokenizer/utf8.h"

namespace loraserve::model::tokenizer_internal {
namespace {

// Rust's char::is_whitespace (the Unicode White_Space property), which
// tokenizers uses for the lstrip/rstrip of added tokens.
bool IsWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(std::vector<const AddedToken*> tokens, const Regex* word_char)
    : word_char_(word_char) {
  for (const AddedToken* token : tokens) {
    if (!token->content.empty()) {
      by_first_byte_[static_cast<unsigned char>(token->content[0])].push_back(token);
    }
  }
  for (auto& list : by_first_byte_) {
    std::stable_sort(list.begin(), list.end(), [](const AddedToken* a, const AddedToken* b) {
      return a->content.size() > b->content.size();
    });
  }
}

std::vector<Segment> AddedTokenMatcher::Split(absl::string_view text) const {
  std::vector<Segment> segments;
  size_t done = 0;  // text before this is in `segments`
  for (size_t pos = 0; pos < text.size();) {
    const AddedToken* token = LongestAt(text, pos);
    if (token == nullptr) {
      ++pos;
      continue;
    }
    size_t begin = pos, end = pos + token->content.size();
    pos = end;
    if (token->single_word && (TouchesWordBefore(text, begin) || TouchesWordAfter(text, end))) {
      continue;
    }
    if (token->lstrip) {
      while (begin > done) {
        size_t prev = begin - 1;
        while (prev > done && (static_cast<unsigned char>(text[prev]) & 0xC0) == 0x80) --prev;
        size_t length;
        if (!IsWhitespace(CodePointAt(text, prev, &length))) break;
        begin = prev;
      }
    }
    if (token->rstrip) {
      while (end < text.size()) {
        size_t length;
        if (!IsWhitespace(CodePointAt(text, end, &length))) break;
        end += length;
      }
      pos = end;
    }
    if (begin > done) segments.push_back({text.substr(done, begin - done), done, -1});
    segments.push_back({text.substr(begin, end - begin), begin, token->id});
    done = end;
  }
  if (done < text.size()) segments.push_back({text.substr(done), done, -1});
  return segments;
}

const AddedToken* AddedTokenMatcher::LongestAt(absl::string_view text, size_t pos) const {
  for (const AddedToken* token : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
    if (absl::StartsWith(text.substr(pos), token->content)) return token;
  }
  return nullptr;
}

bool AddedTokenMatcher::TouchesWordBefore(absl::string_view text, size_t pos) const {
  if (pos == 0) return false;
  size_t prev = pos - 1;
  while (prev > 0 && (static_cast<unsigned char>(text[prev]) & 0xC0) == 0x80) --prev;
  return word_char_->MatchesAt(text, prev);
}

bool AddedTokenMatcher::TouchesWordAfter(absl::string_view text, size_t pos) const {
  return pos < text.size() && word_char_->MatchesAt(text, pos);
}

}  // namespace loraserve::model::tokenizer_internal
