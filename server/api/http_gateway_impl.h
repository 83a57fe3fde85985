// The HTTP gateway's implementation, shared by the files it is split into:
// http_gateway.cc (binding, routes, authentication, upstream calls, probes
// and metrics), http_generation.cc (completions and chat, streamed or not)
// and http_adapter_handlers.cc (models, adapter upload, listing, load and
// unload). Private to those files: nothing else includes it.
#ifndef LORASERVE_SERVER_API_HTTP_GATEWAY_IMPL_H_
#define LORASERVE_SERVER_API_HTTP_GATEWAY_IMPL_H_

#include <httplib.h>

#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "server/api/choice_streams.h"
#include "server/api/gateway_metrics.h"
#include "server/api/http_connection.h"
#include "server/api/http_gateway.h"
#include "server/api/openai_protocol.h"
#include "server/api/status_mapping.h"
#include "server/api/tenants.h"

namespace loraserve::api {
namespace http_gateway_internal {

using nlohmann::json;

inline constexpr int64_t kUploadChunkBytes = int64_t{1} << 20;
// An upload's body may exceed --max-upload-bytes by its multipart framing.
inline constexpr int64_t kMultipartSlackBytes = int64_t{1} << 20;
// Unary calls to the upstream (Stats, List, Get, Tokenize; Load and Upload
// read files and may take longer).
inline constexpr absl::Duration kUnaryDeadline = absl::Seconds(10);
inline constexpr absl::Duration kAdapterChangeDeadline = absl::Minutes(5);
// /ready and /metrics: a probe must answer quickly either way.
inline constexpr absl::Duration kProbeDeadline = absl::Seconds(2);

void ReplyJson(httplib::Response& res, int status, const json& body);
void ReplyError(httplib::Response& res, const absl::Status& status);

// Runs one unary call with a deadline and translates its status.
template <typename Call>
absl::Status CallUpstream(absl::Duration deadline, Call call) {
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + deadline));
  return FromGrpcStatus(call(&context));
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

}  // namespace http_gateway_internal

class HttpGateway::Impl {
  using Api = http_gateway_internal::Api;
  using ChoiceState = http_gateway_internal::ChoiceState;
  using json = nlohmann::json;

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
  // merged_adapters as GenerateRequest.adapters: each id one `who` may use
  // (NotFound otherwise), with `model` naming the base model (model_adapter
  // is what ResolveModel made of it).
  absl::StatusOr<std::vector<v1::WeightedAdapter>> ResolveComposition(
      const Principal& who, const MergedAdapters& merged, const std::string& model_adapter,
      const v1::ServerInfo& info);
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
  void HandleListAdapters(const httplib::Request& req, httplib::Response& res);
  void HandleGetAdapter(const httplib::Request& req, httplib::Response& res);
  void HandleDeleteAdapter(const httplib::Request& req, httplib::Response& res);
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

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_HTTP_GATEWAY_IMPL_H_
