#include "server/api/http_connection.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/api/openai_protocol.h"

namespace loraserve::api {
namespace {

// One client connection as httplib reads and writes it, with the limits
// httplib lacks: its own SocketStream waits at most the read timeout for each
// read, so a client that sends a byte every few seconds (slow loris) or a
// body byte by byte would hold a server thread for as long as it likes.
// Here the request line, headers and body must arrive before a deadline
// (request_timeout, extended by a second per MiB received, so large uploads
// at a reasonable rate fit), the line and headers are bounded in bytes, and
// so is the body (per endpoint, set by the pre-routing handler). A request
// that breaks a limit ends the connection with 408, 431 or 413. The handler
// thread can also ask whether the client has gone (a non-streamed
// completion is cancelled then).
class HttpConnection final : public httplib::Stream, public HandlerConnection {
 public:
  enum class Failure { kNone, kTimeout, kHeaderTooLarge, kBodyTooLarge };

  HttpConnection(int fd, const HttpConnectionLimits& limits, std::function<bool()> stopping)
      : fd_(fd), limits_(limits), stopping_(std::move(stopping)) {}

  // Waits for the first bytes of the next request, at most `timeout` (false:
  // the client closed, went quiet, or the server is stopping).
  bool WaitForRequest(absl::Duration timeout) {
    if (pos_ < len_) return true;
    const absl::Time deadline = absl::Now() + timeout;
    return Poll(POLLIN, deadline) && !stopping_();
  }

  // Resets the per-request accounting; called before each request is read.
  void BeginRequest() {
    start_ = absl::Now();
    consumed_ = 0;
    header_bytes_ = 0;
    body_bytes_ = 0;
    in_headers_ = true;
    crlf_matched_ = 0;
    body_limit_ = std::numeric_limits<int64_t>::max();
    written_ = 0;
    failure_ = Failure::kNone;
  }

  // The most body bytes this request may send (chunked bodies included).
  void set_body_limit(int64_t bytes) override { body_limit_ = bytes; }
  // The connection ends after this request's response.
  void CloseAfterResponse() override { close_after_response_ = true; }
  bool close_after_response() const { return close_after_response_; }
  Failure failure() const { return failure_; }

  // Answers a request that broke a limit, unless a response has begun.
  void ReplyFailure() {
    if (failure_ == Failure::kNone || written_ > 0) return;
    int status = 408;
    std::string reason = "Request Timeout";
    std::string message =
        absl::StrCat("the request did not arrive within --http-request-timeout-seconds=",
                     absl::ToInt64Seconds(limits_.request_timeout),
                     " (plus 1 s per MiB sent) or a read waited past --http-read-timeout-seconds=",
                     absl::ToInt64Seconds(limits_.read_timeout));
    if (failure_ == Failure::kHeaderTooLarge) {
      status = 431;
      reason = "Request Header Fields Too Large";
      message = absl::StrCat("the request line and headers exceed --http-max-header-bytes=",
                             limits_.max_header_bytes);
    } else if (failure_ == Failure::kBodyTooLarge) {
      status = 413;
      reason = "Payload Too Large";
      message = absl::StrCat("the request body exceeds its limit of ", body_limit_,
                             " bytes (--http-max-body-bytes, uploads --max-upload-bytes)");
    }
    const std::string body = JsonText(ErrorBody(status, message));
    const std::string response =
        absl::StrCat("HTTP/1.1 ", status, " ", reason,
                     "\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     "Content-Length: ",
                     body.size(), "\r\n\r\n", body);
    failure_ = Failure::kNone;  // lets write() send it
    WriteAll(response.data(), response.size());
  }

  // Whether the client has closed its side (or reset the connection).
  bool ClientGone() const override {
    if (pos_ < len_) return false;
    char byte;
    const ssize_t n = recv(fd_, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true;
    return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
  }

  bool is_readable() const override {
    return pos_ < len_ || Poll(POLLIN, absl::Now() + limits_.read_timeout);
  }
  bool is_writable() const override {
    return failure_ == Failure::kNone && Poll(POLLOUT, absl::Now() + limits_.write_timeout);
  }

  ssize_t read(char* ptr, size_t size) override {
    if (size == 0) return 0;
    if (failure_ != Failure::kNone) return -1;
    if (pos_ == len_ && !Fill()) return -1;
    const size_t n = std::min(size, len_ - pos_);
    const char* data = buffer_ + pos_;
    size_t i = 0;
    // Only the bytes handed to httplib count: with keep-alive, those after a
    // request's body belong to the next request.
    for (; in_headers_ && i < n; ++i) {
      constexpr char kEnd[] = "\r\n\r\n";
      crlf_matched_ = data[i] == kEnd[crlf_matched_] ? crlf_matched_ + 1 : (data[i] == '\r');
      if (++header_bytes_ > limits_.max_header_bytes) {
        failure_ = Failure::kHeaderTooLarge;
        return -1;
      }
      if (crlf_matched_ == 4) in_headers_ = false;
    }
    body_bytes_ += static_cast<int64_t>(n - i);
    if (body_bytes_ > body_limit_) {
      failure_ = Failure::kBodyTooLarge;
      return -1;
    }
    std::memcpy(ptr, data, n);
    pos_ += n;
    consumed_ += static_cast<int64_t>(n);
    return static_cast<ssize_t>(n);
  }

  ssize_t write(const char* ptr, size_t size) override {
    if (failure_ != Failure::kNone) return -1;  // a failed request is answered by ReplyFailure
    if (!Poll(POLLOUT, absl::Now() + limits_.write_timeout)) return -1;
    ssize_t n;
    do {
      n = send(fd_, ptr, size, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n > 0) written_ += n;
    return n;
  }

  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    Address(getpeername, ip, port);
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    Address(getsockname, ip, port);
  }
  socket_t socket() const override { return fd_; }

 private:
  // Waits until fd_ is ready for `events` or the deadline passes (false).
  // A wait to read also ends when the server stops (false; checked in
  // slices): an idle or half-sent request is dropped then, while responses
  // being written finish.
  bool Poll(short events, absl::Time deadline) const {
    while (events != POLLIN || !stopping_()) {
      const absl::Duration left = deadline - absl::Now();
      if (left <= absl::ZeroDuration()) return false;
      pollfd entry{fd_, events, 0};
      const int ms = static_cast<int>(std::clamp<int64_t>(absl::ToInt64Milliseconds(left), 1, 100));
      const int ready = poll(&entry, 1, ms);
      if (ready < 0 && errno != EINTR) return false;
      if (ready > 0) return true;
    }
    return false;
  }

  // Reads what the client has sent into buffer_, within the read timeout and
  // the request's deadline.
  bool Fill() {
    const absl::Time deadline =
        start_ + limits_.request_timeout +
        absl::Seconds(static_cast<double>(consumed_) / static_cast<double>(1 << 20));
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      failure_ = Failure::kTimeout;
      return false;
    }
    if (!Poll(POLLIN, std::min(deadline, now + limits_.read_timeout))) {
      if (!stopping_()) failure_ = Failure::kTimeout;
      return false;
    }
    ssize_t n;
    do {
      n = recv(fd_, buffer_, sizeof(buffer_), 0);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) return false;
    pos_ = 0;
    len_ = static_cast<size_t>(n);
    return true;
  }

  void WriteAll(const char* data, size_t size) {
    while (size > 0) {
      const ssize_t n = write(data, size);
      if (n <= 0) return;
      data += n;
      size -= static_cast<size_t>(n);
    }
  }

  template <typename GetName>
  void Address(GetName get_name, std::string& ip, int& port) const {
    sockaddr_storage address{};
    socklen_t size = sizeof(address);
    ip.clear();
    port = 0;
    if (get_name(fd_, reinterpret_cast<sockaddr*>(&address), &size) != 0) return;
    char text[INET6_ADDRSTRLEN] = {};
    if (address.ss_family == AF_INET) {
      const auto* in = reinterpret_cast<const sockaddr_in*>(&address);
      inet_ntop(AF_INET, &in->sin_addr, text, sizeof(text));
      port = ntohs(in->sin_port);
    } else if (address.ss_family == AF_INET6) {
      const auto* in = reinterpret_cast<const sockaddr_in6*>(&address);
      inet_ntop(AF_INET6, &in->sin6_addr, text, sizeof(text));
      port = ntohs(in->sin6_port);
    }
    ip = text;
  }

  const int fd_;
  const HttpConnectionLimits limits_;
  const std::function<bool()> stopping_;
  char buffer_[4096];
  size_t pos_ = 0;
  size_t len_ = 0;
  absl::Time start_;
  int64_t consumed_ = 0;
  int64_t header_bytes_ = 0;
  int64_t body_bytes_ = 0;
  bool in_headers_ = true;
  int crlf_matched_ = 0;
  int64_t body_limit_ = std::numeric_limits<int64_t>::max();
  int64_t written_ = 0;
  bool close_after_response_ = false;
  Failure failure_ = Failure::kNone;
};

// The connection the calling handler thread serves (null elsewhere): httplib
// runs a connection's requests and their handlers on one pool thread.
thread_local HttpConnection* current_connection = nullptr;

constexpr int kListenBacklog = 1024;
constexpr absl::Duration kLingerTime = absl::Seconds(1);
constexpr int64_t kLingerBytes = int64_t{64} << 20;

}  // namespace

HandlerConnection* HandlerConnection::Current() { return current_connection; }

BoundedHttpServer::BoundedHttpServer(HttpConnectionLimits limits) : limits_(limits) {
  set_read_timeout(absl::ToInt64Seconds(limits.read_timeout));
  set_write_timeout(absl::ToInt64Seconds(limits.write_timeout));
  // What the Keep-Alive response header announces.
  set_keep_alive_timeout(absl::ToInt64Seconds(limits.keep_alive_timeout));
  set_keep_alive_max_count(static_cast<size_t>(limits.keep_alive_max_requests));
}

void BoundedHttpServer::RaiseListenBacklog() { ::listen(svr_sock_, kListenBacklog); }

bool BoundedHttpServer::process_and_close_socket(socket_t sock) {
  bool ret = false;
  bool linger = false;
  {
    HttpConnection connection(sock, limits_, [this] { return svr_sock_ == INVALID_SOCKET; });
    current_connection = &connection;
    int left = std::max(1, limits_.keep_alive_max_requests);
    while (left > 0 && svr_sock_ != INVALID_SOCKET &&
           connection.WaitForRequest(limits_.keep_alive_timeout)) {
      connection.BeginRequest();
      bool connection_closed = false;
      ret = process_request(connection, /*close_connection=*/left == 1, connection_closed, nullptr);
      const HttpConnection::Failure failure = connection.failure();
      if (failure != HttpConnection::Failure::kNone) {
        connection.ReplyFailure();
        // A client still sending a body or headers past their limit.
        linger = failure != HttpConnection::Failure::kTimeout;
        ret = false;
        break;
      }
      if (connection.close_after_response()) linger = true;  // a 413 before the body
      if (!ret || connection_closed || connection.close_after_response()) break;
      --left;
    }
    current_connection = nullptr;
  }
  if (linger) LingeringClose(sock);
  ::shutdown(sock, SHUT_RDWR);
  ::close(sock);
  return ret;
}

void BoundedHttpServer::LingeringClose(int fd) {
  ::shutdown(fd, SHUT_WR);
  const absl::Time deadline = absl::Now() + kLingerTime;
  int64_t dropped = 0;
  char buffer[16384];
  while (dropped < kLingerBytes) {
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    pollfd entry{fd, POLLIN, 0};
    if (left <= 0 || poll(&entry, 1, static_cast<int>(left)) <= 0) return;
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) return;
    dropped += n;
  }
}

}  // namespace loraserve::api
