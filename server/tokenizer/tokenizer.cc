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
//
// The pieces live beside this file (utf8, pattern, pipeline, bpe_model,
// added_tokens, tokenizer_json); this one ties them together.
#include "server/tokenizer/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "server/tokenizer/added_tokens.h"
#include "server/tokenizer/bpe_model.h"
#include "server/tokenizer/pattern.h"
#include "server/tokenizer/pipeline.h"
#include "server/tokenizer/tokenizer_json.h"
#include "server/tokenizer/utf8.h"

namespace loraserve::model {
namespace {

using tokenizer_internal::AddedToken;
using tokenizer_internal::AddedTokenMatcher;
using tokenizer_internal::BpeModel;
using tokenizer_internal::ByteFallbackDecoder;
using tokenizer_internal::Decoder;
using tokenizer_internal::FirstInvalidUtf8;
using tokenizer_internal::FuseDecoder;
using tokenizer_internal::json;
using tokenizer_internal::JsonReader;
using tokenizer_internal::kWordCharRegex;
using tokenizer_internal::MetaspacePreTokenizer;
using tokenizer_internal::Normalizer;
using tokenizer_internal::Pattern;
using tokenizer_internal::Piece;
using tokenizer_internal::PrependScheme;
using tokenizer_internal::PreTokenizer;
using tokenizer_internal::ReadAddedTokens;
using tokenizer_internal::ReadBpeModel;
using tokenizer_internal::ReadDecoders;
using tokenizer_internal::ReadNormalizers;
using tokenizer_internal::ReadPostProcessors;
using tokenizer_internal::ReadPreTokenizers;
using tokenizer_internal::Regex;
using tokenizer_internal::ReplaceDecoder;
using tokenizer_internal::Segment;
using tokenizer_internal::StripDecoder;
using tokenizer_internal::Template;
using tokenizer_internal::TemplateItem;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read ", path));
  return contents.str();
}

// The pipeline of the comment at the top of this file, built from tokenizer.json
// and tokenizer_config.json.
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

    ASSIGN_OR_RETURN(model_, ReadBpeModel(r, tok, llama_rebuild));
    ASSIGN_OR_RETURN(std::vector<AddedToken> added, ReadAddedTokens(r, tok));
    for (AddedToken& token : added) AddToken(std::move(token));
    RETURN_IF_ERROR(BuildMatchers(r.source()));
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

}  // namespace loraserve::model
