#include "server/tokenizer/tokenizer_json.h"

#include <limits>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace loraserve::model::tokenizer_internal {
namespace {

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

}  // namespace

absl::Status JsonReader::Error(absl::string_view path, absl::string_view problem) const {
  return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", path, "': ", problem));
}

std::string JsonReader::Join(absl::string_view path, absl::string_view key) {
  return path.empty() ? std::string(key) : absl::StrCat(path, ".", key);
}

absl::StatusOr<const json*> JsonReader::Required(const json& obj, absl::string_view path,
                                                 const char* key) const {
  if (!obj.is_object()) return Error(path, "expected an object");
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return Error(Join(path, key), "missing");
  return &*it;
}

absl::StatusOr<std::string> JsonReader::String(const json& obj, absl::string_view path,
                                               const char* key) const {
  ASSIGN_OR_RETURN(const json* value, Required(obj, path, key));
  if (!value->is_string()) return Error(Join(path, key), "expected a string");
  return value->get<std::string>();
}

absl::StatusOr<std::optional<std::string>> JsonReader::OptString(const json& obj,
                                                                 absl::string_view path,
                                                                 const char* key) const {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::optional<std::string>();
  if (!it->is_string()) return Error(Join(path, key), "expected a string");
  return std::optional<std::string>(it->get<std::string>());
}

absl::StatusOr<bool> JsonReader::OptBool(const json& obj, absl::string_view path, const char* key,
                                         bool fallback) const {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return Error(Join(path, key), "expected true or false");
  return it->get<bool>();
}

absl::StatusOr<int64_t> JsonReader::OptInt(const json& obj, absl::string_view path, const char* key,
                                           int64_t fallback) const {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return fallback;
  if (!it->is_number_integer()) return Error(Join(path, key), "expected an integer");
  return it->get<int64_t>();
}

absl::StatusOr<const json*> JsonReader::Array(const json& obj, absl::string_view path,
                                              const char* key) const {
  ASSIGN_OR_RETURN(const json* value, Required(obj, path, key));
  if (!value->is_array()) return Error(Join(path, key), "expected an array");
  return value;
}

absl::StatusOr<std::unique_ptr<Pattern>> JsonReader::ReadPattern(const json& obj,
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

absl::StatusOr<PrependScheme> JsonReader::ReadPrependScheme(const json& obj,
                                                            absl::string_view path) const {
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

absl::StatusOr<BpeModel> ReadBpeModel(const JsonReader& r, const json& tok, bool llama_rebuild) {
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
      return r.Error("model.vocab", absl::StrCat("id of \"", token, "\" is not a valid token id"));
    }
    vocab.emplace(token, id.get<int32_t>());
  }
  BpeModel bpe(std::move(vocab), options);

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
    if (absl::Status status = bpe.AddMerge(left, right, static_cast<int32_t>(i)); !status.ok()) {
      return r.Error(path, status.message());
    }
  }
  return bpe;
}

absl::StatusOr<std::vector<AddedToken>> ReadAddedTokens(const JsonReader& r, const json& tok) {
  std::vector<AddedToken> tokens;
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
      tokens.push_back(std::move(token));
    }
  }
  return tokens;
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
          ASSIGN_OR_RETURN(std::unique_ptr<PreTokenizer> byte_level,
                           ByteLevelPreTokenizer::Create(add_prefix_space, use_regex));
          out->push_back(std::move(byte_level));
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

}  // namespace loraserve::model::tokenizer_internal
