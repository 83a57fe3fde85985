// tokenizers' patterns, private to server/tokenizer: a Regex (PCRE2 set up
// to behave like the Oniguruma regexes `tokenizers` runs) and a Pattern
// (tokenizer.json's {"String": ...} or {"Regex": ...}). Pre-tokenizers split
// at them, Replace normalizers and decoders rewrite with them, and added
// tokens check word boundaries with a Regex.
//
// Thread-safety: immutable once built; any thread may search.
#ifndef LORASERVE_SERVER_TOKENIZER_PATTERN_H_
#define LORASERVE_SERVER_TOKENIZER_PATTERN_H_

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

// pcre2.h's pcre2_code for 8-bit code units (pcre2_code_8), declared here so
// that pcre2.h, with the PCRE2_CODE_UNIT_WIDTH it needs first, stays in
// pattern.cc; pattern.cc checks that the two are the same type.
struct pcre2_real_code_8;

namespace loraserve::model::tokenizer_internal {

using Range = std::pair<size_t, size_t>;  // [begin, end) byte offsets

// A PCRE2 pattern in UTF mode with Unicode properties, so that \s, \p{L} and
// (?!\S) behave like the Oniguruma regexes `tokenizers` runs. The compiled
// code is shared by all threads; each search makes its own match data.
class Regex {
 public:
  // `where` names the pattern's origin in the error when it does not compile.
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern,
                                                        absl::string_view where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Successive non-overlapping, non-empty matches in `text` (valid UTF-8).
  // Empty matches are skipped: every user drops empty pieces anyway.
  std::vector<Range> FindAll(absl::string_view text) const;

  // Whether the pattern matches at exactly byte `pos` of `text`.
  bool MatchesAt(absl::string_view text, size_t pos) const;

 private:
  explicit Regex(pcre2_real_code_8* code) : code_(code) {}
  pcre2_real_code_8* code_;
};

// tokenizers' `pattern`: {"String": literal} or {"Regex": regex}.
class Pattern {
 public:
  static std::unique_ptr<Pattern> Literal(std::string literal);
  static std::unique_ptr<Pattern> FromRegex(std::unique_ptr<Regex> regex);

  // Successive non-overlapping, non-empty matches in `text`.
  std::vector<Range> FindAll(absl::string_view text) const;
  // `text` with every match replaced by `content`.
  std::string ReplaceAll(absl::string_view text, absl::string_view content) const;

 private:
  Pattern() = default;
  std::string literal_;
  std::unique_ptr<Regex> regex_;
};

}  // namespace loraserve::model::tokenizer_internal

#endif  // LORASERVE_SERVER_TOKENIZER_PATTERN_H_
