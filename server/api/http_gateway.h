// The HTTP front of loraserve: OpenAI-compatible completions and chat (with
// SSE streaming), models, vLLM's load/unload_lora_adapter, adapter uploads
// per tenant, health/readiness and Prometheus metrics.
//
// It is a client of the gRPC services (proto/loraserve/v1): `loraserve serve
// --http-port` hands it an in-process channel to its own server, `loraserve
// gateway --upstream` a channel to a replica, and the same code serves both.
// Everything about tenants lives here: API keys (`Authorization: Bearer`),
// which adapters a tenant may see, use and change (tenants.h), quotas and
// rate limits. The gRPC API itself stays unauthenticated and bound to
// loopback unless the operator says otherwise.
//
// HTTP library: cpp-httplib (Debian's libcpp-httplib-dev): a blocking
// thread-pool server with chunked responses (SSE) and multipart parsing, which
// fits a gateway whose handlers wait on gRPC streams; Boost.Beast would need
// an async design for the same, and Debian packages nothing lighter with
// multipart support.
//
// Threads: httplib's pool (--http-threads) runs the handlers, one connection
// each; a completion request adds one reader thread per choice
// (ChoiceStreams). Ownership: the gateway owns its server thread and
// metrics; the channel is shared.
//
// Example:
//   ASSIGN_OR_RETURN(auto gateway, HttpGateway::Start(server->InProcessChannel({}),
//                                                     {.host = "127.0.0.1", .port = 8080}));
//   ... gateway->Stop();
#ifndef LORASERVE_SERVER_API_HTTP_GATEWAY_H_
#define LORASERVE_SERVER_API_HTTP_GATEWAY_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/api/gateway_metrics.h"
#include "server/api/openai_protocol.h"
#include "server/api/tenants.h"

namespace loraserve::api {

struct HttpGatewayOptions {
  std::string host = "127.0.0.1";
  int port = 8080;   // 0 picks a free one
  int threads = 64;  // connections served at once
  // Absent: single-user mode, every caller is an admin of the operators' tenant.
  std::optional<ApiKeys> api_keys;
  TenantQuota tenant_quota;
  RateLimits rate_limits;  // per tenant; admins are not limited
  int64_t max_upload_bytes = int64_t{1} << 30;
  ParseLimits parse_limits;
  // What one connection may take (HttpConnectionLimits in http_gateway.cc):
  // a read waits at most read_timeout for the client's next bytes and a
  // write write_timeout for room in its window; a request's line, headers
  // and body must arrive within request_timeout plus one second per MiB
  // received (a slow-loris client is cut off with 408); the request line
  // and headers take at most max_header_bytes (431); a body other than an
  // upload's at most max_body_bytes (413; uploads: max_upload_bytes plus
  // 1 MiB of multipart framing). An idle connection is closed after
  // keep_alive_timeout, and after keep_alive_max_requests requests.
  absl::Duration read_timeout = absl::Seconds(5);
  absl::Duration write_timeout = absl::Seconds(10);
  absl::Duration request_timeout = absl::Seconds(30);
  absl::Duration keep_alive_timeout = absl::Seconds(5);
  int keep_alive_max_requests = 100;
  int64_t max_header_bytes = int64_t{64} << 10;
  int64_t max_body_bytes = int64_t{16} << 20;
};

class HttpGateway {
 public:
  // Binds and starts serving on its own thread; fails when it cannot bind.
  // `channel` reaches the Inference and Adapters services; the upstream need
  // not be up yet (GET /ready says when it is). `metrics` records the
  // requests and renders GET /metrics; it must outlive the gateway.
  static absl::StatusOr<std::unique_ptr<HttpGateway>> Start(std::shared_ptr<grpc::Channel> channel,
                                                            HttpGatewayOptions options,
                                                            GatewayMetrics* metrics);
  ~HttpGateway();  // Stop()

  int port() const;
  // Stops accepting connections, lets in-flight requests finish (their
  // upstream calls end when the upstream drains), and joins.
  void Stop();

 private:
  class Impl;
  explicit HttpGateway(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::thread thread_;  // runs the server's accept loop
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_HTTP_GATEWAY_H_
