#include "server/api/openai_protocol.h"

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "server/api/status_mapping.h"
#include "server/api/tenants.h"

namespace loraserve::api {
namespace {

using nlohmann::json;

absl::Status FieldError(absl::string_view field, absl::string_view expected, const json& got) {
  return absl::InvalidArgumentError(
      absl::StrCat("\"", field, "\" must be ", expected, ", got ", got.dump()));
}

absl::StatusOr<json> ParseObject(absl::string_view body) {
  RETURN_IF_ERROR(CheckJsonDepth(body, "the request body"));
  json parsed = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return absl::InvalidArgumentError("the request body is not valid JSON");
  }
  if (!parsed.is_object()) {
    return absl::InvalidArgumentError("the request body must be a JSON object");
  }
  return parsed;
}

// Reads a number field within [min, max]; null counts as absent.
absl::StatusOr<std::optional<double>> NumberField(const json& body, const char* field, double min,
                                                  double max) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number()) return FieldError(field, "a number", *it);
  const double value = it->get<double>();
  if (!(value >= min && value <= max)) {
    return FieldError(field, absl::StrCat("between ", min, " and ", max), *it);
  }
  return value;
}

absl::StatusOr<std::optional<int64_t>> IntegerField(const json& body, const char* field,
                                                    int64_t min, int64_t max) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_number_integer()) return FieldError(field, "an integer", *it);
  // Unsigned values above int64 read as negative through get<int64_t>.
  if (it->is_number_unsigned() &&
      it->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return FieldError(field, absl::StrCat("at most ", max), *it);
  }
  const int64_t value = it->get<int64_t>();
  if (value < min || value > max) {
    return FieldError(field, absl::StrCat("an integer from ", min, " to ", max), *it);
  }
  return value;
}

absl::StatusOr<std::optional<bool>> BoolField(const json& body, const char* field) {
  auto it = body.find(field);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!it->is_boolean()) return FieldError(field, "true or false", *it);
  return it->get<bool>();
}

// Fields OpenAI defines that loraserve accepts only at their neutral value.
absl::Status CheckNeutral(const json& body) {
  for (const char* field : {"presence_penalty", "frequency_penalty"}) {
    auto it = body.find(field);
    if (it != body.end() && !it->is_null() && !(it->is_number() && it->get<double>() == 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", field, "\" is not supported (only 0), got ", it->dump()));
    }
  }
  auto bias = body.find("logit_bias");
  if (bias != body.end() && !bias->is_null() && !(bias->is_object() && bias->empty())) {
    return absl::InvalidArgumentError("\"logit_bias\" is not supported");
  }
  auto echo = body.find("echo");
  if (echo != body.end() && !echo->is_null() && !(echo->is_boolean() && !echo->get<bool>())) {
    return absl::InvalidArgumentError("\"echo\" is not supported (only false)");
  }
  auto suffix = body.find("suffix");
  if (suffix != body.end() && !suffix->is_null() &&
      !(suffix->is_string() && suffix->get<std::string>().empty())) {
    return absl::InvalidArgumentError("\"suffix\" is not supported");
  }
  auto format = body.find("response_format");
  if (format != body.end() && !format->is_null() &&
      !(format->is_object() && format->value("type", json()) == "text")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"response_format\" supports only {\"type\": \"text\"}, got ", format->dump()));
  }
  return absl::OkStatus();
}

absl::Status CheckKnownFields(const json& body, const std::set<std::string>& known) {
  for (const auto& [field, value] : body.items()) {
    if (known.count(field) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unknown field \"", field, "\" (accepted: ", absl::StrJoin(known, ", "), ")"));
    }
  }
  return absl::OkStatus();
}

const std::set<std::string>& CommonFields() {
  static const std::set<std::string> fields = {"model",
                                               "max_tokens",
                                               "temperature",
                                               "top_p",
                                               "top_k",
                                               "seed",
                                               "stop",
                                               "stop_token_ids",
                                               "ignore_eos",
                                               "n",
                                               "stream",
                                               "stream_options",
                                               "logprobs",
                                               "user",
                                               "presence_penalty",
                                               "frequency_penalty",
                                               "logit_bias",
                                               "response_format",
                                               "adapter_scale",
                                               "merged_adapters"};
  return fields;
}

absl::StatusOr<std::vector<int32_t>> TokenIdArray(const json& value, absl::string_view field) {
  std::vector<int32_t> ids;
  for (const json& id : value) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return FieldError(field, "an array of token ids (integers >= 0)", value);
    }
    ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return ids;
}

// loraserve's extension in LoRAX's shape: {"ids": [...], "weights": [...],
// "merge_strategy": "cat"}. The server checks the ids (visibility,
// duplicates, how many) and the weights' bounds.
absl::StatusOr<std::optional<MergedAdapters>> ParseMergedAdapters(const json& body) {
  auto field = body.find("merged_adapters");
  if (field == body.end() || field->is_null()) return std::nullopt;
  if (!field->is_object()) {
    return FieldError("merged_adapters", "an object {\"ids\": [...], \"weights\": [...]}", *field);
  }
  RETURN_IF_ERROR(CheckKnownFields(*field, {"ids", "weights", "merge_strategy"}));
  MergedAdapters out;
  auto ids = field->find("ids");
  if (ids == field->end() || !ids->is_array() || ids->empty()) {
    return FieldError("merged_adapters.ids", "a non-empty array of adapter ids",
                      ids == field->end() ? json() : *ids);
  }
  for (const json& id : *ids) {
    if (!id.is_string() || id.get<std::string>().empty()) {
      return FieldError("merged_adapters.ids", "an array of adapter ids (strings)", *ids);
    }
    out.ids.push_back(id.get<std::string>());
  }
  auto weights = field->find("weights");
  if (weights == field->end() || weights->is_null()) {
    out.weights.assign(out.ids.size(), 1.0f);
  } else {
    if (!weights->is_array() || weights->size() != out.ids.size()) {
      return FieldError("merged_adapters.weights",
                        absl::StrCat("an array of ", out.ids.size(), " numbers, one per id"),
                        *weights);
    }
    for (const json& weight : *weights) {
      // The server bounds them; 0 (also once rounded to a float) would drop
      // its adapter: leave it out instead.
      const float value = weight.is_number() ? static_cast<float>(weight.get<double>()) : 0.0f;
      if (value == 0.0f) return FieldError("merged_adapters.weights", "non-zero numbers", *weights);
      out.weights.push_back(value);
    }
  }
  auto strategy = field->find("merge_strategy");
  if (strategy != field->end() && !strategy->is_null() && *strategy != "cat") {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"merged_adapters.merge_strategy\" supports only \"cat\" (the exact weighted sum of "
        "the adapters' low-rank terms, peft's add_weighted_adapter combination_type=\"cat\"), "
        "got ",
        strategy->dump()));
  }
  return out;
}

absl::StatusOr<SamplingOptions> ParseSampling(const json& body, const ParseLimits& limits,
                                              int32_t prompts) {
  SamplingOptions out;
  RETURN_IF_ERROR(CheckNeutral(body));
  auto model = body.find("model");
  if (model == body.end() || !model->is_string() || model->get<std::string>().empty()) {
    return absl::InvalidArgumentError(
        "\"model\" is required: the base model's name or an adapter id (see GET /v1/models)");
  }
  out.model = model->get<std::string>();
  ASSIGN_OR_RETURN(std::optional<int64_t> max_tokens,
                   IntegerField(body, "max_tokens", 1, std::numeric_limits<int32_t>::max()));
  if (max_tokens) out.max_tokens = static_cast<int32_t>(*max_tokens);
  ASSIGN_OR_RETURN(std::optional<double> temperature, NumberField(body, "temperature", 0, 2));
  if (temperature) out.temperature = static_cast<float>(*temperature);
  ASSIGN_OR_RETURN(std::optional<double> top_p, NumberField(body, "top_p", 0, 1));
  if (top_p) {
    if (*top_p == 0) return FieldError("top_p", "in (0, 1]", body["top_p"]);
    out.top_p = static_cast<float>(*top_p);
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> top_k, IntegerField(body, "top_k", -1, 1 << 20));
  if (top_k && *top_k > 0) out.top_k = static_cast<int32_t>(*top_k);
  auto seed = body.find("seed");
  if (seed != body.end() && !seed->is_null()) {
    if (!seed->is_number_integer()) return FieldError("seed", "an integer", *seed);
    out.seed = seed->is_number_unsigned() ? seed->get<uint64_t>()
                                          : static_cast<uint64_t>(seed->get<int64_t>());
  }
  auto stop = body.find("stop");
  if (stop != body.end() && !stop->is_null()) {
    if (stop->is_string()) {
      out.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array() && stop->size() <= 16) {
      for (const json& s : *stop) {
        if (!s.is_string() || s.get<std::string>().empty()) {
          return FieldError("stop", "a string or an array of up to 16 non-empty strings", *stop);
        }
        out.stop.push_back(s.get<std::string>());
      }
    } else {
      return FieldError("stop", "a string or an array of up to 16 non-empty strings", *stop);
    }
  }
  auto stop_ids = body.find("stop_token_ids");
  if (stop_ids != body.end() && !stop_ids->is_null()) {
    if (!stop_ids->is_array()) return FieldError("stop_token_ids", "an array", *stop_ids);
    ASSIGN_OR_RETURN(out.stop_token_ids, TokenIdArray(*stop_ids, "stop_token_ids"));
  }
  ASSIGN_OR_RETURN(std::optional<bool> ignore_eos, BoolField(body, "ignore_eos"));
  out.ignore_eos = ignore_eos.value_or(false);
  ASSIGN_OR_RETURN(std::optional<int64_t> n, IntegerField(body, "n", 1, limits.max_choices));
  out.n = static_cast<int32_t>(n.value_or(1));
  if (out.n * static_cast<int64_t>(prompts) > limits.max_choices) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompts × n is ", out.n * static_cast<int64_t>(prompts), "; at most ",
                     limits.max_choices, " choices per request (--max-choices)"));
  }
  ASSIGN_OR_RETURN(std::optional<bool> stream, BoolField(body, "stream"));
  out.stream = stream.value_or(false);
  auto stream_options = body.find("stream_options");
  if (stream_options != body.end() && !stream_options->is_null()) {
    if (!stream_options->is_object()) {
      return FieldError("stream_options", "an object", *stream_options);
    }
    RETURN_IF_ERROR(CheckKnownFields(*stream_options, {"include_usage"}));
    ASSIGN_OR_RETURN(std::optional<bool> usage, BoolField(*stream_options, "include_usage"));
    out.include_usage = usage.value_or(false);
  }
  auto user = body.find("user");
  if (user != body.end() && !user->is_null() && !user->is_string()) {
    return FieldError("user", "a string", *user);
  }
  ASSIGN_OR_RETURN(std::optional<double> scale, NumberField(body, "adapter_scale", 0, 100));
  if (scale) out.adapter_scale = static_cast<float>(*scale);
  ASSIGN_OR_RETURN(out.merged_adapters, ParseMergedAdapters(body));
  return out;
}

}  // namespace

nlohmann::json ErrorBody(int http_status, absl::string_view message) {
  static const std::map<int, const char*> kTypes = {{400, "invalid_request_error"},
                                                    {401, "authentication_error"},
                                                    {403, "permission_error"},
                                                    {404, "not_found_error"},
                                                    {408, "timeout"},
                                                    {409, "conflict_error"},
                                                    {413, "request_too_large"},
                                                    {429, "rate_limit_error"},
                                                    {431, "request_too_large"},
                                                    {499, "cancelled"},
                                                    {501, "not_implemented"},
                                                    {503, "service_unavailable"},
                                                    {504, "timeout"},
                                                    {507, "insufficient_storage"}};
  auto type = kTypes.find(http_status);
  return json{{"error",
               {{"message", std::string(message)},
                {"type", type == kTypes.end() ? "server_error" : type->second},
                {"param", nullptr},
                {"code", http_status}}}};
}

nlohmann::json ErrorBody(const absl::Status& status) {
  return ErrorBody(HttpStatusFor(status), status.message());
}

absl::StatusOr<CompletionRequest> ParseCompletionRequest(absl::string_view body,
                                                         const ParseLimits& limits) {
  ASSIGN_OR_RETURN(json parsed, ParseObject(body));
  std::set<std::string> known = CommonFields();
  known.insert({"prompt", "echo", "suffix", "best_of"});
  RETURN_IF_ERROR(CheckKnownFields(parsed, known));
  CompletionRequest out;
  auto prompt = parsed.find("prompt");
  constexpr absl::string_view kPromptForms =
      "a string, an array of strings, an array of token ids or an array of arrays of token ids";
  if (prompt == parsed.end()) return absl::InvalidArgumentError("\"prompt\" is required");
  if (prompt->is_string()) {
    out.prompts.push_back(prompt->get<std::string>());
  } else if (prompt->is_array() && !prompt->empty()) {
    if ((*prompt)[0].is_number_integer()) {
      ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenIdArray(*prompt, "prompt"));
      out.prompts.push_back(std::move(ids));
    } else {
      for (const json& item : *prompt) {
        if (item.is_string()) {
          out.prompts.push_back(item.get<std::string>());
        } else if (item.is_array() && !item.empty()) {
          ASSIGN_OR_RETURN(std::vector<int32_t> ids, TokenIdArray(item, "prompt"));
          out.prompts.push_back(std::move(ids));
        } else {
          return FieldError("prompt", kPromptForms, *prompt);
        }
      }
    }
  } else {
    return FieldError("prompt", kPromptForms, *prompt);
  }
  ASSIGN_OR_RETURN(out.sampling,
                   ParseSampling(parsed, limits, static_cast<int32_t>(out.prompts.size())));
  ASSIGN_OR_RETURN(std::optional<int64_t> best_of,
                   IntegerField(parsed, "best_of", 1, limits.max_choices));
  if (best_of && *best_of != out.sampling.n) {
    return absl::InvalidArgumentError("\"best_of\" is not supported (only equal to n)");
  }
  ASSIGN_OR_RETURN(std::optional<int64_t> logprobs,
                   IntegerField(parsed, "logprobs", 0, limits.max_top_logprobs));
  if (logprobs) {
    out.sampling.logprobs = true;
    out.sampling.top_logprobs = static_cast<int32_t>(*logprobs);
  }
  if (!out.sampling.max_tokens) out.sampling.max_tokens = 16;  // OpenAI's default
  return out;
}

absl::StatusOr<ChatRequest> ParseChatRequest(absl::string_view body, const ParseLimits& limits) {
  ASSIGN_OR_RETURN(json parsed, ParseObject(body));
  std::set<std::string> known = CommonFields();
  known.insert({"messages", "top_logprobs", "max_completion_tokens"});
  RETURN_IF_ERROR(CheckKnownFields(parsed, known));
  ChatRequest out;
  auto messages = parsed.find("messages");
  if (messages == parsed.end() || !messages->is_array() || messages->empty()) {
    return absl::InvalidArgumentError(
        "\"messages\" is required: a non-empty array of {\"role\", \"content\"}");
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& message = (*messages)[i];
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!message.is_object()) return FieldError(field, "an object", message);
    RETURN_IF_ERROR(CheckKnownFields(message, {"role", "content", "name"}));
    auto role = message.find("role");
    auto content = message.find("content");
    if (role == message.end() || !role->is_string()) {
      return FieldError(field + ".role", "\"system\", \"user\" or \"assistant\"",
                        role == message.end() ? json() : *role);
    }
    formats::ChatMessage out_message{role->get<std::string>(), ""};
    if (content == message.end() || content->is_null()) {
      return FieldError(field + ".content", "a string", json());
    }
    if (content->is_string()) {
      out_message.content = content->get<std::string>();
    } else if (content->is_array()) {  // [{"type": "text", "text": ...}]
      for (const json& part : *content) {
        if (!part.is_object() || part.value("type", json()) != "text" || !part.contains("text") ||
            !part["text"].is_string()) {
          return FieldError(field + ".content", "a string or an array of text parts", *content);
        }
        out_message.content += part["text"].get<std::string>();
      }
    } else {
      return FieldError(field + ".content", "a string", *content);
    }
    out.messages.push_back(std::move(out_message));
  }
  ASSIGN_OR_RETURN(out.sampling, ParseSampling(parsed, limits, 1));
  ASSIGN_OR_RETURN(
      std::optional<int64_t> max_completion,
      IntegerField(parsed, "max_completion_tokens", 1, std::numeric_limits<int32_t>::max()));
  if (max_completion) out.sampling.max_tokens = static_cast<int32_t>(*max_completion);
  ASSIGN_OR_RETURN(std::optional<bool> logprobs, BoolField(parsed, "logprobs"));
  out.sampling.logprobs = logprobs.value_or(false);
  ASSIGN_OR_RETURN(std::optional<int64_t> top_logprobs,
                   IntegerField(parsed, "top_logprobs", 0, limits.max_top_logprobs));
  if (top_logprobs) {
    if (!out.sampling.logprobs) {
      return absl::InvalidArgumentError("\"top_logprobs\" needs \"logprobs\": true");
    }
    out.sampling.top_logprobs = static_cast<int32_t>(*top_logprobs);
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> ParseStringFields(
    absl::string_view body, const std::vector<std::string>& required) {
  ASSIGN_OR_RETURN(json parsed, ParseObject(body));
  RETURN_IF_ERROR(
      CheckKnownFields(parsed, std::set<std::string>(required.begin(), required.end())));
  std::vector<std::string> values;
  for (const std::string& field : required) {
    auto it = parsed.find(field);
    if (it == parsed.end() || !it->is_string() || it->get<std::string>().empty()) {
      return FieldError(field, "a non-empty string", it == parsed.end() ? json() : *it);
    }
    values.push_back(it->get<std::string>());
  }
  return values;
}

nlohmann::json CompletionLogprobs(const std::vector<TokenLogprobs>& tokens, int64_t text_offset) {
  json out = {{"tokens", json::array()},
              {"token_logprobs", json::array()},
              {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (const TokenLogprobs& token : tokens) {
    out["tokens"].push_back(token.token);
    out["token_logprobs"].push_back(token.logprob);
    json top = json::object();
    for (const auto& [text, logprob] : token.top) {
      // Two ids may decode to one text; OpenAI's map keeps the likelier.
      if (!top.contains(text)) top[text] = logprob;
    }
    out["top_logprobs"].push_back(std::move(top));
    out["text_offset"].push_back(text_offset);
    text_offset += static_cast<int64_t>(token.token.size());
  }
  return out;
}

nlohmann::json ChatLogprobs(const std::vector<TokenLogprobs>& tokens) {
  auto bytes_of = [](const std::string& text) {
    json bytes = json::array();
    for (unsigned char c : text) bytes.push_back(static_cast<int>(c));
    return bytes;
  };
  json content = json::array();
  for (const TokenLogprobs& token : tokens) {
    json top = json::array();
    for (const auto& [text, logprob] : token.top) {
      top.push_back({{"token", text}, {"logprob", logprob}, {"bytes", bytes_of(text)}});
    }
    content.push_back({{"token", token.token},
                       {"logprob", token.logprob},
                       {"bytes", bytes_of(token.token)},
                       {"top_logprobs", std::move(top)}});
  }
  return json{{"content", std::move(content)}};
}

nlohmann::json UsageJson(int64_t prompt_tokens, int64_t completion_tokens) {
  return json{{"prompt_tokens", prompt_tokens},
              {"completion_tokens", completion_tokens},
              {"total_tokens", prompt_tokens + completion_tokens}};
}

std::string DisplayAdapterId(absl::string_view canonical_id) {
  const std::string operators = absl::StrCat(kOperatorTenant, "/");
  return std::string(absl::StartsWith(canonical_id, operators)
                         ? canonical_id.substr(operators.size())
                         : canonical_id);
}

std::string JsonText(const nlohmann::json& value) {
  return value.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace loraserve::api
