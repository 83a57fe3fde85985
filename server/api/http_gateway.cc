#include "server/api/http_gateway.h"

#include <httplib.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/sha256.h"
#include "base/status_macros.h"
#include "formats/chat_template.h"
#include "formats/safetensors.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "server/api/choice_streams.h"
#include "server/api/gateway_metrics.h"
#include "server/api/http_connection.h"
#include "server/api/status_mapping.h"
#include "server/api/upload_form.h"

namespace loraserve::api {
namespace {

using nlohmann::json;

constexpr int64_t kUploadChunkBytes = int64_t{1} << 20;
// An upload's body may exceed --max-upload-bytes by its multipart framing.
constexpr int64_t kMultipartSlackBytes = int64_t{1} << 20;
// Unary calls to the upstream (Stats, List, Get, Tokenize; Load and Upload
// read files and may take longer).
constexpr absl::Duration kUnaryDeadline = absl::Seconds(10);
constexpr absl::Duration kAdapterChangeDeadline = absl::Minutes(5);
// /ready and /metrics: a probe must answer quickly either way.
constexpr absl::Duration kProbeDeadline = absl::Seconds(2);

void ReplyJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(JsonText(body), "application/json");
}

void ReplyError(httplib::Response& res, const absl::Status& status) {
  ReplyJson(res, HttpStatusFor(status), ErrorBody(status));
}

// Runs one unary call with a deadline and translates its status.
template <typename Call>
absl::Status CallUpstream(absl::Duration deadline, Call call) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  return FromGrpcStatus(call(&context));
}

std::string RandomId(absl::string_view prefix) {
  thread_local std::mt19937_64 random(std::random_device{}());
  return absl::StrCat(prefix, absl::Hex(random(), absl::kZeroPad16),
                      absl::Hex(random() >> 32, absl::kZeroPad8));
}

json AdapterJson(const v1::AdapterInfo& info) {
  return json{{"id", DisplayAdapterId(info.id())},
              {"object", "adapter"},
              {"canonical_id", info.id()},
              {"owner", std::string(TenantOf(info.id()).value_or(""))},
              {"version", info.version()},
              {"content_hash", info.content_hash()},
              {"ranks", std::vector<int32_t>(info.ranks().begin(), info.ranks().end())},
              {"target_modules", std::vector<std::string>(info.target_modules().begin(),
                                                          info.target_modules().end())},
              {"bytes", info.bytes()},
              {"resident_host", info.resident_host()},
              {"pinned", info.pinned()}};
}

// An entry of GET /v1/models: the base model (`adapter` null) or an adapter.
json ModelJson(const v1::ServerInfo& info, const v1::AdapterInfo* adapter) {
  if (adapter == nullptr) {
    return json{{"id", info.model()},
                {"object", "model"},
                {"created", 0},
                {"owned_by", "loraserve"},
                {"root", info.model()},
                {"parent", nullptr},
                {"max_model_len", info.max_context_tokens()}};
  }
  return json{{"id", DisplayAdapterId(adapter->id())},
              {"object", "model"},
              {"created", 0},
              {"owned_by", std::string(TenantOf(adapter->id()).value_or(""))},
              {"root", adapter->id()},
              {"parent", info.model()},
              {"max_model_len", info.max_context_tokens()}};
}

enum class Api { kCompletions, kChat };

// What one choice has produced so far.
struct ChoiceState {
  ChoiceResult result;
  int64_t prompt_tokens = 0;
  int64_t tokens = 0;
  bool started = false;  // has had an event (its first streamed chunk names the role)
  absl::Time last_token;
};

}  // namespace

class HttpGateway::Impl {
 public:
  Impl(std::shared_ptr<grpc::Channel> channel, HttpGatewayOptions options, GatewayMetrics* metrics)
      : inference_(v1::Inference::NewStub(channel)),
        adapters_(v1::Adapters::NewStub(channel)),
        options_(std::move(options)),
        limiter_(options_.rate_limits),
        metrics_(*metrics),
        server_({.read_timeout = options_.read_timeout,
                 .write_timeout = options_.write_timeout,
                 .request_timeout = options_.request_timeout,
                 .keep_alive_timeout = options_.keep_alive_timeout,
                 .keep_alive_max_requests = options_.keep_alive_max_requests,
                 .max_header_bytes = options_.max_header_bytes}) {}

  absl::Status Bind();
  void Serve() { server_.listen_after_bind(); }
  int port() const { return port_; }
  void Stop() { server_.stop(); }

 private:
  // One completion or chat request from arrival to its last byte; records
  // its metrics and charges its tokens when destroyed.
  struct Generation {
    Impl* gateway = nullptr;
    Api api = Api::kCompletions;
    std::string id;
    int64_t created = 0;
    std::string model;  // as the client named it
    SamplingOptions sampling;
    std::unique_ptr<ChoiceStreams> streams;
    std::vector<ChoiceState> choices;
    std::deque<ChoiceEvent> buffered;  // read before the answer started
    Principal who;
    RequestRecord record;
    absl::Time start;
    std::optional<absl::Time> first_token;

    ~Generation();
    // The next event: those read while waiting for the first ones, then the streams'.
    ChoiceEvent Next();
    // Applies a token or end event; returns the choice's new text.
    std::string Apply(const ChoiceEvent& event, std::optional<TokenLogprobs>* logprobs);
    json Chunk(int choice, const std::string& text, const std::optional<TokenLogprobs>& logprobs,
               bool first) const;
    json FullAnswer() const;
    int64_t PromptTokens() const;
    int64_t CompletionTokens() const;
  };

  void Route();
  // Answers 413 (and closes the connection after it) when the declared body
  // is above its endpoint's limit; sets the limit for a chunked body.
  bool RefuseLargeBody(const httplib::Request& req, httplib::Response& res);
  absl::StatusOr<Principal> Authenticate(const httplib::Request& req) const;
  absl::StatusOr<v1::ServerInfo> Info();
  absl::StatusOr<v1::StatsResponse> UpstreamStats(absl::Duration deadline);
  absl::StatusOr<v1::ListAdaptersResponse> UpstreamAdapters(absl::Duration deadline);
  // The canonical adapter id the client's `model` names ("" = the base model).
  absl::StatusOr<std::string> ResolveModel(const Principal& who, const std::string& model,
                                           const v1::ServerInfo& info);
  // The adapter `name` names among those `who` may see; NotFound otherwise.
  absl::StatusOr<v1::AdapterInfo> FindVisible(const Principal& who, const std::string& name);
  absl::StatusOr<v1::AdapterInfo> GetAdapter(const std::string& canonical_id);
  absl::StatusOr<std::vector<v1::AdapterInfo>> ListVisible(const Principal& who);

  void HandleGeneration(Api api, const httplib::Request& req, httplib::Response& res);
  absl::Status StartGeneration(Generation& generation, const httplib::Request& req,
                               httplib::Response& res);
  absl::StatusOr<std::vector<v1::GenerateRequest>> BuildRequests(Api api, const std::string& body,
                                                                 Generation& generation);
  absl::Status AwaitFirstEvents(Generation& generation);
  void StreamAnswer(std::shared_ptr<Generation> generation, httplib::Response& res);
  void HandleModels(const httplib::Request& req, httplib::Response& res);
  void HandleModel(const httplib::Request& req, httplib::Response& res);
  void HandleUpload(const httplib::Request& req, httplib::Response& res);
  absl::StatusOr<v1::AdapterInfo> Upload(const Principal& who, const httplib::Request& req);
  void HandleLoadLora(const httplib::Request& req, httplib::Response& res);
  void HandleUnloadLora(const httplib::Request& req, httplib::Response& res);
  // Unloads the adapter `name` means for `who` and returns its id: NotFound
  // when `who` cannot see it, PermissionDenied when it may not change it.
  absl::StatusOr<std::string> Unload(const Principal& who, const std::string& name);
  void HandleMetrics(httplib::Response& res);

  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Adapters::Stub> adapters_;
  const HttpGatewayOptions options_;
  RateLimiter limiter_;
  GatewayMetrics& metrics_;
  BoundedHttpServer server_;
  int port_ = 0;
  std::mutex info_mu_;
  std::optional<v1::ServerInfo> info_;  // guarded by info_mu_; the upstream's model
  std::mutex uploads_mu_;               // one adapter change at a time: quota checks see each other
};

bool HttpGateway::Impl::RefuseLargeBody(const httplib::Request& req, httplib::Response& res) {
  const bool upload = req.method == "POST" && req.path == "/v1/adapters";
  const int64_t limit =
      upload ? options_.max_upload_bytes + kMultipartSlackBytes : options_.max_body_bytes;
  if (HandlerConnection* connection = HandlerConnection::Current()) {
    connection->set_body_limit(limit);
  }
  if (!req.has_header("Content-Length")) return false;
  const uint64_t length =
      std::strtoull(req.get_header_value("Content-Length").c_str(), nullptr, 10);
  if (length <= static_cast<uint64_t>(limit)) return false;
  // The body stays unread: the connection cannot carry another request.
  if (HandlerConnection* connection = HandlerConnection::Current()) {
    connection->CloseAfterResponse();
  }
  res.set_header("Connection", "close");
  ReplyJson(res, 413,
            ErrorBody(413, absl::StrCat("request body of ", length, " bytes exceeds ",
                                        upload ? "--max-upload-bytes=" : "--http-max-body-bytes=",
                                        upload ? options_.max_upload_bytes
                                               : options_.max_body_bytes)));
  return true;
}

absl::Status HttpGateway::Impl::Bind() {
  const int threads = options_.threads;
  server_.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  // Larger bodies get 413 before they are read (the pre-routing handler, per
  // endpoint; httplib's own check is the largest of them); Upload checks the
  // exact limit.
  server_.set_payload_max_length(static_cast<size_t>(
      std::max(options_.max_upload_bytes + kMultipartSlackBytes, options_.max_body_bytes)));
  // A client that sends "Expect: 100-continue" (curl does for large bodies)
  // hears the 413 before it sends the body; httplib asks this handler first.
  server_.set_expect_100_continue_handler(
      [this](const httplib::Request& req, httplib::Response& res) {
        return RefuseLargeBody(req, res) ? 413 : 100;
      });
  server_.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    return RefuseLargeBody(req, res) ? httplib::Server::HandlerResponse::Handled
                                     : httplib::Server::HandlerResponse::Unhandled;
  });
  server_.set_error_handler([](const httplib::Request&, httplib::Response& res) {
    // Errors httplib answers itself (no route, body too large, bad framing).
    if (res.body.empty()) {
      std::string message = absl::StrCat("HTTP ", res.status);
      if (res.status == 404) message = "no such endpoint";
      if (res.status == 405) message = "method not allowed on this endpoint";
      if (res.status == 413) message = "request body too large (--max-upload-bytes)";
      ReplyJson(res, res.status, ErrorBody(res.status, message));
    }
  });
  Route();
  port_ = options_.port == 0
              ? server_.bind_to_any_port(options_.host)
              : (server_.bind_to_port(options_.host, options_.port) ? options_.port : -1);
  if (port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("HTTP: cannot listen on ", options_.host, ":", options_.port));
  }
  server_.RaiseListenBacklog();
  return absl::OkStatus();
}

void HttpGateway::Impl::Route() {
  server_.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    HandleGeneration(Api::kCompletions, req, res);
  });
  server_.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    HandleGeneration(Api::kChat, req, res);
  });
  server_.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
    HandleModels(req, res);
  });
  server_.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    HandleModel(req, res);
  });
  server_.Post(
      "/v1/load_lora_adapter",
      [this](const httplib::Request& req, httplib::Response& res) { HandleLoadLora(req, res); });
  server_.Post(
      "/v1/unload_lora_adapter",
      [this](const httplib::Request& req, httplib::Response& res) { HandleUnloadLora(req, res); });
  server_.Post("/v1/adapters", [this](const httplib::Request& req, httplib::Response& res) {
    HandleUpload(req, res);
  });
  server_.Get("/v1/adapters", [this](const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<Principal> who = Authenticate(req);
    absl::StatusOr<std::vector<v1::AdapterInfo>> visible =
        who.ok() ? ListVisible(*who) : who.status();
    if (!visible.ok()) return ReplyError(res, visible.status());
    json data = json::array();
    for (const v1::AdapterInfo& info : *visible) data.push_back(AdapterJson(info));
    ReplyJson(res, 200, {{"object", "list"}, {"data", std::move(data)}});
  });
  server_.Get(R"(/v1/adapters/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    absl::StatusOr<Principal> who = Authenticate(req);
    absl::StatusOr<v1::AdapterInfo> info =
        who.ok() ? FindVisible(*who, req.matches[1]) : who.status();
    if (!info.ok()) return ReplyError(res, info.status());
    ReplyJson(res, 200, AdapterJson(*info));
  });
  server_.Delete(R"(/v1/adapters/(.+))", [this](const httplib::Request& req,
                                                httplib::Response& res) {
    absl::StatusOr<Principal> who = Authenticate(req);
    absl::StatusOr<std::string> id = who.ok() ? Unload(*who, req.matches[1]) : who.status();
    if (!id.ok()) return ReplyError(res, id.status());
    ReplyJson(res, 200, {{"id", DisplayAdapterId(*id)}, {"object", "adapter"}, {"deleted", true}});
  });
  server_.Get("/health", [](const httplib::Request&, httplib::Response& res) {
    ReplyJson(res, 200, {{"status", "ok"}});
  });
  server_.Get("/ready", [this](const httplib::Request&, httplib::Response& res) {
    absl::StatusOr<v1::StatsResponse> stats = UpstreamStats(kProbeDeadline);
    absl::Status status = stats.status();
    if (stats.ok() && stats->draining()) status = absl::UnavailableError("the server is draining");
    if (!status.ok()) {
      return ReplyError(res, absl::UnavailableError(absl::StrCat("not ready: ", status.message())));
    }
    ReplyJson(res, 200, {{"status", "ready"}, {"model", stats->server().model()}});
  });
  server_.Get("/metrics",
              [this](const httplib::Request&, httplib::Response& res) { HandleMetrics(res); });
}

absl::StatusOr<Principal> HttpGateway::Impl::Authenticate(const httplib::Request& req) const {
  if (!options_.api_keys) return Principal{kOperatorTenant, Role::kAdmin};
  const std::string header = req.get_header_value("Authorization");
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWith(header, kBearer)) {
    return absl::UnauthenticatedError("missing \"Authorization: Bearer <API key>\" header");
  }
  std::optional<Principal> who = options_.api_keys->Find(header.substr(kBearer.size()));
  if (!who) return absl::UnauthenticatedError("invalid API key");
  return *who;
}

absl::StatusOr<v1::ServerInfo> HttpGateway::Impl::Info() {
  {
    std::lock_guard<std::mutex> lock(info_mu_);
    if (info_) return *info_;
  }
  absl::StatusOr<v1::StatsResponse> stats = UpstreamStats(kUnaryDeadline);
  if (!stats.ok()) {
    return absl::UnavailableError(
        absl::StrCat("the inference server is not reachable: ", stats.status().message()));
  }
  std::lock_guard<std::mutex> lock(info_mu_);
  info_ = stats->server();
  return *info_;
}

absl::StatusOr<v1::StatsResponse> HttpGateway::Impl::UpstreamStats(absl::Duration deadline) {
  v1::StatsResponse stats;
  RETURN_IF_ERROR(CallUpstream(deadline, [&](grpc::ClientContext* context) {
    return inference_->Stats(context, v1::StatsRequest(), &stats);
  }));
  return stats;
}

absl::StatusOr<v1::ListAdaptersResponse> HttpGateway::Impl::UpstreamAdapters(
    absl::Duration deadline) {
  v1::ListAdaptersResponse list;
  RETURN_IF_ERROR(CallUpstream(deadline, [&](grpc::ClientContext* context) {
    return adapters_->List(context, v1::ListAdaptersRequest(), &list);
  }));
  return list;
}

absl::StatusOr<v1::AdapterInfo> HttpGateway::Impl::GetAdapter(const std::string& canonical_id) {
  v1::GetAdapterRequest request;
  request.set_id(canonical_id);
  v1::AdapterInfo info;
  RETURN_IF_ERROR(CallUpstream(kUnaryDeadline, [&](grpc::ClientContext* context) {
    return adapters_->Get(context, request, &info);
  }));
  return info;
}

absl::StatusOr<v1::AdapterInfo> HttpGateway::Impl::FindVisible(const Principal& who,
                                                               const std::string& name) {
  const absl::Status not_found = absl::NotFoundError(absl::StrCat(
      "adapter \"", name, "\" not found among the adapters you can use (GET /v1/adapters)"));
  absl::StatusOr<std::vector<std::string>> candidates = AdapterAccess::Candidates(who, name);
  if (!candidates.ok()) return not_found;
  for (const std::string& id : *candidates) {
    if (!AdapterAccess::CanUse(who, id)) continue;
    absl::StatusOr<v1::AdapterInfo> info = GetAdapter(id);
    if (info.ok() || !absl::IsNotFound(info.status())) return info;
  }
  return not_found;
}

absl::StatusOr<std::vector<v1::AdapterInfo>> HttpGateway::Impl::ListVisible(const Principal& who) {
  ASSIGN_OR_RETURN(v1::ListAdaptersResponse list, UpstreamAdapters(kUnaryDeadline));
  std::vector<v1::AdapterInfo> visible;
  for (const v1::AdapterInfo& info : list.adapters()) {
    if (AdapterAccess::CanUse(who, info.id())) visible.push_back(info);
  }
  return visible;
}

absl::StatusOr<std::string> HttpGateway::Impl::ResolveModel(const Principal& who,
                                                            const std::string& model,
                                                            const v1::ServerInfo& info) {
  if (model == info.model()) return std::string();
  absl::StatusOr<v1::AdapterInfo> adapter = FindVisible(who, model);
  if (absl::IsNotFound(adapter.status())) {
    return absl::NotFoundError(absl::StrCat("model \"", model, "\" is neither the base model (\"",
                                            info.model(),
                                            "\") nor an adapter you can use (GET /v1/models)"));
  }
  RETURN_IF_ERROR(adapter.status());
  return adapter->id();
}

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

void HttpGateway::Impl::HandleModels(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  absl::StatusOr<v1::ServerInfo> info = Info();
  if (!info.ok()) return ReplyError(res, info.status());
  absl::StatusOr<std::vector<v1::AdapterInfo>> visible = ListVisible(*who);
  if (!visible.ok()) return ReplyError(res, visible.status());
  json data = json::array({ModelJson(*info, nullptr)});
  for (const v1::AdapterInfo& adapter : *visible) data.push_back(ModelJson(*info, &adapter));
  ReplyJson(res, 200, {{"object", "list"}, {"data", std::move(data)}});
}

void HttpGateway::Impl::HandleModel(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  absl::StatusOr<v1::ServerInfo> info = Info();
  if (!info.ok()) return ReplyError(res, info.status());
  const std::string model = req.matches[1];
  if (model == info->model()) return ReplyJson(res, 200, ModelJson(*info, nullptr));
  absl::StatusOr<v1::AdapterInfo> adapter = FindVisible(*who, model);
  if (absl::IsNotFound(adapter.status())) {
    return ReplyError(res, absl::NotFoundError(absl::StrCat(
                               "model \"", model, "\" not found (GET /v1/models lists them)")));
  }
  if (!adapter.ok()) return ReplyError(res, adapter.status());
  ReplyJson(res, 200, ModelJson(*info, &*adapter));
}

void HttpGateway::Impl::HandleUpload(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  // Bodies far above the limit never get here (set_payload_max_length).
  int64_t bytes = static_cast<int64_t>(req.body.size());  // multipart parts are in req.files
  for (const auto& [name, part] : req.files) bytes += static_cast<int64_t>(part.content.size());
  if (bytes > options_.max_upload_bytes) {
    return ReplyJson(
        res, 413,
        ErrorBody(413, absl::StrCat("upload of ", bytes, " bytes exceeds --max-upload-bytes=",
                                    options_.max_upload_bytes)));
  }
  absl::StatusOr<v1::AdapterInfo> info = Upload(*who, req);
  if (HttpStatusFor(info.status()) == 429) {  // the tenant's quota
    json body = ErrorBody(info.status());
    body["error"]["type"] = "insufficient_quota";  // OpenAI's type for quotas
    return ReplyJson(res, 429, body);
  }
  if (!info.ok()) return ReplyError(res, info.status());
  ReplyJson(res, 201, AdapterJson(*info));
}

absl::StatusOr<v1::AdapterInfo> HttpGateway::Impl::Upload(const Principal& who,
                                                          const httplib::Request& req) {
  if (!req.is_multipart_form_data()) {
    return absl::InvalidArgumentError(absl::StrCat("the body must be ", kUploadFormFields));
  }
  std::map<std::string, absl::string_view> fields;  // the first of each name
  for (const auto& [name, part] : req.files) fields.emplace(name, part.content);
  ASSIGN_OR_RETURN(const UploadForm form, ParseUploadForm(who, fields));
  const std::string& id = form.id;
  const absl::string_view tensors = form.adapter_model_safetensors;

  std::lock_guard<std::mutex> lock(uploads_mu_);
  absl::StatusOr<v1::AdapterInfo> existing = GetAdapter(id);
  if (existing.ok() && !form.replace) {
    return absl::AlreadyExistsError(
        absl::StrCat("adapter ", id, " exists (version ", existing->version(),
                     "); send replace=true to upload a new version, or DELETE it first"));
  }
  if (!existing.ok() && !absl::IsNotFound(existing.status())) return existing.status();
  if (!who.is_admin()) {
    ASSIGN_OR_RETURN(std::vector<v1::AdapterInfo> visible, ListVisible(who));
    int64_t count = 0;
    int64_t bytes = 0;
    for (const v1::AdapterInfo& info : visible) {
      if (AdapterAccess::CanChange(who, info.id())) {
        ++count;
        bytes += info.bytes();
      }
    }
    RETURN_IF_ERROR(CheckQuota(options_.tenant_quota, who.tenant, count, bytes, form.float32_bytes,
                               existing.ok(), existing.ok() ? existing->bytes() : 0));
  }

  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kAdapterChangeDeadline));
  v1::AdapterInfo info;
  std::unique_ptr<grpc::ClientWriter<v1::UploadAdapterRequest>> writer =
      adapters_->Upload(&context, &info);
  v1::UploadAdapterRequest header;
  header.mutable_header()->set_id(id);
  header.mutable_header()->set_adapter_config_json(std::string(form.adapter_config_json));
  header.mutable_header()->set_sha256(Sha256Hex(tensors));
  header.mutable_header()->set_total_bytes(static_cast<int64_t>(tensors.size()));
  bool ok = writer->Write(header);
  for (size_t offset = 0; ok && offset < tensors.size(); offset += kUploadChunkBytes) {
    v1::UploadAdapterRequest chunk;
    const size_t size = std::min<size_t>(kUploadChunkBytes, tensors.size() - offset);
    chunk.mutable_chunk()->set_data(tensors.data() + offset, size);
    chunk.mutable_chunk()->set_last(offset + size == tensors.size());
    ok = writer->Write(chunk);
  }
  writer->WritesDone();
  // Exhausted here is the server's room (its upload store, its adapter
  // memory), not the tenant's quota.
  RETURN_IF_ERROR(ServerOutOfRoom(FromGrpcStatus(writer->Finish())));
  return info;
}

void HttpGateway::Impl::HandleLoadLora(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  if (!who->is_admin()) {
    return ReplyError(res, absl::PermissionDeniedError(
                               "loading from a server path needs an admin key; tenants upload "
                               "with POST /v1/adapters"));
  }
  absl::StatusOr<std::vector<std::string>> fields =
      ParseStringFields(req.body, {"lora_name", "lora_path"});
  if (!fields.ok()) return ReplyError(res, fields.status());
  absl::StatusOr<std::string> id = AdapterAccess::OwnedId(*who, (*fields)[0]);
  if (!id.ok()) return ReplyError(res, id.status());
  std::lock_guard<std::mutex> lock(uploads_mu_);
  if (GetAdapter(*id).ok()) {
    return ReplyError(res, absl::AlreadyExistsError(absl::StrCat(
                               "adapter ", *id, " is already loaded; unload it first")));
  }
  v1::LoadAdapterRequest request;
  request.set_id(*id);
  request.set_path((*fields)[1]);
  v1::AdapterInfo info;
  absl::Status status = CallUpstream(kAdapterChangeDeadline, [&](grpc::ClientContext* context) {
    return adapters_->Load(context, request, &info);
  });
  if (!status.ok()) return ReplyError(res, status);
  res.set_content(absl::StrCat("Success: LoRA adapter '", (*fields)[0], "' added successfully."),
                  "text/plain");
}

absl::StatusOr<std::string> HttpGateway::Impl::Unload(const Principal& who,
                                                      const std::string& name) {
  ASSIGN_OR_RETURN(v1::AdapterInfo info, FindVisible(who, name));
  if (!AdapterAccess::CanChange(who, info.id())) {
    return absl::PermissionDeniedError(absl::StrCat("adapter ", info.id(),
                                                    " belongs to the operators; tenant \"",
                                                    who.tenant, "\" cannot remove it"));
  }
  std::lock_guard<std::mutex> lock(uploads_mu_);
  v1::UnloadAdapterRequest request;
  request.set_id(info.id());
  v1::UnloadAdapterResponse response;
  RETURN_IF_ERROR(CallUpstream(kAdapterChangeDeadline, [&](grpc::ClientContext* context) {
    return adapters_->Unload(context, request, &response);
  }));
  return info.id();
}

void HttpGateway::Impl::HandleUnloadLora(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<Principal> who = Authenticate(req);
  if (!who.ok()) return ReplyError(res, who.status());
  absl::StatusOr<std::vector<std::string>> fields = ParseStringFields(req.body, {"lora_name"});
  if (!fields.ok()) return ReplyError(res, fields.status());
  absl::StatusOr<std::string> id = Unload(*who, (*fields)[0]);
  if (!id.ok()) return ReplyError(res, id.status());
  res.set_content(absl::StrCat("Success: LoRA adapter '", (*fields)[0], "' removed successfully."),
                  "text/plain");
}

void HttpGateway::Impl::HandleMetrics(httplib::Response& res) {
  absl::StatusOr<v1::StatsResponse> stats = UpstreamStats(kProbeDeadline);
  absl::StatusOr<v1::ListAdaptersResponse> adapters =
      stats.ok() ? UpstreamAdapters(kProbeDeadline) : stats.status();
  const bool answered = adapters.ok();
  res.set_content(metrics_.Render(answered ? &*stats : nullptr, answered ? &*adapters : nullptr),
                  "text/plain; version=0.0.4; charset=utf-8");
}

HttpGateway::HttpGateway(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<HttpGateway>> HttpGateway::Start(
    std::shared_ptr<grpc::Channel> channel, HttpGatewayOptions options, GatewayMetrics* metrics) {
  auto impl = std::make_unique<Impl>(std::move(channel), std::move(options), metrics);
  RETURN_IF_ERROR(impl->Bind());
  std::unique_ptr<HttpGateway> gateway(new HttpGateway(std::move(impl)));
  gateway->thread_ = std::thread([impl = gateway->impl_.get()] { impl->Serve(); });
  return gateway;
}

HttpGateway::~HttpGateway() { Stop(); }

int HttpGateway::port() const { return impl_->port(); }

void HttpGateway::Stop() {
  if (!thread_.joinable()) return;
  impl_->Stop();
  thread_.join();
}

}  // namespace loraserve::api
