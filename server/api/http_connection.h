// The HTTP gateway's connection layer: cpp-httplib's server with the time and
// size bounds it lacks per connection (request deadline, header and body
// bytes, keep-alive), answering 408, 431 or 413 and closing lingeringly, and
// what a handler may ask of the connection it runs on.
//
// Threading: httplib runs a connection's requests and their handlers on one
// pool thread; HandlerConnection::Current() is that thread's connection.
//
// Example:
//   BoundedHttpServer server({.read_timeout = absl::Seconds(5), ...});
//   server.Post("/v1/x", [](const httplib::Request&, httplib::Response&) {
//     if (HandlerConnection* connection = HandlerConnection::Current()) {
//       connection->set_body_limit(1 << 20);
//     }
//   });
#ifndef LORASERVE_SERVER_API_HTTP_CONNECTION_H_
#define LORASERVE_SERVER_API_HTTP_CONNECTION_H_

#include <httplib.h>

#include <cstdint>

#include "absl/time/time.h"

namespace loraserve::api {

// What one HTTP connection may take of the server (HttpGatewayOptions).
struct HttpConnectionLimits {
  absl::Duration read_timeout;
  absl::Duration write_timeout;
  absl::Duration request_timeout;  // plus one second per MiB received
  absl::Duration keep_alive_timeout;
  int keep_alive_max_requests = 1;
  int64_t max_header_bytes = 0;
};

// The connection a handler runs on, as far as the handler may change it.
class HandlerConnection {
 public:
  // The calling handler thread's connection; null outside a handler.
  static HandlerConnection* Current();
  // The most body bytes this request may send (chunked bodies included).
  virtual void set_body_limit(int64_t bytes) = 0;
  // The connection ends after this request's response.
  virtual void CloseAfterResponse() = 0;
  // The client closed its side (a non-streamed request can stop working).
  virtual bool ClientGone() const = 0;

 protected:
  ~HandlerConnection() = default;
};

// httplib's server with HttpConnection in place of its socket stream: the
// keep-alive loop is httplib's own (process_server_socket), written again
// around the connection, so every connection gets the limits above.
class BoundedHttpServer final : public httplib::Server {
 public:
  explicit BoundedHttpServer(HttpConnectionLimits limits);
  // The accept queue of the listening socket: httplib listens with a
  // backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, compiled into Debian's library),
  // so a burst of more clients connecting at once waited a second for the
  // kernel to retry their SYN. Linux takes a second listen() as a new backlog.
  void RaiseListenBacklog();

 private:
  bool process_and_close_socket(socket_t sock) override;
  // Closing a socket with unread bytes resets the connection, and the client
  // may lose the response it has not read yet (curl: "Send failure: Broken
  // pipe" instead of the 413). So, after a response that left the request
  // unread: stop sending, then read and drop what the client still sends,
  // up to a bound in bytes and time (nginx's lingering close).
  static void LingeringClose(int fd);

  const HttpConnectionLimits limits_;
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_HTTP_CONNECTION_H_
