// Hugging Face `tokenizer.json` tokenizers, identical in ids and text to the
// `tokenizers` library for the two families Llama-style models use:
//  - SentencePiece-style BPE with byte fallback (normalizer Prepend/Replace
//    "▁" or a Metaspace pre-tokenizer; Llama-2, Mistral, the shared test model);
//  - byte-level BPE with a regex pre-tokenizer (Llama-3, Qwen2, GPT-2).
// Added/special tokens are matched in the text before the model runs;
// BOS/EOS are added as tokenizer.json's post-processor says (transformers 5
// ignores tokenizer_config.json's add_bos_token/add_eos_token when a
// tokenizer.json exists), and Llama tokenizer classes are rebuilt from
// tokenizer_config.json (legacy, add_prefix_space) as transformers 5 does.
//
// Thread-safety: immutable after Load; Encode/Decode may run on any thread.
//
// Example:
//   ASSIGN_OR_RETURN(auto tok, Tokenizer::Load("/models/llama"));
//   ASSIGN_OR_RETURN(std::vector<int32_t> ids, tok->Encode("Hello", true));
//   std::string text = tok->Decode(ids, /*skip_special_tokens=*/true);
#ifndef LORASERVE_SERVER_TOKENIZER_TOKENIZER_H_
#define LORASERVE_SERVER_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace loraserve::model {

class Tokenizer {
 public:
  // Reads `model_dir/tokenizer.json` and, when present,
  // `model_dir/tokenizer_config.json`.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);
  // From file contents; `tokenizer_config_json` may be empty. `source` names
  // the origin in error messages.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      absl::string_view tokenizer_json, absl::string_view tokenizer_config_json,
      absl::string_view source);
  virtual ~Tokenizer() = default;

  // Text must be valid UTF-8 (InvalidArgument otherwise).
  // `add_special_tokens` adds BOS/EOS as the post-processor says
  // (like `tokenizer(text)` in transformers).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text,
                                                      bool add_special_tokens) const = 0;
  // Like `tokenizer.decode(ids, skip_special_tokens=...)`. Ids outside the
  // vocabulary decode to nothing. Incomplete UTF-8 sequences become U+FFFD, as
  // in `tokenizers`.
  virtual std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const = 0;
  // True when Decode leaves `id` out before decoding the rest (an id outside
  // the vocabulary, or a special token when skipping them): no neighbour's
  // text depends on it.
  virtual bool IsDroppedByDecode(int32_t id, bool skip_special_tokens) const = 0;

  virtual int64_t vocab_size() const = 0;  // including added tokens
  virtual std::optional<int32_t> bos_token_id() const = 0;
  virtual std::optional<int32_t> eos_token_id() const = 0;
  // The token's string in the vocabulary (e.g. "▁the", "<0x0A>"), "" if none.
  virtual std::string IdToPiece(int32_t id) const = 0;
  // tokenizer_config.json's "chat_template" (empty when absent).
  virtual const std::string& chat_template() const = 0;
};

}  // namespace loraserve::model

#endif  // LORASERVE_SERVER_TOKENIZER_TOKENIZER_H_
