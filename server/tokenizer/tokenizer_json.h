// Reading tokenizer.json (and tokenizer_config.json) into the tokenizer's
// pieces, private to server/tokenizer. Every error is InvalidArgument and
// names the file and the field's path (e.g.
// "m/tokenizer.json: field 'pre_tokenizer.pretokenizers[1].type': ...").
#ifndef LORASERVE_SERVER_TOKENIZER_TOKENIZER_JSON_H_
#define LORASERVE_SERVER_TOKENIZER_TOKENIZER_JSON_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"
#include "server/tokenizer/added_tokens.h"
#include "server/tokenizer/bpe_model.h"
#include "server/tokenizer/pattern.h"
#include "server/tokenizer/pipeline.h"

namespace loraserve::model::tokenizer_internal {

using json = nlohmann::json;

// Field access that turns a missing or mistyped field into an error naming
// the file and the field's path (e.g. "pre_tokenizer.pretokenizers[1].type").
class JsonReader {
 public:
  explicit JsonReader(std::string source) : source_(std::move(source)) {}

  absl::Status Error(absl::string_view path, absl::string_view problem) const;

  static std::string Join(absl::string_view path, absl::string_view key);

  absl::StatusOr<const json*> Required(const json& obj, absl::string_view path,
                                       const char* key) const;
  absl::StatusOr<std::string> String(const json& obj, absl::string_view path,
                                     const char* key) const;

  // Optional fields: absent or null gives `fallback`.
  absl::StatusOr<std::optional<std::string>> OptString(const json& obj, absl::string_view path,
                                                       const char* key) const;
  absl::StatusOr<bool> OptBool(const json& obj, absl::string_view path, const char* key,
                               bool fallback) const;
  absl::StatusOr<int64_t> OptInt(const json& obj, absl::string_view path, const char* key,
                                 int64_t fallback) const;

  absl::StatusOr<const json*> Array(const json& obj, absl::string_view path, const char* key) const;

  // {"String": literal} or {"Regex": pattern}.
  absl::StatusOr<std::unique_ptr<Pattern>> ReadPattern(const json& obj,
                                                       absl::string_view path) const;

  absl::StatusOr<PrependScheme> ReadPrependScheme(const json& obj, absl::string_view path) const;

  const std::string& source() const { return source_; }

 private:
  std::string source_;
};

// tokenizer.json's "model" (a BPE); `llama_rebuild` sets the options
// LlamaTokenizer passes instead of reading them.
absl::StatusOr<BpeModel> ReadBpeModel(const JsonReader& r, const json& tok, bool llama_rebuild);

// tokenizer.json's "added_tokens" (absent: none).
absl::StatusOr<std::vector<AddedToken>> ReadAddedTokens(const JsonReader& r, const json& tok);

// The pipeline steps of tokenizer.json's "normalizer", "pre_tokenizer" and
// "decoder" values, appended to `out` with Sequences flattened.
absl::Status ReadNormalizers(const JsonReader& r, const json& value,
                             std::vector<std::unique_ptr<Normalizer>>* out);
absl::Status ReadPreTokenizers(const JsonReader& r, const json& value,
                               std::vector<std::unique_ptr<PreTokenizer>>* out);
absl::Status ReadDecoders(const JsonReader& r, const json& value,
                          std::vector<std::unique_ptr<Decoder>>* out);

// A post-processing template: ids of special tokens around the sequence
// (`sequence` marks where the encoded text goes).
struct TemplateItem {
  bool sequence;
  std::vector<int32_t> ids;
};
using Template = std::vector<TemplateItem>;

// tokenizer.json's "post_processor": one template per TemplateProcessing,
// applied in order.
absl::Status ReadPostProcessors(const JsonReader& r, const json& value, std::vector<Template>* out);

}  // namespace loraserve::model::tokenizer_internal

#endif  // LORASERVE_SERVER_TOKENIZER_TOKENIZER_JSON_H_
