// The HTTP gateway's core: binding and routes, authentication, the calls to
// the upstream gRPC server, the probes and /metrics. The handlers live in
// http_generation.cc and http_adapter_handlers.cc (see http_gateway_impl.h).
#include "server/api/http_gateway.h"

#include <httplib.h>

#include <algorithm>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "server/api/gateway_metrics.h"
#include "server/api/http_connection.h"
#include "server/api/http_gateway_impl.h"
#include "server/api/status_mapping.h"

namespace loraserve::api {
namespace http_gateway_internal {

void ReplyJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(JsonText(body), "application/json");
}

void ReplyError(httplib::Response& res, const absl::Status& status) {
  ReplyJson(res, HttpStatusFor(status), ErrorBody(status));
}

}  // namespace http_gateway_internal

using http_gateway_internal::CallUpstream;
using http_gateway_internal::kMultipartSlackBytes;
using http_gateway_internal::kProbeDeadline;
using http_gateway_internal::kUnaryDeadline;
using http_gateway_internal::ReplyError;
using http_gateway_internal::ReplyJson;

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
    HandleListAdapters(req, res);
  });
  server_.Get(R"(/v1/adapters/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    HandleGetAdapter(req, res);
  });
  server_.Delete(R"(/v1/adapters/(.+))",
                 [this](const httplib::Request& req, httplib::Response& res) {
                   HandleDeleteAdapter(req, res);
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

absl::StatusOr<std::vector<v1::WeightedAdapter>> HttpGateway::Impl::ResolveComposition(
    const Principal& who, const MergedAdapters& merged, const std::string& model_adapter,
    const v1::ServerInfo& info) {
  if (!model_adapter.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("with \"merged_adapters\", \"model\" must name the base model (\"",
                     info.model(), "\"), not an adapter"));
  }
  std::vector<v1::WeightedAdapter> parts;
  for (size_t i = 0; i < merged.ids.size(); ++i) {
    absl::StatusOr<v1::AdapterInfo> adapter = FindVisible(who, merged.ids[i]);
    if (absl::IsNotFound(adapter.status())) {
      return absl::NotFoundError(absl::StrCat("merged_adapters: \"", merged.ids[i],
                                              "\" is not an adapter you can use (GET /v1/models)"));
    }
    RETURN_IF_ERROR(adapter.status());
    v1::WeightedAdapter& part = parts.emplace_back();
    part.set_id(adapter->id());
    part.set_weight(merged.weights[i]);
  }
  return parts;
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
