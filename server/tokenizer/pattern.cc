#include "server/tokenizer/pattern.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "server/tokenizer/utf8.h"

namespace loraserve::model::tokenizer_internal {

static_assert(std::is_same_v<pcre2_code, pcre2_real_code_8>,
              "pattern.h declares pcre2_code under its 8-bit name");

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(const std::string& pattern,
                                                      absl::string_view where) {
  int error = 0;
  PCRE2_SIZE error_offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF | PCRE2_UCP, &error, &error_offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return absl::InvalidArgumentError(absl::StrCat(where, ": regex \"", pattern,
                                                   "\" does not compile at offset ", error_offset,
                                                   ": ", reinterpret_cast<const char*>(message)));
  }
  // JIT is only a speed-up: when it is unavailable pcre2_match interprets.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return std::unique_ptr<Regex>(new Regex(code));
}

Regex::~Regex() { pcre2_code_free(code_); }

std::vector<Range> Regex::FindAll(absl::string_view text) const {
  std::vector<Range> matches;
  pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  for (size_t offset = 0; offset <= text.size();) {
    int rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, data, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
      // Long runs can exhaust the JIT's small default stack; the
      // interpreter has no such limit worth worrying about here.
      rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, data,
                       nullptr);
    }
    if (rc < 0) break;  // PCRE2_ERROR_NOMATCH: the rest of the text is a gap
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
    if (ovector[1] > ovector[0]) {
      matches.emplace_back(ovector[0], ovector[1]);
      offset = ovector[1];
    } else {
      if (ovector[0] >= text.size()) break;
      offset = ovector[0] + NextUtf8(text, ovector[0]).length;
    }
  }
  pcre2_match_data_free(data);
  return matches;
}

bool Regex::MatchesAt(absl::string_view text, size_t pos) const {
  pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos,
                             PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, data, nullptr);
  pcre2_match_data_free(data);
  return rc >= 0;
}

std::unique_ptr<Pattern> Pattern::Literal(std::string literal) {
  auto pattern = std::unique_ptr<Pattern>(new Pattern());
  pattern->literal_ = std::move(literal);
  return pattern;
}

std::unique_ptr<Pattern> Pattern::FromRegex(std::unique_ptr<Regex> regex) {
  auto pattern = std::unique_ptr<Pattern>(new Pattern());
  pattern->regex_ = std::move(regex);
  return pattern;
}

std::vector<Range> Pattern::FindAll(absl::string_view text) const {
  if (regex_ != nullptr) return regex_->FindAll(text);
  std::vector<Range> matches;
  if (literal_.empty()) return matches;
  for (size_t pos = text.find(literal_); pos != absl::string_view::npos;
       pos = text.find(literal_, pos + literal_.size())) {
    matches.emplace_back(pos, pos + literal_.size());
  }
  return matches;
}

std::string Pattern::ReplaceAll(absl::string_view text, absl::string_view content) const {
  std::string out;
  size_t last = 0;
  for (const Range& m : FindAll(text)) {
    absl::StrAppend(&out, text.substr(last, m.first - last), content);
    last = m.second;
  }
  absl::StrAppend(&out, text.substr(last));
  return out;
}

}  // namespace loraserve::model::tokenizer_internal
