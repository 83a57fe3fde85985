// The steps around the BPE model, private to server/tokenizer, each one of
// tokenizers' normalizers, pre-tokenizers or decoders with the same name and
// behaviour. tokenizer.json's Sequences are flattened into vectors of steps
// (tokenizer_json.h reads them; the Llama rebuild in tokenizer.cc makes its
// own).
//
// Thread-safety: immutable once built; any thread may run them.
#ifndef LORASERVE_SERVER_TOKENIZER_PIPELINE_H_
#define LORASERVE_SERVER_TOKENIZER_PIPELINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "server/tokenizer/pattern.h"

namespace loraserve::model::tokenizer_internal {

// ---------------------------------------------------------------------------
// Normalizers rewrite the text between added tokens before pre-tokenizing.

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void Normalize(std::string* text) const = 0;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  void Normalize(std::string* text) const override;

 private:
  std::string prefix_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(std::unique_ptr<Pattern> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void Normalize(std::string* text) const override;

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

// ---------------------------------------------------------------------------
// Pre-tokenizers cut normalized text into the pieces BPE encodes one by one.

// A pre-tokenized piece of text. `at_text_start`: it begins at offset 0 of
// the original text (Metaspace's prepend_scheme "first" looks at that).
struct Piece {
  std::string text;
  bool at_text_start;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces every piece by the parts it splits into; only the first part of
  // a piece keeps its `at_text_start`.
  virtual void Split(std::vector<Piece>* pieces) const = 0;
};

// tokenizers' SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Pattern> pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void Split(std::vector<Piece>* pieces) const override;

 private:
  std::unique_ptr<Pattern> pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

// Bytes to GPT-2's printable characters, after splitting with GPT-2's regex
// when `use_regex` is set.
class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<PreTokenizer>> Create(bool add_prefix_space,
                                                              bool use_regex);
  void Split(std::vector<Piece>* pieces) const override;

 private:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}

  bool add_prefix_space_;
  std::unique_ptr<Regex> regex_;  // null when use_regex is false
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split);
  void Split(std::vector<Piece>* pieces) const override;

 private:
  std::string replacement_;
  std::unique_ptr<Pattern> space_;
  std::unique_ptr<Pattern> marker_;
  PrependScheme scheme_;
  bool split_;
};

// ---------------------------------------------------------------------------
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
  void Decode(std::vector<std::string>* tokens) const override;

 private:
  std::unique_ptr<Pattern> pattern_;
  std::string content_;
};

// Runs of "<0xXX>" tokens become the UTF-8 text they spell; a run that is
// not valid UTF-8 becomes one U+FFFD per byte (as tokenizers does).
class ByteFallbackDecoder : public Decoder {
 public:
  void Decode(std::vector<std::string>* tokens) const override;
};

class FuseDecoder : public Decoder {
 public:
  void Decode(std::vector<std::string>* tokens) const override;
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(std::string content, int64_t start, int64_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  void Decode(std::vector<std::string>* tokens) const override;

 private:
  std::string content_;  // one character
  int64_t start_;
  int64_t stop_;
};

// Maps the characters back to bytes and reads them as (lossy) UTF-8. A token
// with a character outside the table contributes its own bytes (added tokens).
class ByteLevelDecoder : public Decoder {
 public:
  void Decode(std::vector<std::string>* tokens) const override;
};

// Replacement character → space; in the first token every replacement
// character is dropped unless the scheme is "never" (tokenizers' behaviour).
class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : marker_(Pattern::Literal(std::move(replacement))), scheme_(scheme) {}
  void Decode(std::vector<std::string>* tokens) const override;

 private:
  std::unique_ptr<Pattern> marker_;
  PrependScheme scheme_;
};

}  // namespace loraserve::model::tokenizer_internal

#endif  // LORASERVE_SERVER_TOKENIZER_PIPELINE_H_
