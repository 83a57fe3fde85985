#include "server/tokenizer/pipeline.h"

#include <algorithm>
#include <array>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "base/status_macros.h"
#include "server/tokenizer/utf8.h"

namespace loraserve::model::tokenizer_internal {
namespace {

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

// Replaces every piece by the parts `split` makes of it; only the first
// part of a piece keeps its `at_text_start`.
template <typename SplitFn>
void SplitEach(std::vector<Piece>* pieces, SplitFn split) {
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

// "<0xXX>" → XX (ByteFallback's byte tokens).
bool ParseByteToken(absl::string_view token, int* value) {
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

// The GPT-2 regex ByteLevel uses when `use_regex` is set.
constexpr char kGpt2Regex[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

}  // namespace

// ---------------------------------------------------------------------------
// Normalizers

void PrependNormalizer::Normalize(std::string* text) const {
  if (!text->empty()) text->insert(0, prefix_);
}

void ReplaceNormalizer::Normalize(std::string* text) const {
  *text = pattern_->ReplaceAll(*text, content_);
}

// ---------------------------------------------------------------------------
// Pre-tokenizers

void SplitPreTokenizer::Split(std::vector<Piece>* pieces) const {
  SplitEach(pieces, [this](const Piece& piece) {
    return SplitAt(piece.text, pattern_->FindAll(piece.text), behavior_, invert_);
  });
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ByteLevelPreTokenizer::Create(bool add_prefix_space,
                                                                            bool use_regex) {
  std::unique_ptr<Regex> regex;
  if (use_regex) {
    ASSIGN_OR_RETURN(regex, Regex::Compile(kGpt2Regex, "ByteLevel pre-tokenizer"));
  }
  return std::unique_ptr<PreTokenizer>(
      new ByteLevelPreTokenizer(add_prefix_space, std::move(regex)));
}

void ByteLevelPreTokenizer::Split(std::vector<Piece>* pieces) const {
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

MetaspacePreTokenizer::MetaspacePreTokenizer(std::string replacement, PrependScheme scheme,
                                             bool split)
    : replacement_(std::move(replacement)),
      space_(Pattern::Literal(" ")),
      marker_(Pattern::Literal(replacement_)),
      scheme_(scheme),
      split_(split) {}

void MetaspacePreTokenizer::Split(std::vector<Piece>* pieces) const {
  SplitEach(pieces, [this](const Piece& piece) {
    std::string text = space_->ReplaceAll(piece.text, replacement_);
    const bool prepend = scheme_ == PrependScheme::kAlways ||
                         (scheme_ == PrependScheme::kFirst && piece.at_text_start);
    if (prepend && !absl::StartsWith(text, replacement_)) text.insert(0, replacement_);
    if (!split_) return std::vector<std::string>{std::move(text)};
    return SplitAt(text, marker_->FindAll(text), SplitBehavior::kMergedWithNext, false);
  });
}

// ---------------------------------------------------------------------------
// Decoders

void ReplaceDecoder::Decode(std::vector<std::string>* tokens) const {
  for (std::string& token : *tokens) token = pattern_->ReplaceAll(token, content_);
}

void ByteFallbackDecoder::Decode(std::vector<std::string>* tokens) const {
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

void FuseDecoder::Decode(std::vector<std::string>* tokens) const {
  std::string fused = absl::StrJoin(*tokens, "");
  tokens->assign(1, std::move(fused));
}

void StripDecoder::Decode(std::vector<std::string>* tokens) const {
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

void ByteLevelDecoder::Decode(std::vector<std::string>* tokens) const {
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

void MetaspaceDecoder::Decode(std::vector<std::string>* tokens) const {
  for (size_t i = 0; i < tokens->size(); ++i) {
    const bool drop = i == 0 && scheme_ != PrependScheme::kNever;
    (*tokens)[i] = marker_->ReplaceAll((*tokens)[i], drop ? "" : " ");
  }
}

}  // namespace loraserve::model::tokenizer_internal
