// The OpenAI-compatible request and response bodies of the HTTP gateway:
// JSON → a validated request, generated tokens → OpenAI's JSON shapes, and
// absl::Status → HTTP status + OpenAI's error body (the one place where status
// codes become HTTP codes).
//
// Parsing is strict: a field of the wrong type, an unknown field, a value out
// of range is an InvalidArgument naming the field, so a client learns at once
// that the server did not do what it asked (vLLM accepts and ignores unknown
// fields; a silently ignored `logit_bias` is worse than a 400). Fields OpenAI
// defines that loraserve does not implement are accepted only at their
// neutral value (presence_penalty 0, echo false, ...).
//
// Pure functions on values; any thread.
//
// Example:
//   ASSIGN_OR_RETURN(CompletionRequest request,
//                    ParseCompletionRequest(body, {.max_choices = 16}));
//   nlohmann::json error = ErrorBody(absl::NotFoundError("model x"));  // with HttpStatusFor → 404
#ifndef LORASERVE_SERVER_API_OPENAI_PROTOCOL_H_
#define LORASERVE_SERVER_API_OPENAI_PROTOCOL_H_

#include <cstdint>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "formats/chat_template.h"
#include "nlohmann/json.hpp"

namespace loraserve::api {

// {"error": {"message", "type", "param": null, "code"}} with OpenAI's type
// names (invalid_request_error, authentication_error, ...), for the HTTP
// status HttpStatusFor (status_mapping.h) gives.
nlohmann::json ErrorBody(const absl::Status& status);
// An error body for an HTTP status that has no absl code of its own (413).
nlohmann::json ErrorBody(int http_status, absl::string_view message);

// loraserve's extension (LoRAX's field): one request served by the weighted
// sum of several adapters' low-rank terms (gRPC GenerateRequest.adapters).
struct MergedAdapters {
  std::vector<std::string> ids;  // as `model` takes them
  std::vector<float> weights;    // one per id; default 1
};

struct SamplingOptions {
  std::string model;
  std::optional<int32_t> max_tokens;  // absent: completions 16, chat the rest of the context
  float temperature = 1.0f;
  float top_p = 1.0f;
  int32_t top_k = 0;  // vLLM's extension; 0 = off
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;  // vLLM's extension
  bool ignore_eos = false;              // vLLM's extension
  int32_t n = 1;
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;       // report the sampled tokens' logprobs
  int32_t top_logprobs = 0;    // alternatives per token
  float adapter_scale = 1.0f;  // loraserve's extension: multiplier of the adapter's scale
  // With merged_adapters `model` must name the base model.
  std::optional<MergedAdapters> merged_adapters;
};

// One prompt of /v1/completions: text, or token ids.
using Prompt = std::variant<std::string, std::vector<int32_t>>;

struct CompletionRequest {
  std::vector<Prompt> prompts;  // one or more (OpenAI's batch form)
  SamplingOptions sampling;
};

struct ChatRequest {
  std::vector<formats::ChatMessage> messages;
  SamplingOptions sampling;
};

struct ParseLimits {
  int32_t max_choices = 16;  // prompts × n in one request
  int32_t max_top_logprobs = 20;
};

absl::StatusOr<CompletionRequest> ParseCompletionRequest(absl::string_view body,
                                                         const ParseLimits& limits);
absl::StatusOr<ChatRequest> ParseChatRequest(absl::string_view body, const ParseLimits& limits);

// Parses a JSON object body whose fields are all strings, all required
// (vLLM's load/unload_lora_adapter bodies); InvalidArgument names what is wrong.
absl::StatusOr<std::vector<std::string>> ParseStringFields(
    absl::string_view body, const std::vector<std::string>& required);

// One generated token as the gateway reports it.
struct TokenLogprobs {
  std::string token;  // decoded alone
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;  // alternatives, best first
};

// Accumulates one choice's text and logprobs for a non-streamed answer; the
// streamed answer sends each token's piece of the same JSON at once.
struct ChoiceResult {
  std::string text;
  std::vector<TokenLogprobs> logprobs;
  std::string finish_reason;  // "stop" | "length" | "" (unfinished)
};

// The `logprobs` object of a completions choice for `tokens`, whose texts
// start at `text_offset` in the choice's text.
nlohmann::json CompletionLogprobs(const std::vector<TokenLogprobs>& tokens, int64_t text_offset);
// The `logprobs` object of a chat choice: {"content": [...]}.
nlohmann::json ChatLogprobs(const std::vector<TokenLogprobs>& tokens);

nlohmann::json UsageJson(int64_t prompt_tokens, int64_t completion_tokens);

// The id clients see for an adapter (GET /v1/models, responses): operators'
// adapters ("default/x") by their bare name, tenants' as "tenant/name"; both
// forms are accepted back in `model`.
std::string DisplayAdapterId(absl::string_view canonical_id);

// Compact JSON text; invalid UTF-8 (a token that is part of a character)
// becomes U+FFFD instead of failing.
std::string JsonText(const nlohmann::json& value);

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_OPENAI_PROTOCOL_H_
