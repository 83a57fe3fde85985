#include "tests/e2e/e2e_lib.h"

#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "base/sha256.h"
#include "gtest/gtest.h"

namespace loraserve::e2e {
namespace fs = std::filesystem;

const std::string kShared = LORASERVE_SHARED_DIR;

std::string AdapterDir(const std::string& name) {
  if (absl::StrContains(name, '/')) return name;
  return kShared + "/adapters/aidreams-260k/" + name;
}

std::string LongContextModel() {
  static const std::string dir = [] {
    std::string parent = (fs::temp_directory_path() / "loraserve-long-model-XXXXXX").string();
    EXPECT_NE(mkdtemp(parent.data()), nullptr);
    // Named as the shared model, so the HTTP API calls it the same.
    const std::string pattern = parent + "/aidreams-260k";
    fs::create_directory(pattern);
    const fs::path model = fs::path(kShared) / "models" / "aidreams-260k";
    for (const fs::directory_entry& entry : fs::directory_iterator(model)) {
      if (entry.path().filename() == "config.json") continue;
      fs::create_symlink(fs::absolute(entry.path()), fs::path(pattern) / entry.path().filename());
    }
    nlohmann::json config = nlohmann::json::parse(ReadFile((model / "config.json").string()));
    config["max_position_embeddings"] = 8192;
    std::ofstream(fs::path(pattern) / "config.json") << config.dump(2);
    // Removed when the test process exits.
    static const std::string removed_at_exit = parent;
    std::atexit([] {
      std::error_code ignored;
      fs::remove_all(removed_at_exit, ignored);
    });
    return pattern;
  }();
  return dir;
}

ServerProcess::ServerProcess(const std::vector<std::string>& extra) {
  int pipe_fds[2];
  EXPECT_EQ(pipe(pipe_fds), 0);
  std::vector<std::string> args = {LORASERVE_BINARY,
                                   "serve",
                                   "--model=" + kShared + "/models/aidreams-260k",
                                   "--adapter-dir=" + kShared + "/adapters/aidreams-260k",
                                   "--host=127.0.0.1",
                                   "--grpc-port=0",
                                   "--max-queued-requests=256",
                                   "--max-upload-bytes=1000000",
                                   "--drain-seconds=10"};
  args.insert(args.end(), extra.begin(), extra.end());
  bool http = false;
  for (const std::string& arg : extra) http |= absl::StartsWith(arg, "--http-port");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_ = fork();
  if (pid_ == 0) {
    // The server dies with the test even when the test aborts, and keeps
    // none of the test's output open (which would hang a `test | tail`).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(pipe_fds[1], STDERR_FILENO);
    const int null_fd = open("/dev/null", O_WRONLY);
    dup2(null_fd, STDOUT_FILENO);
    close(pipe_fds[0]);
    execv(argv[0], argv.data());
    _exit(127);
  }
  EXPECT_GT(pid_, 0);
  close(pipe_fds[1]);
  log_fd_ = pipe_fds[0];
  // The log is read all along, so the server never blocks on a full pipe.
  reader_ = std::thread([this] {
    char buffer[4096];
    ssize_t n;
    while ((n = read(log_fd_, buffer, sizeof(buffer))) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      log_.append(buffer, static_cast<size_t>(n));
      changed_.notify_all();
    }
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    changed_.notify_all();
  });
  port_ = WaitForPort("loraserve: listening on 127.0.0.1:");
  EXPECT_GT(port_, 0) << log();
  if (http) {
    http_port_ = WaitForPort("HTTP listening on 127.0.0.1:");
    EXPECT_GT(http_port_, 0) << log();
  }
  channel_ =
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", port_), grpc::InsecureChannelCredentials());
  // Tests start once the channel is up, as a client that waits for a server
  // does: a first connection that fails (seen once in CI as a reset on a
  // loaded machine) is retried here instead of failing a test's first calls.
  if (port_ > 0) {
    EXPECT_TRUE(
        channel_->WaitForConnected(std::chrono::system_clock::now() + std::chrono::seconds(30)))
        << "no gRPC connection to port " << port_ << "\n"
        << log();
  }
}

int ServerProcess::WaitForPort(const std::string& marker) {
  std::unique_lock<std::mutex> lock(mu_);
  int port = 0;
  changed_.wait_for(lock, std::chrono::seconds(60), [&] {
    const size_t at = log_.find(marker);
    if (at != std::string::npos) {
      const size_t start = at + marker.size();
      const size_t end = log_.find_first_not_of("0123456789", start);
      if (end != std::string::npos && absl::SimpleAtoi(log_.substr(start, end - start), &port)) {
        return true;
      }
    }
    return closed_;
  });
  return port;
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (reader_.joinable()) reader_.join();
  close(log_fd_);
}

int ServerProcess::Terminate() {
  kill(pid_, SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  return status;
}

void ServerProcess::Signal(int signal) { kill(pid_, signal); }

std::optional<int> ServerProcess::WaitExit(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t done = waitpid(pid_, &status, WNOHANG);
    if (done == pid_) {
      pid_ = -1;
      return status;
    }
    if (absl::Now() >= deadline) return std::nullopt;
    absl::SleepFor(absl::Milliseconds(5));
  }
}

std::string ServerProcess::log() const {
  std::lock_guard<std::mutex> lock(mu_);
  return log_;
}

Streamed Generate(v1::Inference::Stub& stub, const v1::GenerateRequest& request) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub.Generate(&context, request);
  Streamed out;
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
    out.responses.push_back(response);
    out.ids.push_back(response.token_id());
    out.text += response.text();
    if (!response.finish_reason().empty()) {
      out.finish = response.finish_reason();
      out.completion_tokens = response.usage().completion_tokens();
    }
  }
  out.status = reader->Finish();
  return out;
}

v1::GenerateRequest Greedy(const std::string& text, int max_tokens, const std::string& adapter) {
  v1::GenerateRequest request;
  request.set_text(text);
  request.set_max_tokens(max_tokens);
  request.set_adapter(adapter);
  request.set_ignore_eos(true);
  request.mutable_sampling()->set_temperature(0.0f);
  return request;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream out;
  out << in.rdbuf();
  EXPECT_TRUE(in.good() || in.eof()) << path;
  return out.str();
}

std::vector<v1::UploadAdapterRequest> UploadMessages(const std::string& id,
                                                     const std::string& adapter, size_t chunk) {
  const std::string dir = AdapterDir(adapter);
  const std::string tensors = ReadFile(dir + "/adapter_model.safetensors");
  std::vector<v1::UploadAdapterRequest> messages(1);
  v1::UploadHeader* header = messages[0].mutable_header();
  header->set_id(id);
  header->set_adapter_config_json(ReadFile(dir + "/adapter_config.json"));
  Sha256 hash;
  hash.Update(tensors);
  header->set_sha256(hash.HexDigest());
  header->set_total_bytes(static_cast<int64_t>(tensors.size()));
  for (size_t at = 0; at < tensors.size(); at += chunk) {
    messages.emplace_back();
    messages.back().mutable_chunk()->set_data(tensors.substr(at, chunk));
    messages.back().mutable_chunk()->set_last(at + chunk >= tensors.size());
  }
  return messages;
}

Uploaded Upload(v1::Adapters::Stub& stub, const std::vector<v1::UploadAdapterRequest>& messages) {
  grpc::ClientContext context;
  Uploaded out;
  auto writer = stub.Upload(&context, &out.info);
  for (const v1::UploadAdapterRequest& message : messages) {
    if (!writer->Write(message)) break;  // the server finished early (an error)
  }
  writer->WritesDone();
  out.status = writer->Finish();
  return out;
}

std::optional<int> HealthStatus(const std::shared_ptr<grpc::Channel>& channel,
                                grpc::Status* status) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&done](grpc::Status result) { done.set_value(result); });
  const grpc::Status result = done.get_future().get();
  if (status != nullptr) *status = result;
  if (!result.ok()) return std::nullopt;
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return std::nullopt;
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  // HealthCheckResponse: field 1 (status), a varint; absent means UNKNOWN (0).
  if (bytes.empty()) return 0;
  if (bytes.size() != 2 || bytes[0] != '\x08') return std::nullopt;
  return static_cast<int>(bytes[1]);
}

nlohmann::json HttpReply::Json() const {
  return nlohmann::json::parse(body, nullptr, /*allow_exceptions=*/false);
}

namespace {

std::unique_ptr<httplib::Client> Client(int port, absl::Duration timeout) {
  auto client = std::make_unique<httplib::Client>("127.0.0.1", port);
  const auto chrono = absl::ToChronoMicroseconds(timeout);
  client->set_read_timeout(chrono);
  client->set_write_timeout(chrono);
  client->set_connection_timeout(std::chrono::seconds(10));
  return client;
}

HttpReply ReplyOf(const httplib::Result& result) {
  HttpReply reply;
  if (!result) {
    reply.error = httplib::to_string(result.error());
    return reply;
  }
  reply.status = result->status;
  reply.body = result->body;
  return reply;
}

}  // namespace

HttpReply HttpCall(int port, const std::string& method, const std::string& path,
                   const std::string& body, absl::Duration timeout) {
  auto client = Client(port, timeout);
  if (method == "GET") return ReplyOf(client->Get(path));
  if (method == "DELETE") return ReplyOf(client->Delete(path));
  return ReplyOf(client->Post(path, body, "application/json"));
}

HttpReply HttpUpload(int port, const std::string& name, const std::string& adapter, bool replace,
                     const std::vector<std::pair<std::string, std::string>>& fields) {
  const std::string dir = AdapterDir(adapter);
  httplib::MultipartFormDataItems items = {
      {"name", name, "", ""},
      {"adapter_config.json", ReadFile(dir + "/adapter_config.json"), "adapter_config.json",
       "application/json"},
      {"adapter_model.safetensors", ReadFile(dir + "/adapter_model.safetensors"),
       "adapter_model.safetensors", "application/octet-stream"}};
  if (replace) items.push_back({"replace", "true", "", ""});
  for (const auto& [field, value] : fields) items.push_back({field, value, "", ""});
  return ReplyOf(Client(port, absl::Seconds(60))->Post("/v1/adapters", items));
}

std::string CompletionBody(const std::string& model, int max_tokens, bool stream,
                           const std::string& prompt) {
  return nlohmann::json{{"model", model},           {"prompt", prompt},
                        {"max_tokens", max_tokens}, {"temperature", 0},
                        {"ignore_eos", true},       {"stream", stream}}
      .dump();
}

SseResult StreamCompletion(int port, const std::string& body,
                           const std::function<bool(const SseResult&)>& on_chunk,
                           absl::Duration timeout) {
  auto client = Client(port, timeout);
  SseResult out;
  std::string pending;  // bytes of an event not yet complete
  std::string raw;      // the whole body, for a refusal
  bool dropped = false;
  httplib::Request request;
  request.method = "POST";
  request.path = "/v1/completions";
  request.set_header("Content-Type", "application/json");
  request.body = body;
  request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
    raw.append(data, size);
    pending.append(data, size);
    size_t end;
    while ((end = pending.find("\n\n")) != std::string::npos) {
      const std::string event = pending.substr(0, end);
      pending.erase(0, end + 2);
      if (!absl::StartsWith(event, "data: ")) continue;
      const std::string payload = event.substr(6);
      if (payload == "[DONE]") {
        out.done = true;
        continue;
      }
      const nlohmann::json chunk = nlohmann::json::parse(payload, nullptr, false);
      if (chunk.contains("error")) {
        out.error = chunk["error"].value("message", payload);
        continue;
      }
      if (!chunk.contains("choices") || chunk["choices"].empty()) continue;
      const nlohmann::json& choice = chunk["choices"][0];
      out.text += choice.value("text", "");
      if (choice["finish_reason"].is_string()) out.finish = choice["finish_reason"];
      ++out.chunks;
      if (on_chunk && !on_chunk(out)) {
        dropped = true;
        return false;
      }
    }
    return true;
  };
  httplib::Result result = client->send(request);
  if (result) {
    out.status = result->status;
    if (out.status != 200) out.error = raw;
  } else if (!dropped) {
    out.error = httplib::to_string(result.error());
  }
  return out;
}

std::map<std::string, double> Metrics(int port) {
  std::map<std::string, double> out;
  const HttpReply reply = HttpCall(port, "GET", "/metrics", "", absl::Seconds(10));
  if (reply.status != 200) return out;
  for (absl::string_view line : absl::StrSplit(reply.body, '\n')) {
    if (line.empty() || line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double value;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &value)) {
      continue;
    }
    out[std::string(line.substr(0, space))] = value;
  }
  return out;
}

double Metric(int port, const std::string& series) {
  const std::map<std::string, double> all = Metrics(port);
  auto it = all.find(series);
  return it == all.end() ? -1 : it->second;
}

RawConnection::RawConnection(int port, int receive_buffer) {
  fd_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd_ < 0) return;
  if (receive_buffer > 0) {
    setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof(receive_buffer));
  }
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) Close();
}

RawConnection::~RawConnection() { Close(); }

bool RawConnection::Send(const std::string& data) {
  size_t sent = 0;
  while (fd_ >= 0 && sent < data.size()) {
    const ssize_t n = send(fd_, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return fd_ >= 0;
}

std::string RawConnection::Read(absl::Duration timeout) {
  std::string out;
  const absl::Time deadline = absl::Now() + timeout;
  while (fd_ >= 0 && !peer_closed_) {
    const int64_t left = absl::ToInt64Milliseconds(deadline - absl::Now());
    if (left <= 0) break;
    pollfd entry{fd_, POLLIN, 0};
    if (poll(&entry, 1, static_cast<int>(left)) <= 0) break;
    char buffer[4096];
    const ssize_t n = recv(fd_, buffer, sizeof(buffer), 0);
    if (n <= 0) {
      peer_closed_ = true;
      break;
    }
    out.append(buffer, static_cast<size_t>(n));
  }
  return out;
}

bool RawConnection::WaitClosed(absl::Duration timeout, std::string* received) {
  const std::string got = Read(timeout);
  if (received != nullptr) *received += got;
  return peer_closed_;
}

void RawConnection::Abort() {
  if (fd_ < 0) return;
  linger reset{1, 0};
  setsockopt(fd_, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
  Close();
}

void RawConnection::Close() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

int64_t RssKiB(pid_t pid) {
  std::ifstream status(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(status, line)) {
    int64_t kib;
    if (absl::StartsWith(line, "VmRSS:") &&
        absl::SimpleAtoi(absl::StripSuffix(absl::StripAsciiWhitespace(line.substr(6)), " kB"),
                         &kib)) {
      return kib;
    }
  }
  return -1;
}

int CountFiles(const std::string& dir) {
  std::error_code error;
  if (!fs::exists(dir, error)) return 0;
  int count = 0;
  for (auto it = fs::recursive_directory_iterator(dir, error);
       !error && it != fs::recursive_directory_iterator(); it.increment(error)) {
    count += it->is_regular_file(error);
  }
  return count;
}

double SecondsSince(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

}  // namespace loraserve::e2e
