// Completions and chat completions (POST /v1/completions,
// /v1/chat/completions): the requests built from the OpenAI body, the first
// events awaited before the status line, and the answer streamed (SSE) or
// whole.
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "formats/chat_template.h"
#include "server/api/http_gateway_impl.h"

namespace loraserve::api {
namespace {

using http_gateway_internal::CallUpstream;
using http_gateway_internal::kUnaryDeadline;
using http_gateway_internal::ReplyError;
using http_gateway_internal::ReplyJson;
using nlohmann::json;

std::string RandomId(absl::string_view prefix) {
  thread_local std::mt19937_64 random(std::random_device{}());
  return absl::StrCat(prefix, absl::Hex(random(), absl::kZeroPad16),
                      absl::Hex(random() >> 32, absl::kZeroPad8));
}

}  // namespace

void HttpGateway::Impl::HandleGeneration(Api api, const httplib::Request& req,
                                         httplib::Response& res) {
  auto generation = std::make_shared<Generation>();
  generation->gateway = this;
  generation->api = api;
  generation->start = absl::Now();
  generation->created = absl::ToUnixSeconds(generation->start);
  generation->id = RandomId(api == Api::kChat ? "chatcmpl-" : "cmpl-");
  absl::Status status = StartGeneration(*generation, req, res);
  if (!status.ok()) {
    if (generation->streams) generation->streams->Cancel();
    generation->record.http_status = HttpStatusFor(status);
    return ReplyError(res, status);
  }
  if (generation->sampling.stream) return StreamAnswer(std::move(generation), res);
  // Not streamed: gather every token; the first failure ends the request
  // (the Generation's destructor cancels the other choices), and so does the
  // client's going away (its KV blocks are freed then, not at max_tokens).
  HandlerConnection* const connection = HandlerConnection::Current();
  for (ChoiceEvent event = generation->Next(); !event.done; event = generation->Next()) {
    if (connection != nullptr && connection->ClientGone()) {
      generation->record.http_status = 499;
      return ReplyError(res, absl::CancelledError("the client closed the connection"));
    }
    if (!event.has_token && !event.status.ok()) {
      generation->record.http_status = HttpStatusFor(event.status);
      return ReplyError(res, event.status);
    }
    std::optional<TokenLogprobs> ignored;
    generation->Apply(event, &ignored);
  }
  ReplyJson(res, 200, generation->FullAnswer());
}

absl::Status HttpGateway::Impl::StartGeneration(Generation& generation, const httplib::Request& req,
                                                httplib::Response& res) {
  ASSIGN_OR_RETURN(generation.who, Authenticate(req));
  generation.record.tenant = generation.who.tenant;
  if (!generation.who.is_admin()) {
    RateLimiter::Decision decision = limiter_.Admit(generation.who.tenant);
    if (!decision.allowed) {
      const int64_t seconds = std::max<int64_t>(
          1, static_cast<int64_t>(std::ceil(absl::ToDoubleSeconds(decision.retry_after))));
      res.set_header("Retry-After", std::to_string(seconds));
      return absl::ResourceExhaustedError(
          absl::StrCat("rate limit: ", decision.reason, "; retry after ", seconds, " s"));
    }
  }
  ASSIGN_OR_RETURN(std::vector<v1::GenerateRequest> requests,
                   BuildRequests(generation.api, req.body, generation));
  generation.choices.resize(requests.size());
  generation.streams = std::make_unique<ChoiceStreams>(inference_.get(), std::move(requests));
  return AwaitFirstEvents(generation);
}

absl::StatusOr<std::vector<v1::GenerateRequest>> HttpGateway::Impl::BuildRequests(
    Api api, const std::string& body, Generation& generation) {
  std::vector<Prompt> prompts;
  std::vector<formats::ChatMessage> messages;
  if (api == Api::kCompletions) {
    ASSIGN_OR_RETURN(CompletionRequest request,
                     ParseCompletionRequest(body, options_.parse_limits));
    prompts = std::move(request.prompts);
    generation.sampling = std::move(request.sampling);
  } else {
    ASSIGN_OR_RETURN(ChatRequest request, ParseChatRequest(body, options_.parse_limits));
    messages = std::move(request.messages);
    generation.sampling = std::move(request.sampling);
  }
  ASSIGN_OR_RETURN(v1::ServerInfo info, Info());
  std::vector<std::string> template_stops;
  if (api == Api::kChat) {
    if (info.chat_template().empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat is not available for model \"", info.model(),
                       "\": ", info.chat_template_error(), "; /v1/completions works without one"));
    }
    ASSIGN_OR_RETURN(formats::ChatTemplate chat_template,
                     formats::ChatTemplate::FromName(info.chat_template()));
    ASSIGN_OR_RETURN(std::string prompt, chat_template.Render(messages));
    prompts.push_back(std::move(prompt));
    template_stops = chat_template.stop_strings();
  }
  const SamplingOptions& sampling = generation.sampling;
  generation.model = sampling.model;
  ASSIGN_OR_RETURN(std::string adapter, ResolveModel(generation.who, sampling.model, info));
  generation.record.adapter = adapter;
  std::vector<v1::WeightedAdapter> composition;
  if (sampling.merged_adapters) {
    ASSIGN_OR_RETURN(composition,
                     ResolveComposition(generation.who, *sampling.merged_adapters, adapter, info));
    // Its metrics label: the parts as clients name them, with their weights.
    std::vector<std::string> parts;
    for (const v1::WeightedAdapter& part : composition) {
      parts.push_back(absl::StrCat(DisplayAdapterId(part.id()), "*", part.weight()));
    }
    generation.record.adapter = absl::StrJoin(parts, "+");
  }

  std::vector<v1::GenerateRequest> requests;
  for (const Prompt& prompt : prompts) {
    v1::GenerateRequest request;
    if (const std::string* text = std::get_if<std::string>(&prompt)) {
      request.set_text(*text);
    } else {
      const auto& ids = std::get<std::vector<int32_t>>(prompt);
      request.mutable_token_ids()->mutable_ids()->Assign(ids.begin(), ids.end());
    }
    request.set_adapter(adapter);
    request.mutable_adapters()->Assign(composition.begin(), composition.end());
    request.set_adapter_scale(sampling.adapter_scale);
    request.mutable_sampling()->set_temperature(sampling.temperature);
    request.mutable_sampling()->set_top_k(sampling.top_k);
    request.mutable_sampling()->set_top_p(sampling.top_p);
    if (sampling.max_tokens) {
      request.set_max_tokens(*sampling.max_tokens);
    } else {  // chat without max_tokens: the rest of the context
      v1::TokenizeRequest tokenize;
      tokenize.set_text(request.text());
      tokenize.set_add_special_tokens(true);
      v1::TokenizeResponse tokens;
      RETURN_IF_ERROR(CallUpstream(kUnaryDeadline, [&](grpc::ClientContext* context) {
        return inference_->Tokenize(context, tokenize, &tokens);
      }));
      const int64_t room = info.max_context_tokens() - tokens.token_ids_size();
      if (room < 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            "the prompt has ", tokens.token_ids_size(),
            " tokens and leaves no room in the context of ", info.max_context_tokens()));
      }
      request.set_max_tokens(static_cast<int32_t>(room));
    }
    for (const std::string& stop : sampling.stop) request.add_stop(stop);
    for (const std::string& stop : template_stops) request.add_stop(stop);
    request.mutable_stop_token_ids()->Assign(sampling.stop_token_ids.begin(),
                                             sampling.stop_token_ids.end());
    request.set_ignore_eos(sampling.ignore_eos);
    request.set_logprobs(sampling.top_logprobs);
    request.set_token_texts(sampling.logprobs);
    for (int32_t j = 0; j < sampling.n; ++j) {
      // n choices of one seeded request differ from each other but repeat
      // across identical requests.
      if (sampling.seed) request.mutable_sampling()->set_seed(*sampling.seed + j);
      requests.push_back(request);
    }
  }
  return requests;
}

// Waits until every choice has a token or has ended, so that a request the
// server refuses (bad field, unknown adapter, full queue) gets its HTTP error
// code instead of a 200 stream that fails at once.
absl::Status HttpGateway::Impl::AwaitFirstEvents(Generation& generation) {
  std::vector<bool> heard(generation.choices.size(), false);
  size_t waiting = heard.size();
  while (waiting > 0) {
    ChoiceEvent event = generation.streams->Next();
    if (event.done) break;
    if (!heard[event.choice]) {
      if (!event.has_token && !event.status.ok()) return event.status;
      heard[event.choice] = true;
      --waiting;
    }
    generation.buffered.push_back(std::move(event));
  }
  return absl::OkStatus();
}

void HttpGateway::Impl::StreamAnswer(std::shared_ptr<Generation> generation,
                                     httplib::Response& res) {
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream", [generation](size_t, httplib::DataSink& sink) {
        auto send = [&sink](const json& chunk) {
          const std::string line = absl::StrCat("data: ", JsonText(chunk), "\n\n");
          return sink.write(line.data(), line.size());
        };
        for (ChoiceEvent event = generation->Next(); !event.done; event = generation->Next()) {
          if (!event.has_token && !event.status.ok()) {
            // Headers are out: report the failure in the stream, as OpenAI does.
            generation->record.http_status = HttpStatusFor(event.status);
            generation->streams->Cancel();
            send(ErrorBody(event.status));
            break;
          }
          const bool first = !generation->choices[event.choice].started;
          std::optional<TokenLogprobs> logprobs;
          const std::string text = generation->Apply(event, &logprobs);
          if (!event.has_token) continue;
          if (!send(generation->Chunk(event.choice, text, logprobs, first))) {
            generation->record.http_status = 499;  // the client went away
            generation->streams->Cancel();
            return false;
          }
        }
        if (generation->sampling.include_usage && generation->record.http_status == 200) {
          json usage = generation->Chunk(0, "", std::nullopt, false);
          usage["choices"] = json::array();
          usage["usage"] = UsageJson(generation->PromptTokens(), generation->CompletionTokens());
          send(usage);
        }
        const std::string done = "data: [DONE]\n\n";
        sink.write(done.data(), done.size());
        sink.done();
        return true;
      });
}

ChoiceEvent HttpGateway::Impl::Generation::Next() {
  if (buffered.empty()) return streams->Next();
  ChoiceEvent event = std::move(buffered.front());
  buffered.pop_front();
  return event;
}

std::string HttpGateway::Impl::Generation::Apply(const ChoiceEvent& event,
                                                 std::optional<TokenLogprobs>* logprobs) {
  ChoiceState& choice = choices[event.choice];
  choice.started = true;
  if (!event.has_token) return "";
  const v1::GenerateResponse& token = event.token;
  if (!first_token) first_token = event.received;
  choice.last_token = event.received;
  ++choice.tokens;
  choice.result.text += token.text();
  if (sampling.logprobs) {
    TokenLogprobs entry{token.token(), token.logprob(), {}};
    for (const v1::TokenLogprob& alt : token.top_logprobs()) {
      entry.top.emplace_back(alt.token(), alt.logprob());
    }
    choice.result.logprobs.push_back(entry);
    *logprobs = std::move(entry);
  }
  if (!token.finish_reason().empty()) {
    choice.result.finish_reason = token.finish_reason();
    choice.prompt_tokens = token.usage().prompt_tokens();
  }
  return token.text();
}

json HttpGateway::Impl::Generation::Chunk(int index, const std::string& text,
                                          const std::optional<TokenLogprobs>& logprobs,
                                          bool first) const {
  const ChoiceState& choice = choices[index];
  const std::string& finish = choice.result.finish_reason;
  json out = {{"index", index}, {"finish_reason", finish.empty() ? json() : json(finish)}};
  if (api == Api::kCompletions) {
    out["text"] = text;
    // The offset of this token's text in the choice's text so far.
    const int64_t offset =
        static_cast<int64_t>(choice.result.text.size()) - static_cast<int64_t>(text.size());
    out["logprobs"] = logprobs ? CompletionLogprobs({*logprobs}, offset) : json();
  } else {
    // OpenAI's last chunk has an empty delta.
    out["delta"] = text.empty() && !finish.empty() ? json::object() : json{{"content", text}};
    if (first) out["delta"]["role"] = "assistant";
    out["logprobs"] = logprobs ? ChatLogprobs({*logprobs}) : json();
  }
  json chunk = {{"id", id},
                {"object", api == Api::kChat ? "chat.completion.chunk" : "text_completion"},
                {"created", created},
                {"model", model},
                {"choices", json::array({std::move(out)})}};
  if (sampling.include_usage) chunk["usage"] = nullptr;  // set on the final chunk only
  return chunk;
}

json HttpGateway::Impl::Generation::FullAnswer() const {
  json out_choices = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceResult& result = choices[i].result;
    json choice = {{"index", i}, {"finish_reason", result.finish_reason}};
    if (api == Api::kCompletions) {
      choice["text"] = result.text;
      choice["logprobs"] = sampling.logprobs ? CompletionLogprobs(result.logprobs, 0) : json();
    } else {
      choice["message"] = {{"role", "assistant"}, {"content", result.text}};
      choice["logprobs"] = sampling.logprobs ? ChatLogprobs(result.logprobs) : json();
    }
    out_choices.push_back(std::move(choice));
  }
  return json{{"id", id},
              {"object", api == Api::kChat ? "chat.completion" : "text_completion"},
              {"created", created},
              {"model", model},
              {"choices", std::move(out_choices)},
              {"usage", UsageJson(PromptTokens(), CompletionTokens())}};
}

// A prompt is counted once however many choices it has (OpenAI's usage).
int64_t HttpGateway::Impl::Generation::PromptTokens() const {
  int64_t total = 0;
  for (size_t i = 0; i < choices.size(); i += static_cast<size_t>(sampling.n)) {
    total += choices[i].prompt_tokens;
  }
  return total;
}

int64_t HttpGateway::Impl::Generation::CompletionTokens() const {
  int64_t total = 0;
  for (const ChoiceState& choice : choices) total += choice.tokens;
  return total;
}

HttpGateway::Impl::Generation::~Generation() {
  if (streams) streams->Cancel();  // a non-streamed request that failed midway
  const absl::Time end = absl::Now();
  record.prompt_tokens = PromptTokens();
  record.generation_tokens = CompletionTokens();
  record.duration_seconds = absl::ToDoubleSeconds(end - start);
  if (first_token) {
    record.ttft_seconds = absl::ToDoubleSeconds(*first_token - start);
    absl::Time last = *first_token;
    for (const ChoiceState& choice : choices) last = std::max(last, choice.last_token);
    const int64_t later_tokens = record.generation_tokens - static_cast<int64_t>(choices.size());
    if (later_tokens > 0) {
      record.tpot_seconds = absl::ToDoubleSeconds(last - *first_token) / later_tokens;
    }
  }
  gateway->metrics_.RecordRequest(record);
  if (!who.tenant.empty() && !who.is_admin()) {
    gateway->limiter_.ChargeTokens(who.tenant, record.prompt_tokens + record.generation_tokens);
  }
}

}  // namespace loraserve::api
