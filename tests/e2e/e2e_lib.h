// What the C++ end-to-end tests share (grpc_e2e_test, fault_test): the real
// `loraserve serve` binary started on free loopback ports, gRPC helpers
// (greedy Generate, Upload messages), and HTTP ones over real sockets: plain
// requests and multipart uploads through cpp-httplib's client, SSE
// completions read as they stream, a raw socket for clients that misbehave,
// /metrics scraped into numbers, and the server's resident memory.
#ifndef LORASERVE_TESTS_E2E_E2E_LIB_H_
#define LORASERVE_TESTS_E2E_E2E_LIB_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/time.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace loraserve::e2e {

// ../shared beside the checkout.
extern const std::string kShared;
// A shared adapter's folder (`name` under adapters/aidreams-260k); `name`
// itself when it is a path (has a '/'), so the helpers below that take an
// adapter take any adapter folder too.
std::string AdapterDir(const std::string& name);
// aidreams-260k's weights and tokenizer with an 8192-token context
// (config.json's max_position_embeddings raised; the rest are links into
// ../shared, made once per process in a temporary folder): greedy streams of
// thousands of tokens, long enough to be caught in flight, and the shared
// adapters still fit it.
std::string LongContextModel();

// `loraserve serve` on port 0, its ports read from its log. The defaults are
// the shared model and adapters, gRPC only; `extra` flags come after (and so
// override) them, and with --http-port the HTTP port is read too. The server
// is killed with the test (PR_SET_PDEATHSIG) and by the destructor.
class ServerProcess {
 public:
  explicit ServerProcess(const std::vector<std::string>& extra = {});
  ~ServerProcess();

  // SIGTERM; waits and returns the wait status.
  int Terminate();
  void Signal(int signal);
  // The wait status once it exits within `timeout`; nullopt if it does not.
  std::optional<int> WaitExit(absl::Duration timeout);

  std::shared_ptr<grpc::Channel> channel() { return channel_; }
  int grpc_port() const { return port_; }
  int http_port() const { return http_port_; }
  pid_t pid() const { return pid_; }
  // Its stderr so far.
  std::string log() const;

 private:
  // Waits until the log matches `marker` followed by a port number.
  int WaitForPort(const std::string& marker);

  pid_t pid_ = -1;
  int log_fd_ = -1;
  int port_ = 0;
  int http_port_ = 0;
  mutable std::mutex mu_;
  std::condition_variable changed_;
  std::string log_;     // guarded by mu_
  bool closed_ = false;  // guarded by mu_: the log pipe ended
  std::thread reader_;
  std::shared_ptr<grpc::Channel> channel_;
};

// --- gRPC ---
struct Streamed {
  grpc::Status status;
  std::vector<v1::GenerateResponse> responses;
  std::vector<int32_t> ids;
  std::string text;
  std::string finish;
  int32_t completion_tokens = 0;
};

// A whole Generate stream (60 s deadline).
Streamed Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& request);
// Greedy, ignoring EOS.
v1::GenerateRequest Greedy(const std::string& text, int max_tokens,
                           const std::string& adapter = "");
std::string ReadFile(const std::string& path);

// The Upload messages for a shared adapter's files under `id`: a header,
// then the safetensors bytes in `chunk` sized pieces, the last one marked.
std::vector<v1::UploadAdapterRequest> UploadMessages(const std::string& id,
                                                     const std::string& adapter,
                                                     size_t chunk = 50000);
struct Uploaded {
  grpc::Status status;
  v1::AdapterInfo info;
};
Uploaded Upload(v1::Adapters::Stub& stub, const std::vector<v1::UploadAdapterRequest>& messages);

// grpc.health.v1.Health/Check for the server as a whole: 1 SERVING,
// 2 NOT_SERVING; nullopt when the call fails (`status` says why).
std::optional<int> HealthStatus(const std::shared_ptr<grpc::Channel>& channel,
                                grpc::Status* status = nullptr);

// --- HTTP ---
struct HttpReply {
  int status = 0;     // 0: no response (the error says why)
  std::string body;
  std::string error;  // the client's, when there was no response
  nlohmann::json Json() const;  // the body parsed (null if it is not JSON)
};
HttpReply HttpCall(int port, const std::string& method, const std::string& path,
                   const std::string& body = "",
                   absl::Duration timeout = absl::Seconds(60));
// POST /v1/adapters with a shared adapter's files as `name`, and `fields`
// (name, value) beside them.
HttpReply HttpUpload(int port, const std::string& name, const std::string& adapter,
                     bool replace = false,
                     const std::vector<std::pair<std::string, std::string>>& fields = {});
// A /v1/completions body: greedy, EOS ignored.
std::string CompletionBody(const std::string& model, int max_tokens, bool stream,
                           const std::string& prompt = "");

// A streamed completion as the client saw it.
struct SseResult {
  int status = 0;       // 0: no response
  std::string text;     // the choice's text, concatenated
  std::string finish;   // finish_reason of the last chunk
  int chunks = 0;       // text chunks
  bool done = false;    // "data: [DONE]" arrived
  std::string error;    // an {"error"} event, a non-200 body or the client's error
};
// POSTs `body` to /v1/completions and reads the SSE events as they come;
// `on_chunk` (after each text chunk) may return false to drop the connection.
SseResult StreamCompletion(int port, const std::string& body,
                           const std::function<bool(const SseResult&)>& on_chunk = nullptr,
                           absl::Duration timeout = absl::Seconds(60));

// GET /metrics as {series: value}, a series written as in the text format
// (`name` or `name{label="value",...}`); empty if the scrape failed.
std::map<std::string, double> Metrics(int port);
// One series of Metrics(port), or -1 when it is missing.
double Metric(int port, const std::string& series);

// A client socket for requests that misbehave on purpose.
class RawConnection {
 public:
  // Connects to 127.0.0.1:port; a `receive_buffer` > 0 shrinks SO_RCVBUF
  // first (a client whose window fills at once).
  explicit RawConnection(int port, int receive_buffer = 0);
  ~RawConnection();
  bool connected() const { return fd_ >= 0; }
  // Sends all of `data`; false once the server has closed or reset.
  bool Send(const std::string& data);
  // Reads what arrives within `timeout` (stops early once the peer closes).
  std::string Read(absl::Duration timeout);
  // Whether the server closed the connection within `timeout`; what it sent
  // before goes to `received`.
  bool WaitClosed(absl::Duration timeout, std::string* received = nullptr);
  void Close();
  // Closes with a reset (RST) instead of a FIN.
  void Abort();

 private:
  int fd_ = -1;
  bool peer_closed_ = false;
};

// --- the server process ---
// VmRSS of `pid` in KiB (-1 if unreadable).
int64_t RssKiB(pid_t pid);
// Regular files under `dir`, recursively (0 if it does not exist).
int CountFiles(const std::string& dir);
// Seconds since `start`.
double SecondsSince(absl::Time start);

}  // namespace loraserve::e2e

#endif  // LORASERVE_TESTS_E2E_E2E_LIB_H_
