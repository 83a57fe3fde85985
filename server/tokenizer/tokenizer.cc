// Hugging Face tokenizer.json, reimplemented for the pipeline parts that
// Llama-family models use. Every step follows the Rust `tokenizers` library
// (0.2x) and, where transformers rebuilds a tokenizer from its config,
// `transformers` 5 — the goldens in tests/golden/data/tokenizer pin both.
//
// Encode pipeline (as in tokenizers' TokenizerImpl::encode_single_sequence):
//   text ─ split out added tokens that match the raw text (normalized=false)
//        ─ each remaining segment: normalizers
//        ─ split out added tokens that match normalized text (normalized=true)
//        ─ each remaining segment: pre-tokenizers → pieces → BPE → ids
//   then the post-processor's template adds BOS/EOS.
// Decode: ids → token strings (special ones dropped on request) → decoders →
// concatenation.
#include "server/tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <limits>
#include <queue>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace loraserve::model {
namespace {

using json = nlohmann::json;

constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// ---------------------------------------------------------------------------
// UTF-8

// One step through possibly malformed UTF-8: `length` bytes starting at the
// position form either a whole character (`complete`) or the longest prefix
// of a well-formed sequence (at least one byte), which Unicode's "maximal
// subpart" rule — and Rust's String::from_utf8_lossy — turn into one U+FFFD.
struct Utf8Step {
  size_t length;
  bool complete;
};

Utf8Step NextUtf8(absl::string_view s, size_t i) {
  const unsigned char lead = static_cast<unsigned char>(s[i]);
  if (lead < 0x80) return {1, true};
  size_t len;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (lead >= 0xC2 && lead <= 0xDF) {
    len = 2;
  } else if (lead == 0xE0) {
    len = 3, lo = 0xA0;
  } else if ((lead >= 0xE1 && lead <= 0xEC) || lead == 0xEE || lead == 0xEF) {
    len = 3;
  } else if (lead == 0xED) {
    len = 3, hi = 0x9F;  // no surrogates
  } else if (lead == 0xF0) {
    len = 4, lo = 0x90;
  } else if (lead >= 0xF1 && lead <= 0xF3) {
    len = 4;
  } else if (lead == 0xF4) {
    len = 4, hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return {1, false};
  }
  size_t k = 1;
  for (; k < len && i + k < s.size(); ++k) {
    const unsigned char c = static_cast<unsigned char>(s[i + k]);
    if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) return {k, false};
  }
  return {k, k == len};
}

// Offset of the first byte that is not part of a well-formed character, or
// npos when `s` is valid UTF-8.
size_t FirstInvalidUtf8(absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const Utf8Step step = NextUtf8(s, i);
    if (!step.complete) return i;
    i += step.length;
  }
  return absl::string_view::npos;
}

std::string LossyUtf8(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const Utf8Step step = NextUtf8(s, i);
    if (step.complete) {
      absl::StrAppend(&out, s.substr(i, step.length));
    } else {
      absl::StrAppend(&out, kReplacementChar);
    }
    i += step.length;
  }
  return out;
}

// The code point of the well-formed character at s[i].
char32_t CodePointAt(absl::string_view s, size_t i, size_t* length) {
  const unsigned char lead = static_cast<unsigned char>(s[i]);
  *length = NextUtf8(s, i).length;
  if (*length == 1) return lead;
  char32_t cp = lead & (0x7F >> *length);
  for (size_t k = 1; k < *length; ++k)
    cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  return cp;
}

std::string EncodeUtf8(char32_t cp) {
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

// Rust's char::is_whitespace (the Unicode White_Space property), which
// tokenizers uses for the lstrip/rstrip of added tokens.
bool IsWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// ---------------------------------------------------------------------------
// Patterns

using Range = std::pair<size_t, size_t>;  // [begin, end) byte offsets

// A PCRE2 pattern in UTF mode with Unicode properties, so that \s, \p{L} and
// (?!\S) behave like the Oniguruma regexes `tokenizers` runs. The compiled
// code is shared by all threads; each search makes its own match data.
class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern,
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
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Successive non-overlapping, non-empty matches in `text` (valid UTF-8).
  // Empty matches are skipped: every user drops empty pieces anyway.
  std::vector<Range> FindAll(absl::string_view text) const {
    std::vector<Range> matches;
    pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    for (size_t offset = 0; offset <= text.size();) {
      int rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK, data, nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
        // Long runs can exhaust the JIT's small default stack; the
        // interpreter has no such limit worth worrying about here.
        rc = pcre2_match(code_, subject, text.size(), offset, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT,
                         data, nullptr);
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

  // Whether the pattern matches at exactly byte `pos` of `text`.
  bool MatchesAt(absl::string_view text, size_t pos) const {
    pcre2_match_data* data = pcre2_match_data_create_from_pattern(code_, nullptr);
    const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), pos,
                               PCRE2_NO_UTF_CHECK | PCRE2_ANCHORED, data, nullptr);
    pcre2_match_data_free(data);
    return rc >= 0;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// tokenizers' `pattern`: {"String": literal} or {"Regex": regex}.
class Pattern {
 public:
  static std::unique_ptr<Pattern> Literal(std::string literal) {
    auto pattern = std::unique_ptr<Pattern>(new Pattern());
    pattern->literal_ = std::move(literal);
    return pattern;
  }
  static std::unique_ptr<Pattern> FromRegex(std::unique_ptr<Regex> regex) {
    auto pattern = std::unique_ptr<Pattern>(new Pattern());
    pattern->regex_ = std::move(regex);
    return pattern;
  }

  std::vector<Range> FindAll(absl::string_view text) const {
    if (regex_ != nullptr) return regex_->FindAll(text);
    std::vector<Range> matches;
    if (literal_.empty()) return matches;
    for (size_t pos = text.find(literal_); pos != absl::string_view::npos;
         pos = text.find(literal_, pos + literal_.size())) {
      matches.emplace_back(pos, pos + literal_.size());
    }
    return matches;
  }

  std::string ReplaceAll(absl::string_view text, absl::string_view content) const {
    std::string out;
    size_t last = 0;
    for (const Range& m : FindAll(text)) {
      absl::StrAppend(&out, text.substr(last, m.first - last), content);
      last = m.second;
    }
    absl::StrAppend(&out, text.substr(last));
    return out;
  }

 private:
  Pattern() = default;
  std::string literal_;
  std::unique_ptr<Regex> regex_;
};

// tokenizers' SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Cuts `text` at `matches` and keeps or attaches the matched parts as
// `behavior` says (NormalizedString::split). Empty parts are dropped.
std::vector<std::string> SplitAt(absl::string_view text, const std::vector<Range>& matches,
                                 SplitBehavior behavior, bool invert) {
  // The whole text as alternating gaps and matches.
  std::vector<std::pair<Range, bool>> parts;
  size_t last = 0;
  for (const Range& m : matches) {
    if (m.first > last) parts.push_back({{last, m.first}, invert});
    parts.push_back({m, !invert});
    last = m.second;
  }
  if (last < text.size()) parts.push_back({{last, text.size()}, invert});

  std::vector<Range> kept;
  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const auto& [range, is_match] : parts) {
        if (!is_match) kept.push_back(range);
      }
      break;
    case SplitBehavior::kIsolated:
      for (const auto& part : parts) kept.push_back(part.first);
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& [range, is_match] : parts) {
        if (is_match && !previous_match && !kept.empty()) {
          kept.back().second = range.second;
        } else {
          kept.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool next_match = false;  // walking backwards: the part after this one
      for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
        if (it->second && !next_match && !kept.empty()) {
          kept.back().first = it->first.first;
        } else {
          kept.push_back(it->first);
        }
        next_match = it->second;
      }
      std::reverse(kept.begin(), kept.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const auto& [range, is_match] : parts) {
        if (is_match && previous_match) {
          kept.back().second = range.second;
        } else {
          kept.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    }
  }
  std::vector<std::string> out;
  for (const Range& r : kept) {
    if (r.second > r.first) out.emplace_back(text.substr(r.first, r.second - r.first));
  }
  return out;
}

// ---------------------------------------------------------------------------
// GPT-2's byte ↔ printable-character table of the ByteLevel steps: bytes that
// are printable stand for themselves, the others map to U+0100 onwards.

struct ByteLevelTable {
  std::array<std::string, 256> byte_to_char;
  absl::flat_hash_map<char32_t, uint8_t> char_to_byte;
};

const ByteLevelTable& GetByteLevelTable() {
  static const ByteLevelTable* table = [] {
    auto* t = new ByteLevelTable();
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      t->byte_to_char[b] = EncodeUtf8(cp);
      t->char_to_byte[cp] = static_cast<uint8_t>(b);
    }
    return t;
  }();
  return *table;
}

// The GPT-2 regex ByteLevel uses when `use_regex` is set.
constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------
// Pipeline steps. Sequences in tokenizer.json are flattened into vectors.

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Normalize(std::string* text) const = 0;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void Normalize(std::string* text) const override {
    if (!text->empty()) text->insert(0, prefix_);
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(std::unique_ptr<Pattern> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void Normalize(std::string* text) const override {
    *text = pattern_->ReplaceAll(*text, content_);
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

// A pre-tokenized piece of text. `at_text_start`: it begins at offset 0 of
// the original text (Metaspace's prepend_scheme "first" looks at that).
struct Piece {
  std::string text;
  bool at_text_start;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void Split(std::vector<Piece>* pieces) const = 0;

 protected:
  // Replaces every piece by the parts `split` makes of it; only the first
  // part of a piece keeps its `at_text_start`.
  template <typename SplitFn>
  static void SplitEach(std::vector<Piece>* pieces, SplitFn split) {
    std::vector<Piece> out;
    for (Piece& piece : *pieces) {
      bool first = true;
      for (std::string& part : split(piece)) {
        out.push_back({std::move(part), first && piece.at_text_start});
        first = false;
      }
    }
    *pieces = std::move(out);
  }
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Pattern> pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void Split(std::vector<Piece>* pieces) const override {
    SplitEach(pieces, [this](const Piece& piece) {
      return SplitAt(piece.text, pattern_->FindAll(piece.text), behavior_, invert_);
    });
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  void Split(std::vector<Piece>* pieces) const override {
    const ByteLevelTable& table = GetByteLevelTable();
    SplitEach(pieces, [&](const Piece& piece) {
      std::string text = piece.text;
      if (add_prefix_space_ && !absl::StartsWith(text, " ")) text.insert(0, " ");
      std::vector<std::string> parts;
      if (regex_ != nullptr) {
        parts = SplitAt(text, regex_->FindAll(text), SplitBehavior::kIsolated, false);
      } else {
        parts.push_back(std::move(text));
      }
      for (std::string& part : parts) {
        std::string mapped;
        for (unsigned char b : part) mapped += table.byte_to_char[b];
        part = std::move(mapped);
      }
      return parts;
    });
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;  // null when use_regex is false
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)),
        space_(Pattern::Literal(" ")),
        marker_(Pattern::Literal(replacement_)),
        scheme_(scheme),
        split_(split) {}
  void Split(std::vector<Piece>* pieces) const override {
    SplitEach(pieces, [this](const Piece& piece) {
      std::string text = space_->ReplaceAll(piece.text, replacement_);
      const bool prepend = scheme_ == PrependScheme::kAlways ||
                           (scheme_ == PrependScheme::kFirst && piece.at_text_start);
      if (prepend && !absl::StartsWith(text, replacement_)) text.insert(0, replacement_);
      if (!split_) return std::vector<std::string>{std::move(text)};
      return SplitAt(text, marker_->FindAll(text), SplitBehavior::kMergedWithNext, false);
    });
  }

 private:
  std::string replacement_;
  std::unique_ptr<Pattern> space_;
  std::unique_ptr<Pattern> marker_;
  PrependScheme scheme_;
  bool split_;
};

// Decoders rewrite the list of token strings (tokenizers' decode_chain).
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void Decode(std::vector<std::string>* tokens) const = 0;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(std::unique_ptr<Pattern> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void Decode(std::vector<std::string>* tokens) const override {
    for (std::string& token : *tokens) token = pattern_->ReplaceAll(token, content_);
  }

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

// Runs of "<0xXX>" tokens become the UTF-8 text they spell; a run that is
// not valid UTF-8 becomes one U+FFFD per byte (as tokenizers does).
class ByteFallbackDecoder : public Decoder {
 public:
  void Decode(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    std::string bytes;
    size_t byte_count = 0;
    const auto flush = [&] {
      if (byte_count == 0) return;
      if (FirstInvalidUtf8(bytes) == absl::string_view::npos) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < byte_count; ++i) out.emplace_back(kReplacementChar);
      }
      bytes.clear();
      byte_count = 0;
    };
    for (std::string& token : *tokens) {
      int value = 0;
      if (ParseByteToken(token, &value)) {
        bytes.push_back(static_cast<char>(value));
        ++byte_count;
      } else {
        flush();
        out.push_back(std::move(token));
      }
    }
    flush();
    *tokens = std::move(out);
  }

 private:
  static bool ParseByteToken(absl::string_view token, int* value) {
    if (token.size() != 6 || !absl::StartsWith(token, "<0x") || token[5] != '>') return false;
    *value = 0;
    for (char c : token.substr(3, 2)) {
      int digit;
      if (c >= '0' && c <= '9') {
        digit = c - '0';
      } else if (c >= 'A' && c <= 'F') {
        digit = c - 'A' + 10;
      } else if (c >= 'a' && c <= 'f') {
        digit = c - 'a' + 10;
      } else {
        return false;
      }
      *value = *value * 16 + digit;
    }
    return true;
  }
};

class FuseDecoder : public Decoder {
 public:
  void Decode(std::vector<std::string>* tokens) const override {
    std::string fused = absl::StrJoin(*tokens, "");
    tokens->assign(1, std::move(fused));
  }
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(std::string content, int64_t start, int64_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void Decode(std::vector<std::string>* tokens) const override {
    for (std::string& token : *tokens) {
      absl::string_view view = token;
      for (int64_t i = 0; i < start_; ++i) {
        if (!absl::ConsumePrefix(&view, content_)) break;
      }
      for (int64_t i = 0; i < stop_; ++i) {
        if (!absl::ConsumeSuffix(&view, content_)) break;
      }
      token = std::string(view);
    }
  }

 private:
  std::string content_;  // one character
  int64_t start_;
  int64_t stop_;
};

// Maps the characters back to bytes and reads them as (lossy) UTF-8. A token
// with a character outside the table contributes its own bytes (added tokens).
class ByteLevelDecoder : public Decoder {
 public:
  void Decode(std::vector<std::string>* tokens) const override {
    const ByteLevelTable& table = GetByteLevelTable();
    std::string bytes;
    for (const std::string& token : *tokens) {
      std::string mapped;
      bool all_mapped = true;
      for (size_t i = 0; i < token.size() && all_mapped;) {
        size_t length;
        const auto it = table.char_to_byte.find(CodePointAt(token, i, &length));
        all_mapped = it != table.char_to_byte.end();
        if (all_mapped) mapped.push_back(static_cast<char>(it->second));
        i += length;
      }
      bytes += all_mapped ? mapped : token;
    }
    tokens->assign(1, LossyUtf8(bytes));
  }
};

// Replacement character → space; in the first token every replacement
// character is dropped unless the scheme is "never" (tokenizers' behaviour).
class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : marker_(Pattern::Literal(std::move(replacement))), scheme_(scheme) {}
  void Decode(std::vector<std::string>* tokens) const override {
    for (size_t i = 0; i < tokens->size(); ++i) {
      const bool drop = i == 0 && scheme_ != PrependScheme::kNever;
      (*tokens)[i] = marker_->ReplaceAll((*tokens)[i], drop ? "" : " ");
    }
  }

 private:
  std::unique_ptr<Pattern> marker_;
  PrependScheme scheme_;
};

// ---------------------------------------------------------------------------
// BPE model

class BpeModel {
 public:
  struct Options {
    std::optional<std::string> unk_token;
    bool fuse_unk = false;
    bool byte_fallback = false;
    bool ignore_merges = false;
  };

  BpeModel() = default;
  BpeModel(absl::flat_hash_map<std::string, int32_t> vocab, const Options& options)
      : vocab_(std::move(vocab)), options_(options) {
    // A map, not a vector: ids need not be dense, and a stray huge id in a
    // malformed file must not turn into a huge allocation.
    id_to_token_.reserve(vocab_.size());
    for (const auto& [token, id] : vocab_) {
      id_to_token_.emplace(id, token);
      end_id_ = std::max(end_id_, id + 1);
    }
    if (options_.unk_token.has_value()) unk_id_ = TokenToId(*options_.unk_token);
    for (int b = 0; b < 256; ++b) {
      byte_ids_[b] = TokenToId(absl::StrFormat("<0x%02X>", b)).value_or(-1);
    }
  }

  // A merge "left right" with the given rank; both parts and their
  // concatenation must be in the vocabulary.
  absl::Status AddMerge(const std::string& left, const std::string& right, int32_t rank) {
    const std::optional<int32_t> l = TokenToId(left), r = TokenToId(right),
                                 merged = TokenToId(left + right);
    if (!l || !r || !merged) {
      return absl::InvalidArgumentError(absl::StrCat("merge #", rank, " (\"", left, "\", \"", right,
                                                     "\") uses a token outside the vocabulary"));
    }
    merges_.try_emplace(PairKey(*l, *r), rank, *merged);
    return absl::OkStatus();
  }

  std::optional<int32_t> TokenToId(const std::string& token) const {
    const auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  const std::string* IdToToken(int32_t id) const {
    const auto it = id_to_token_.find(id);
    return it != id_to_token_.end() ? &it->second : nullptr;
  }
  int32_t end_id() const { return end_id_; }  // one past the largest id

  // Appends the ids of one pre-tokenized word.
  void Tokenize(absl::string_view word, std::vector<int32_t>* ids) const {
    if (options_.ignore_merges) {
      if (const auto it = vocab_.find(word); it != vocab_.end()) {
        ids->push_back(it->second);
        return;
      }
    }
    std::vector<Symbol> symbols = InitialSymbols(word);
    Merge(&symbols);
    for (const Symbol& s : symbols) {
      if (s.alive) ids->push_back(s.id);
    }
  }

 private:
  // One element of the word being merged: a doubly linked list over a vector,
  // so that merging never moves anything.
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };

  static uint64_t PairKey(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }

  // One symbol per character; characters outside the vocabulary become their
  // byte tokens (byte_fallback) or the unknown token (runs fused with
  // fuse_unk), or vanish when there is no unknown token either — as in
  // tokenizers' BPE::merge_word.
  std::vector<Symbol> InitialSymbols(absl::string_view word) const {
    std::vector<int32_t> ids;
    bool pending_unk = false;
    const auto push_unk = [&] {
      if (pending_unk) ids.push_back(*unk_id_);
      pending_unk = false;
    };
    std::string character;
    for (size_t i = 0; i < word.size();) {
      const size_t length = NextUtf8(word, i).length;
      character = std::string(word.substr(i, length));
      i += length;
      if (const auto it = vocab_.find(character); it != vocab_.end()) {
        push_unk();
        ids.push_back(it->second);
        continue;
      }
      if (options_.byte_fallback && std::all_of(character.begin(), character.end(), [&](char c) {
            return byte_ids_[static_cast<unsigned char>(c)] >= 0;
          })) {
        push_unk();
        for (unsigned char c : character) ids.push_back(byte_ids_[c]);
        continue;
      }
      if (!unk_id_.has_value()) continue;
      if (!options_.fuse_unk) push_unk();
      pending_unk = true;
    }
    push_unk();
    std::vector<Symbol> symbols(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      symbols[i] = {ids[i], static_cast<int32_t>(i) - 1,
                    i + 1 < ids.size() ? static_cast<int32_t>(i + 1) : -1, true};
    }
    return symbols;
  }

  // Applies merges lowest rank first, leftmost first among equal ranks,
  // with a priority queue: O(n log n) in the word length.
  void Merge(std::vector<Symbol>* symbols) const {
    struct Candidate {
      int32_t rank;
      int32_t pos;
      int32_t merged_id;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    std::vector<Symbol>& s = *symbols;
    const auto consider = [&](int32_t pos) {
      if (pos < 0 || s[pos].next < 0) return;
      const auto it = merges_.find(PairKey(s[pos].id, s[s[pos].next].id));
      if (it != merges_.end()) queue.push({it->second.first, pos, it->second.second});
    };
    for (size_t i = 0; i + 1 < s.size(); ++i) consider(static_cast<int32_t>(i));
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      Symbol& left = s[top.pos];
      if (!left.alive || left.next < 0) continue;
      // The pair may have changed since it was queued.
      const auto it = merges_.find(PairKey(left.id, s[left.next].id));
      if (it == merges_.end() || it->second.second != top.merged_id) continue;
      Symbol& right = s[left.next];
      left.id = top.merged_id;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) s[right.next].prev = top.pos;
      consider(left.prev);
      consider(top.pos);
    }
  }

  absl::flat_hash_map<std::string, int32_t> vocab_;
  absl::flat_hash_map<int32_t, std::string> id_to_token_;
  int32_t end_id_ = 0;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // → (rank, merged id)
  Options options_;
  std::optional<int32_t> unk_id_;
  std::array<int32_t, 256> byte_ids_{};  // "<0xXX>" token ids, -1 where absent
};

// ---------------------------------------------------------------------------
// Added tokens

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

// Finds added tokens like tokenizers' AddedVocabulary::find_matches: the
// leftmost, then longest token wins; a single_word token must not touch a
// word character; lstrip/rstrip take the whitespace beside the token along.
class AddedTokenMatcher {
 public:
  AddedTokenMatcher() = default;
  AddedTokenMatcher(std::vector<const AddedToken*> tokens, const Regex* word_char)
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

  std::vector<Segment> Split(absl::string_view text) const {
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

 private:
  const AddedToken* LongestAt(absl::string_view text, size_t pos) const {
    for (const AddedToken* token : by_first_byte_[static_cast<unsigned char>(text[pos])]) {
      if (absl::StartsWith(text.substr(pos), token->content)) return token;
    }
    return nullptr;
  }
  bool TouchesWordBefore(absl::string_view text, size_t pos) const {
    if (pos == 0) return false;
    size_t prev = pos - 1;
    while (prev > 0 && (static_cast<unsigned char>(text[prev]) & 0xC0) == 0x80) --prev;
    return word_char_->MatchesAt(text, prev);
  }
  bool TouchesWordAfter(absl::string_view text, size_t pos) const {
    return pos < text.size() && word_char_->MatchesAt(text, pos);
  }

  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;
  const Regex* word_char_ = nullptr;
};

// Rust's char::is_alphanumeric, which decides single_word matches.
constexpr char kWordCharRegex[] = R"([\p{Alphabetic}\p{N}])";

// ---------------------------------------------------------------------------
// tokenizer.json reading

// Field access that turns a missing or mistyped field into an error naming
// the file and the field's path (e.g. "pre_tokenizer.pretokenizers[1].type").
class JsonReader {
 public:
  explicit JsonReader(std::string source) : source_(std::move(source)) {}

  absl::Status Error(absl::string_view path, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", path, "': ", problem));
  }

  static std::string Join(absl::string_view path, absl::string_view key) {
    return path.empty() ? std::string(key) : absl::StrCat(path, ".", key);
  }

  absl::StatusOr<const json*> Required(const json& obj, absl::string_view path,
                                       const char* key) const {
    if (!obj.is_object()) return Error(path, "expected an object");
    const auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return Error(Join(path, key), "missing");
    return &*it;
  }

  absl::StatusOr<std::string> String(const json& obj, absl::string_view path,
                                     const char* key) const {
    ASSIGN_OR_RETURN(const json* value, Required(obj, path, key));
    if (!value->is_string()) return Error(Join(path, key), "expected a string");
    return value->get<std::string>();
  }

  // Optional fields: absent or null gives `fallback`.
  absl::StatusOr<std::optional<std::string>> OptString(const json& obj, absl::string_view path,
                                                       const char* key) const {
    const auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return std::optional<std::string>();
    if (!it->is_string()) return Error(Join(path, key), "expected a string");
    return std::optional<std::string>(it->get<std::string>());
  }
  absl::StatusOr<bool> OptBool(const json& obj, absl::string_view path, const char* key,
                               bool fallback) const {
    const auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) return Error(Join(path, key), "expected true or false");
    return it->get<bool>();
  }
  absl::StatusOr<int64_t> OptInt(const json& obj, absl::string_view path, const char* key,
                                 int64_t fallback) const {
    const auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return fallback;
    if (!it->is_number_integer()) return Error(Join(path, key), "expected an integer");
    return it->get<int64_t>();
  }

  absl::StatusOr<const json*> Array(const json& obj, absl::string_view path,
                                    const char* key) const {
    ASSIGN_OR_RETURN(const json* value, Required(obj, path, key));
    if (!value->is_array()) return Error(Join(path, key), "expected an array");
    return value;
  }

  // {"String": literal} or {"Regex": pattern}.
  absl::StatusOr<std::unique_ptr<Pattern>> ReadPattern(const json& obj,
                                                       absl::string_view path) const {
    ASSIGN_OR_RETURN(const json* pattern, Required(obj, path, "pattern"));
    const std::string where = Join(path, "pattern");
    if (pattern->is_object() && pattern->contains("String")) {
      ASSIGN_OR_RETURN(std::string literal, String(*pattern, where, "String"));
      return Pattern::Literal(std::move(literal));
    }
    if (pattern->is_object() && pattern->contains("Regex")) {
      ASSIGN_OR_RETURN(std::string regex, String(*pattern, where, "Regex"));
      ASSIGN_OR_RETURN(std::unique_ptr<Regex> compiled,
                       Regex::Compile(regex, absl::StrCat(source_, ": field '", where, "'")));
      return Pattern::FromRegex(std::move(compiled));
    }
    return Error(where, "expected {\"String\": ...} or {\"Regex\": ...}");
  }

  absl::StatusOr<PrependScheme> ReadPrependScheme(const json& obj, absl::string_view path) const {
    ASSIGN_OR_RETURN(std::optional<std::string> scheme, OptString(obj, path, "prepend_scheme"));
    if (!scheme.has_value()) {
      // Files written before prepend_scheme existed say add_prefix_space.
      ASSIGN_OR_RETURN(bool add_prefix_space, OptBool(obj, path, "add_prefix_space", true));
      return add_prefix_space ? PrependScheme::kAlways : PrependScheme::kNever;
    }
    if (*scheme == "always") return PrependScheme::kAlways;
    if (*scheme == "first") return PrependScheme::kFirst;
    if (*scheme == "never") return PrependScheme::kNever;
    return Error(Join(path, "prepend_scheme"),
                 absl::StrCat("unknown value \"", *scheme, "\" (expected always, first or never)"));
  }

  const std::string& source() const { return source_; }

 private:
  std::string source_;
};

// Calls `read` on `value`, or on each member of its `list_key` array when it
// is a {"type": "Sequence"}, so that nested sequences flatten.
template <typename ReadOne>
absl::Status ForEachInSequence(const JsonReader& r, const json& value, const std::string& path,
                               const char* list_key, ReadOne read) {
  ASSIGN_OR_RETURN(std::string type, r.String(value, path, "type"));
  if (type != "Sequence") return read(value, path, type);
  ASSIGN_OR_RETURN(const json* list, r.Array(value, path, list_key));
  for (size_t i = 0; i < list->size(); ++i) {
    RETURN_IF_ERROR(ForEachInSequence(r, (*list)[i], absl::StrCat(path, ".", list_key, "[", i, "]"),
                                      list_key, read));
  }
  return absl::OkStatus();
}

absl::Status ReadNormalizers(const JsonReader& r, const json& value,
                             std::vector<std::unique_ptr<Normalizer>>* out) {
  return ForEachInSequence(
      r, value, "normalizer", "normalizers",
      [&](const json& n, const std::string& path, const std::string& type) -> absl::Status {
        if (type == "Prepend") {
          ASSIGN_OR_RETURN(std::string prefix, r.String(n, path, "prepend"));
          out->push_back(std::make_unique<PrependNormalizer>(std::move(prefix)));
        } else if (type == "Replace") {
          ASSIGN_OR_RETURN(std::unique_ptr<Pattern> pattern, r.ReadPattern(n, path));
          ASSIGN_OR_RETURN(std::string content, r.String(n, path, "content"));
          out->push_back(
              std::make_unique<ReplaceNormalizer>(std::move(pattern), std::move(content)));
        } else {
          return r.Error(JsonReader::Join(path, "type"),
                         absl::StrCat("unsupported normalizer \"", type,
                                      "\" (supported: Sequence, Prepend, Replace)"));
        }
        return absl::OkStatus();
      });
}

absl::StatusOr<SplitBehavior> ReadSplitBehavior(const JsonReader& r, const json& obj,
                                                const std::string& path) {
  ASSIGN_OR_RETURN(std::string behavior, r.String(obj, path, "behavior"));
  if (behavior == "Removed") return SplitBehavior::kRemoved;
  if (behavior == "Isolated") return SplitBehavior::kIsolated;
  if (behavior == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (behavior == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (behavior == "Contiguous") return SplitBehavior::kContiguous;
  return r.Error(JsonReader::Join(path, "behavior"),
                 absl::StrCat("unknown split behavior \"", behavior, "\""));
}

absl::Status ReadPreTokenizers(const JsonReader& r, const json& value,
                               std::vector<std::unique_ptr<PreTokenizer>>* out) {
  return ForEachInSequence(
      r, value, "pre_tokenizer", "pretokenizers",
      [&](const json& p, const std::string& path, const std::string& type) -> absl::Status {
        if (type == "Split") {
          ASSIGN_OR_RETURN(std::unique_ptr<Pattern> pattern, r.ReadPattern(p, path));
          ASSIGN_OR_RETURN(SplitBehavior behavior, ReadSplitBehavior(r, p, path));
          ASSIGN_OR_RETURN(bool invert, r.OptBool(p, path, "invert", false));
          out->push_back(std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert));
        } else if (type == "ByteLevel") {
          ASSIGN_OR_RETURN(bool add_prefix_space, r.OptBool(p, path, "add_prefix_space", true));
          ASSIGN_OR_RETURN(bool use_regex, r.OptBool(p, path, "use_regex", true));
          std::unique_ptr<Regex> regex;
          if (use_regex) {
            ASSIGN_OR_RETURN(regex, Regex::Compile(kGpt2Regex, "ByteLevel pre-tokenizer"));
          }
          out->push_back(
              std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(regex)));
        } else if (type == "Metaspace") {
          ASSIGN_OR_RETURN(std::string replacement, r.String(p, path, "replacement"));
          ASSIGN_OR_RETURN(PrependScheme scheme, r.ReadPrependScheme(p, path));
          ASSIGN_OR_RETURN(bool split, r.OptBool(p, path, "split", true));
          out->push_back(
              std::make_unique<MetaspacePreTokenizer>(std::move(replacement), scheme, split));
        } else {
          return r.Error(JsonReader::Join(path, "type"),
                         absl::StrCat("unsupported pre-tokenizer \"", type,
                                      "\" (supported: Sequence, Split, ByteLevel, Metaspace)"));
        }
        return absl::OkStatus();
      });
}

absl::Status ReadDecoders(const JsonReader& r, const json& value,
                          std::vector<std::unique_ptr<Decoder>>* out) {
  return ForEachInSequence(
      r, value, "decoder", "decoders",
      [&](const json& d, const std::string& path, const std::string& type) -> absl::Status {
        if (type == "Replace") {
          ASSIGN_OR_RETURN(std::unique_ptr<Pattern> pattern, r.ReadPattern(d, path));
          ASSIGN_OR_RETURN(std::string content, r.String(d, path, "content"));
          out->push_back(std::make_unique<ReplaceDecoder>(std::move(pattern), std::move(content)));
        } else if (type == "ByteFallback") {
          out->push_back(std::make_unique<ByteFallbackDecoder>());
        } else if (type == "Fuse") {
          out->push_back(std::make_unique<FuseDecoder>());
        } else if (type == "Strip") {
          ASSIGN_OR_RETURN(std::string content, r.String(d, path, "content"));
          ASSIGN_OR_RETURN(int64_t start, r.OptInt(d, path, "start", 0));
          ASSIGN_OR_RETURN(int64_t stop, r.OptInt(d, path, "stop", 0));
          out->push_back(std::make_unique<StripDecoder>(std::move(content), start, stop));
        } else if (type == "ByteLevel") {
          out->push_back(std::make_unique<ByteLevelDecoder>());
        } else if (type == "Metaspace") {
          ASSIGN_OR_RETURN(std::string replacement, r.String(d, path, "replacement"));
          ASSIGN_OR_RETURN(PrependScheme scheme, r.ReadPrependScheme(d, path));
          out->push_back(std::make_unique<MetaspaceDecoder>(std::move(replacement), scheme));
        } else {
          return r.Error(JsonReader::Join(path, "type"),
                         absl::StrCat("unsupported decoder \"", type,
                                      "\" (supported: Sequence, Replace, ByteFallback, Fuse, "
                                      "Strip, ByteLevel, Metaspace)"));
        }
        return absl::OkStatus();
      });
}

// A post-processing template: ids of special tokens around the sequence
// (`sequence` marks where the encoded text goes).
struct TemplateItem {
  bool sequence;
  std::vector<int32_t> ids;
};
using Template = std::vector<TemplateItem>;

absl::Status ReadPostProcessors(const JsonReader& r, const json& value,
                                std::vector<Template>* out) {
  return ForEachInSequence(
      r, value, "post_processor", "processors",
      [&](const json& p, const std::string& path, const std::string& type) -> absl::Status {
        // ByteLevel only trims offsets, which have no effect on ids.
        if (type == "ByteLevel") return absl::OkStatus();
        if (type != "TemplateProcessing") {
          return r.Error(JsonReader::Join(path, "type"),
                         absl::StrCat("unsupported post-processor \"", type,
                                      "\" (supported: Sequence, TemplateProcessing, ByteLevel)"));
        }
        ASSIGN_OR_RETURN(const json* single, r.Array(p, path, "single"));
        ASSIGN_OR_RETURN(const json* specials, r.Required(p, path, "special_tokens"));
        Template tmpl;
        for (size_t i = 0; i < single->size(); ++i) {
          const json& item = (*single)[i];
          const std::string item_path = absl::StrCat(path, ".single[", i, "]");
          if (item.is_object() && item.contains("Sequence")) {
            ASSIGN_OR_RETURN(std::string id,
                             r.String(item["Sequence"], item_path + ".Sequence", "id"));
            if (id != "A") return r.Error(item_path + ".Sequence.id", "expected \"A\"");
            tmpl.push_back({true, {}});
            continue;
          }
          if (!item.is_object() || !item.contains("SpecialToken")) {
            return r.Error(item_path, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
          }
          ASSIGN_OR_RETURN(std::string name,
                           r.String(item["SpecialToken"], item_path + ".SpecialToken", "id"));
          const std::string special_path = JsonReader::Join(path, "special_tokens");
          ASSIGN_OR_RETURN(const json* special, r.Required(*specials, special_path, name.c_str()));
          const std::string ids_path = JsonReader::Join(special_path, name);
          ASSIGN_OR_RETURN(const json* ids, r.Array(*special, ids_path, "ids"));
          TemplateItem entry{false, {}};
          for (const json& id : *ids) {
            if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
                id.get<int64_t>() >= std::numeric_limits<int32_t>::max()) {
              return r.Error(ids_path + ".ids", "expected token ids");
            }
            entry.ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
          }
          tmpl.push_back(std::move(entry));
        }
        out->push_back(std::move(tmpl));
        return absl::OkStatus();
      });
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return contents.str();
}

// ---------------------------------------------------------------------------

class BpeTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Build(absl::string_view tokenizer_json,
                                                          absl::string_view config_json,
                                                          absl::string_view source) {
    RETURN_IF_ERROR(CheckJsonDepth(tokenizer_json, absl::StrCat(source, "/tokenizer.json")));
    RETURN_IF_ERROR(CheckJsonDepth(config_json, absl::StrCat(source, "/tokenizer_config.json")));
    json tok = json::parse(tokenizer_json, nullptr, /*allow_exceptions=*/false);
    if (tok.is_discarded() || !tok.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": tokenizer.json is not a JSON object"));
    }
    json config = json::object();
    if (!config_json.empty()) {
      config = json::parse(config_json, nullptr, /*allow_exceptions=*/false);
      if (config.is_discarded() || !config.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": tokenizer_config.json is not a JSON object"));
      }
    }
    auto tokenizer = std::unique_ptr<BpeTokenizer>(new BpeTokenizer());
    // Whatever slipped past the checks (a string too large for int32, say)
    // must not escape as an exception.
    try {
      RETURN_IF_ERROR(tokenizer->Init(tok, config, source));
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": malformed tokenizer: ", e.what()));
    }
    return std::unique_ptr<Tokenizer>(std::move(tokenizer));
  }

  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text,
                                              bool add_special_tokens) const override {
    if (const size_t bad = FirstInvalidUtf8(text); bad != absl::string_view::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("text to encode is not valid UTF-8 (byte ", bad, " of ", text.size(), ")"));
    }
    std::vector<int32_t> ids;
    for (const Segment& segment : raw_matcher_.Split(text)) {
      if (segment.id >= 0) {
        ids.push_back(segment.id);
        continue;
      }
      std::string normalized(segment.text);
      for (const auto& normalizer : normalizers_) normalizer->Normalize(&normalized);
      for (const Segment& part : normalized_matcher_.Split(normalized)) {
        if (part.id >= 0) {
          ids.push_back(part.id);
          continue;
        }
        std::vector<Piece> pieces{{std::string(part.text), segment.begin == 0 && part.begin == 0}};
        for (const auto& pre_tokenizer : pre_tokenizers_) pre_tokenizer->Split(&pieces);
        for (const Piece& piece : pieces) {
          if (!piece.text.empty()) model_.Tokenize(piece.text, &ids);
        }
      }
    }
    if (!add_special_tokens) return ids;
    for (const Template& tmpl : templates_) {
      std::vector<int32_t> with_specials;
      for (const TemplateItem& item : tmpl) {
        const std::vector<int32_t>& part = item.sequence ? ids : item.ids;
        with_specials.insert(with_specials.end(), part.begin(), part.end());
      }
      ids = std::move(with_specials);
    }
    return ids;
  }

  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int32_t id : ids) {
      if (const std::string* token = TokenToDecode(id, skip_special_tokens)) {
        tokens.push_back(*token);
      }
    }
    // Without a decoder tokenizers joins the tokens with spaces.
    if (decoders_.empty()) return absl::StrJoin(tokens, " ");
    for (const auto& decoder : decoders_) decoder->Decode(&tokens);
    return absl::StrJoin(tokens, "");
  }

  bool IsDroppedByDecode(int32_t id, bool skip_special_tokens) const override {
    return TokenToDecode(id, skip_special_tokens) == nullptr;
  }

  int64_t vocab_size() const override {
    int64_t end = model_.end_id();
    for (const AddedToken& token : added_) end = std::max(end, int64_t{token.id} + 1);
    return end;
  }
  std::optional<int32_t> bos_token_id() const override { return bos_id_; }
  std::optional<int32_t> eos_token_id() const override { return eos_id_; }
  std::string IdToPiece(int32_t id) const override {
    if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      return added_[it->second].content;
    }
    const std::string* token = model_.IdToToken(id);
    return token != nullptr ? *token : std::string();
  }
  const std::string& chat_template() const override { return chat_template_; }

 private:
  BpeTokenizer() = default;

  // The string the decoders get for `id`; null when Decode drops it (outside
  // the vocabulary, or a special token while skipping them).
  const std::string* TokenToDecode(int32_t id, bool skip_special_tokens) const {
    if (const auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      const AddedToken& token = added_[it->second];
      return skip_special_tokens && token.special ? nullptr : &token.content;
    }
    return model_.IdToToken(id);
  }

  absl::Status Init(const json& tok, const json& config, absl::string_view source) {
    const JsonReader r(absl::StrCat(source, "/tokenizer.json"));
    const JsonReader c(absl::StrCat(source, "/tokenizer_config.json"));

    // transformers 5 rebuilds Llama tokenizers from their config instead of
    // trusting tokenizer.json's normalizer, pre-tokenizer and decoder
    // (LlamaTokenizer.__init__): Metaspace with prepend scheme "always"
    // (legacy) or "first", no normalizer, and a Strip decoder only when a
    // prefix space is added. Matching `AutoTokenizer` means doing the same.
    ASSIGN_OR_RETURN(std::optional<std::string> tokenizer_class,
                     c.OptString(config, "", "tokenizer_class"));
    const bool llama_rebuild =
        tokenizer_class == "LlamaTokenizer" || tokenizer_class == "LlamaTokenizerFast";

    RETURN_IF_ERROR(InitModel(r, tok, llama_rebuild));
    RETURN_IF_ERROR(InitAddedTokens(r, tok));
    RETURN_IF_ERROR(AddConfigSpecialTokens(c, config));

    if (llama_rebuild) {
      ASSIGN_OR_RETURN(bool add_prefix_space, c.OptBool(config, "", "add_prefix_space", true));
      ASSIGN_OR_RETURN(bool legacy, c.OptBool(config, "", "legacy", false));
      const PrependScheme scheme = !add_prefix_space ? PrependScheme::kNever
                                   : legacy          ? PrependScheme::kAlways
                                                     : PrependScheme::kFirst;
      pre_tokenizers_.push_back(std::make_unique<MetaspacePreTokenizer>("▁", scheme, false));
      decoders_.push_back(std::make_unique<ReplaceDecoder>(Pattern::Literal("▁"), " "));
      decoders_.push_back(std::make_unique<ByteFallbackDecoder>());
      decoders_.push_back(std::make_unique<FuseDecoder>());
      if (add_prefix_space) decoders_.push_back(std::make_unique<StripDecoder>(" ", 1, 0));
    } else {
      if (const auto it = tok.find("normalizer"); it != tok.end() && !it->is_null()) {
        RETURN_IF_ERROR(ReadNormalizers(r, *it, &normalizers_));
      }
      if (const auto it = tok.find("pre_tokenizer"); it != tok.end() && !it->is_null()) {
        RETURN_IF_ERROR(ReadPreTokenizers(r, *it, &pre_tokenizers_));
      }
      if (const auto it = tok.find("decoder"); it != tok.end() && !it->is_null()) {
        RETURN_IF_ERROR(ReadDecoders(r, *it, &decoders_));
      }
    }

    ASSIGN_OR_RETURN(bos_id_, ConfigTokenId(c, config, "bos_token"));
    ASSIGN_OR_RETURN(eos_id_, ConfigTokenId(c, config, "eos_token"));
    // BOS/EOS come from tokenizer.json's post-processor alone: with a
    // tokenizer.json present, transformers 5 drops the config's
    // add_bos_token/add_eos_token (PreTrainedTokenizerBase._from_pretrained)
    // and adds nothing when there is no post-processor.
    if (const auto it = tok.find("post_processor"); it != tok.end() && !it->is_null()) {
      RETURN_IF_ERROR(ReadPostProcessors(r, *it, &templates_));
    }
    // Encode returns these ids as they are: each must be a token the model has.
    for (const Template& tmpl : templates_) {
      for (const TemplateItem& item : tmpl) {
        for (int32_t id : item.ids) {
          if (id < 0 || id >= vocab_size()) {
            return r.Error("post_processor",
                           absl::StrCat("special token id ", id, " is outside the vocabulary (",
                                        vocab_size(), " ids)"));
          }
        }
      }
    }

    if (const auto it = config.find("chat_template"); it != config.end() && !it->is_null()) {
      if (!it->is_string()) return c.Error("chat_template", "expected a string");
      chat_template_ = it->get<std::string>();
    }
    return absl::OkStatus();
  }

  absl::Status InitModel(const JsonReader& r, const json& tok, bool llama_rebuild) {
    ASSIGN_OR_RETURN(const json* model, r.Required(tok, "", "model"));
    ASSIGN_OR_RETURN(std::string type, r.String(*model, "model", "type"));
    if (type != "BPE") {
      return r.Error("model.type",
                     absl::StrCat("unsupported model \"", type, "\" (only BPE is supported)"));
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      ASSIGN_OR_RETURN(std::optional<std::string> value, r.OptString(*model, "model", key));
      if (value.has_value() && !value->empty()) {
        return r.Error(JsonReader::Join("model", key), "not supported (expected null)");
      }
    }
    if (const auto it = model->find("dropout"); it != model->end() && !it->is_null()) {
      if (!it->is_number() || it->get<double>() != 0.0) {
        return r.Error("model.dropout", "BPE dropout is for training (expected null)");
      }
    }
    BpeModel::Options options;
    if (llama_rebuild) {
      // LlamaTokenizer's own BPE(...) call: no unknown token.
      options.fuse_unk = true;
      options.byte_fallback = true;
    } else {
      ASSIGN_OR_RETURN(options.unk_token, r.OptString(*model, "model", "unk_token"));
      ASSIGN_OR_RETURN(options.fuse_unk, r.OptBool(*model, "model", "fuse_unk", false));
      ASSIGN_OR_RETURN(options.byte_fallback, r.OptBool(*model, "model", "byte_fallback", false));
      ASSIGN_OR_RETURN(options.ignore_merges, r.OptBool(*model, "model", "ignore_merges", false));
    }

    ASSIGN_OR_RETURN(const json* vocab_json, r.Required(*model, "model", "vocab"));
    if (!vocab_json->is_object()) return r.Error("model.vocab", "expected an object");
    absl::flat_hash_map<std::string, int32_t> vocab;
    vocab.reserve(vocab_json->size());
    for (const auto& [token, id] : vocab_json->items()) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
          id.get<int64_t>() >= std::numeric_limits<int32_t>::max()) {
        return r.Error("model.vocab",
                       absl::StrCat("id of \"", token, "\" is not a valid token id"));
      }
      vocab.emplace(token, id.get<int32_t>());
    }
    model_ = BpeModel(std::move(vocab), options);

    ASSIGN_OR_RETURN(const json* merges, r.Array(*model, "model", "merges"));
    for (size_t i = 0; i < merges->size(); ++i) {
      const json& merge = (*merges)[i];
      const std::string path = absl::StrCat("model.merges[", i, "]");
      std::string left, right;
      // Older files write "left right", newer ones ["left", "right"].
      if (merge.is_string()) {
        const std::string text = merge.get<std::string>();
        const size_t space = text.find(' ');
        if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
          return r.Error(path, "expected two tokens separated by one space");
        }
        left = text.substr(0, space);
        right = text.substr(space + 1);
      } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() &&
                 merge[1].is_string()) {
        left = merge[0].get<std::string>();
        right = merge[1].get<std::string>();
      } else {
        return r.Error(path, "expected \"left right\" or [\"left\", \"right\"]");
      }
      if (absl::Status status = model_.AddMerge(left, right, static_cast<int32_t>(i));
          !status.ok()) {
        return r.Error(path, status.message());
      }
    }
    return absl::OkStatus();
  }

  absl::Status InitAddedTokens(const JsonReader& r, const json& tok) {
    if (const auto it = tok.find("added_tokens"); it != tok.end() && !it->is_null()) {
      if (!it->is_array()) return r.Error("added_tokens", "expected an array");
      for (size_t i = 0; i < it->size(); ++i) {
        const json& entry = (*it)[i];
        const std::string path = absl::StrCat("added_tokens[", i, "]");
        AddedToken token;
        ASSIGN_OR_RETURN(token.content, r.String(entry, path, "content"));
        ASSIGN_OR_RETURN(int64_t id, r.OptInt(entry, path, "id", -1));
        if (id < 0 || id >= std::numeric_limits<int32_t>::max()) {
          return r.Error(path + ".id", "expected a token id");
        }
        token.id = static_cast<int32_t>(id);
        ASSIGN_OR_RETURN(token.special, r.OptBool(entry, path, "special", false));
        ASSIGN_OR_RETURN(token.lstrip, r.OptBool(entry, path, "lstrip", false));
        ASSIGN_OR_RETURN(token.rstrip, r.OptBool(entry, path, "rstrip", false));
        ASSIGN_OR_RETURN(token.normalized, r.OptBool(entry, path, "normalized", !token.special));
        ASSIGN_OR_RETURN(token.single_word, r.OptBool(entry, path, "single_word", false));
        AddToken(std::move(token));
      }
    }
    return BuildMatchers(r.source());
  }

  void AddToken(AddedToken token) {
    added_by_id_[token.id] = added_.size();
    added_by_content_[token.content] = added_.size();
    added_.push_back(std::move(token));
  }

  // transformers registers the config's named special tokens (bos_token, …)
  // as special added tokens when tokenizer.json lacks them.
  absl::Status AddConfigSpecialTokens(const JsonReader& c, const json& config) {
    std::vector<std::pair<const json*, std::string>> entries;
    for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                            "cls_token", "mask_token"}) {
      if (const auto it = config.find(key); it != config.end() && !it->is_null()) {
        entries.emplace_back(&*it, key);
      }
    }
    for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
      const auto it = config.find(key);
      if (it == config.end() || !it->is_array()) continue;
      for (size_t i = 0; i < it->size(); ++i) {
        entries.emplace_back(&(*it)[i], absl::StrCat(key, "[", i, "]"));
      }
    }
    bool added_any = false;
    for (const auto& [value, path] : entries) {
      AddedToken token;
      token.special = true;
      if (value->is_string()) {
        token.content = value->get<std::string>();
      } else if (value->is_object()) {
        ASSIGN_OR_RETURN(token.content, c.String(*value, path, "content"));
        ASSIGN_OR_RETURN(token.lstrip, c.OptBool(*value, path, "lstrip", false));
        ASSIGN_OR_RETURN(token.rstrip, c.OptBool(*value, path, "rstrip", false));
        ASSIGN_OR_RETURN(token.normalized, c.OptBool(*value, path, "normalized", false));
        ASSIGN_OR_RETURN(token.single_word, c.OptBool(*value, path, "single_word", false));
      } else {
        return c.Error(path, "expected a string or {\"content\": ...}");
      }
      if (token.content.empty() || added_by_content_.contains(token.content)) continue;
      const std::optional<int32_t> id = model_.TokenToId(token.content);
      if (!id.has_value() && vocab_size() >= std::numeric_limits<int32_t>::max()) {
        return c.Error(path, "is a new token, but no token id is left after the vocabulary's");
      }
      token.id = id.value_or(static_cast<int32_t>(vocab_size()));
      AddToken(std::move(token));
      added_any = true;
    }
    return added_any ? BuildMatchers(c.source()) : absl::OkStatus();
  }

  absl::Status BuildMatchers(absl::string_view source) {
    std::vector<const AddedToken*> raw, normalized;
    bool single_word = false;
    for (const AddedToken& token : added_) {
      (token.normalized ? normalized : raw).push_back(&token);
      single_word |= token.single_word;
    }
    if (single_word && word_char_ == nullptr) {
      ASSIGN_OR_RETURN(word_char_, Regex::Compile(kWordCharRegex, source));
    }
    raw_matcher_ = AddedTokenMatcher(raw, word_char_.get());
    normalized_matcher_ = AddedTokenMatcher(normalized, word_char_.get());
    return absl::OkStatus();
  }

  // The id of tokenizer_config.json's `key` token (a string or {"content"}).
  absl::StatusOr<std::optional<int32_t>> ConfigTokenId(const JsonReader& c, const json& config,
                                                       const char* key) const {
    const auto it = config.find(key);
    if (it == config.end() || it->is_null()) return std::optional<int32_t>();
    std::string content;
    if (it->is_string()) {
      content = it->get<std::string>();
    } else {
      ASSIGN_OR_RETURN(content, c.String(*it, key, "content"));
    }
    if (const auto added = added_by_content_.find(content); added != added_by_content_.end()) {
      return std::optional<int32_t>(added_[added->second].id);
    }
    if (std::optional<int32_t> id = model_.TokenToId(content)) return id;
    return c.Error(key, absl::StrCat("token \"", content, "\" is not in the vocabulary"));
  }

  BpeModel model_;
  std::vector<AddedToken> added_;
  absl::flat_hash_map<int32_t, size_t> added_by_id_;  // → index in added_
  absl::flat_hash_map<std::string, size_t> added_by_content_;
  std::unique_ptr<Regex> word_char_;  // only when some token is single_word
  AddedTokenMatcher raw_matcher_;
  AddedTokenMatcher normalized_matcher_;
  std::vector<std::unique_ptr<Normalizer>> normalizers_;
  std::vector<std::unique_ptr<PreTokenizer>> pre_tokenizers_;
  std::vector<std::unique_ptr<Decoder>> decoders_;
  std::vector<Template> templates_;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
  std::string chat_template_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  ASSIGN_OR_RETURN(std::string tokenizer_json, ReadFile(model_dir + "/tokenizer.json"));
  std::string config_json;
  if (absl::StatusOr<std::string> config = ReadFile(model_dir + "/tokenizer_config.json");
      config.ok()) {
    config_json = *std::move(config);
  } else if (!absl::IsNotFound(config.status())) {
    return config.status();
  }
  return FromJson(tokenizer_json, config_json, model_dir);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(
    absl::string_view tokenizer_json, absl::string_view tokenizer_config_json,
    absl::string_view source) {
  return BpeTokenizer::Build(tokenizer_json, tokenizer_config_json, source);
}

// ---------------------------------------------------------------------------
// IncrementalDecoder
//
// As in vLLM: each step decodes a short window ids[prefix_offset_, end) and
// emits what it adds to the decoding of ids[prefix_offset_, read_offset_).
// Decoders treat the first token of their input specially (Strip drops a
// leading space, Metaspace drops the marker), so the window must start at a
// token that is neither the first visible one of a longer text nor inside a
// character: its decoding must be non-empty and not start with U+FFFD —
// otherwise the window reaches further back.

namespace {

constexpr size_t kInitialWindow = 5;  // prompt tokens re-decoded (vLLM's choice)

bool IsGoodWindowStart(const Tokenizer& tokenizer, absl::Span<const int32_t> window,
                       bool skip_special_tokens) {
  const std::string text = tokenizer.Decode(window, skip_special_tokens);
  return !text.empty() && !absl::StartsWith(text, kReplacementChar);
}

}  // namespace

IncrementalDecoder::IncrementalDecoder(const Tokenizer& tokenizer, std::vector<int32_t> prompt_ids,
                                       bool skip_special_tokens)
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

}  // namespace loraserve::model
