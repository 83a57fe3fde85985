// Load generator for a running `loraserve serve`, over gRPC or (--http) over
// the OpenAI-compatible HTTP API with SSE streaming.
//
//   grpc_load --target 127.0.0.1:50051 --adapters ocean,robot --clients 8 --seconds 30
//   grpc_load --target 127.0.0.1:50051 --make-adapters 8 --preset tinyllama-1.1b
//             --rank 16 --clients 8 --seconds 60
//   grpc_load --target ... --rate 4 --zipf 1.1 --make-adapters 64 --preset tiny --seconds 60
//   grpc_load --target 127.0.0.1:50051 --http 127.0.0.1:8080 --make-adapters 8 ...
//
// Closed loop (default): --clients threads, each sending its next request as
// soon as the last finished. Open loop (--rate R): Poisson arrivals at R
// requests/s. Each request picks an adapter: client i uses adapter i (mod N)
// in the closed loop, or a Zipf(--zipf) draw over the N adapters in the open
// loop (--zipf 0: uniform). Prompt and output lengths are uniform in their
// ranges. --make-adapters N writes N seeded random all-projection PEFT
// adapters for --preset's shapes and loads them through Adapters.Load (the
// server must see the same file system; adapters are always loaded over
// gRPC). With --http HOST:PORT the requests go to POST /v1/completions
// (stream: true, prompts as token ids, single-user mode: no API key) and the
// timings are those of the SSE events. --llama-lora N (with --http): the
// server is llama.cpp's llama-server started with N adapters, best at scale
// 0 (`--lora-scaled FILE:0`: a request without the field below gets every
// adapter at its global scale, 1 even with --lora-init-without-apply);
// requests pick adapter k as above and name it in llama-server's per-request
// field "lora": [{"id": k, "scale": 1}] (the others get 0) on the base model.
// --scrape-every-ms N (with --http): one more thread GETs /metrics every N ms
// while the load runs, as a Prometheus server or the inference gateway's
// endpoint picker would, and the scrapes' p50/p99 time and size are reported
// (run with and without it, side by side, for what scraping costs the engine).
// Prints one JSON object: throughput, TTFT and TPOT p50/p99, failures.
#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "adapters/dummy_adapter.h"
#include "adapters/lora_adapter.h"
#include "base/status_macros.h"
#include "bench/bench_support.h"
#include "formats/model_config.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, target, "127.0.0.1:50051", "Server address");
ABSL_FLAG(std::string, http, "",
          "HOST:PORT of the server's HTTP API: send the requests there instead of over gRPC");
ABSL_FLAG(std::vector<std::string>, adapters, {}, "Adapter ids to spread requests over");
ABSL_FLAG(int32_t, make_adapters, 0, "Write and load this many random adapters (needs --preset)");
ABSL_FLAG(std::string, preset, "", "Dummy preset whose shapes --make-adapters uses");
ABSL_FLAG(int32_t, rank, 16, "Rank of the --make-adapters adapters");
ABSL_FLAG(bool, base_only, false, "Send every request to the base model");
ABSL_FLAG(int32_t, clients, 8, "Closed loop: concurrent clients");
ABSL_FLAG(double, rate, 0, "Open loop: Poisson arrivals per second (0 = closed loop)");
ABSL_FLAG(double, zipf, 1.0, "Open loop: Zipf exponent of the adapter choice (0 = uniform)");
ABSL_FLAG(double, seconds, 30, "How long to send requests");
ABSL_FLAG(int32_t, prompt_min, 8, "Shortest prompt (tokens)");
ABSL_FLAG(int32_t, prompt_max, 16, "Longest prompt (tokens)");
ABSL_FLAG(int32_t, output_min, 32, "Fewest generated tokens");
ABSL_FLAG(int32_t, output_max, 32, "Most generated tokens");
ABSL_FLAG(int32_t, vocab, 500, "Prompt token ids are drawn from [3, vocab)");
ABSL_FLAG(int32_t, scrape_every_ms, 0,
          "With --http: GET /metrics this often while the load runs (0 = never)");
ABSL_FLAG(int32_t, llama_lora, 0,
          "With --http: spread requests over llama-server's first N --lora adapters, selected "
          "per request by its \"lora\" field");

namespace loraserve {
namespace {

using Clock = std::chrono::steady_clock;

struct Sample {
  double ttft_s = 0;
  double tpot_s = 0;  // mean time per output token after the first
  int64_t tokens = 0;
  bool ok = false;
};

// Counts the tokens of one stream as they arrive.
class StreamTimer {
 public:
  StreamTimer() : start_(Clock::now()) {}
  void Token() {
    last_ = Clock::now();
    if (sample_.tokens++ == 0) first_ = last_;
  }
  // The server's own count of the stream's tokens, when it gave one: some
  // streams carry several tokens in one event, or end with an event of none.
  void ReportedTokens(int64_t tokens) { reported_ = tokens; }
  Sample Finish(bool ok) {
    sample_.ok = ok && sample_.tokens > 0;
    if (reported_ > 0) sample_.tokens = reported_;
    if (sample_.ok) {
      sample_.ttft_s = std::chrono::duration<double>(first_ - start_).count();
      if (sample_.tokens > 1) {
        sample_.tpot_s =
            std::chrono::duration<double>(last_ - first_).count() / (sample_.tokens - 1);
      }
    }
    return sample_;
  }

 private:
  Sample sample_;
  int64_t reported_ = 0;
  Clock::time_point start_, first_, last_;
};

class Load {
 public:
  // `http` empty: requests over `channel`; else HOST:PORT of the HTTP API,
  // whose base model is `base_model`.
  // `llama_lora`: the adapter ids are llama-server LoRA indices ("0", "1", ...).
  Load(std::shared_ptr<grpc::Channel> channel, const std::string& http,
       const std::string& base_model, bool llama_lora = false)
      : stub_(v1::Inference::NewStub(channel)), base_model_(base_model), llama_lora_(llama_lora) {
    if (!http.empty()) {
      http_ = std::make_unique<httplib::Client>(absl::StrCat("http://", http));
      // A loaded server may take many seconds to its first byte (a round of
      // prefills): the client's default of 5 s would drop the request.
      http_->set_read_timeout(std::chrono::seconds(600));
    }
  }

  // One streamed request; timings from the client's view.
  Sample Request(const std::string& adapter, std::mt19937& rng) {
    std::uniform_int_distribution<int32_t> prompt_len(absl::GetFlag(FLAGS_prompt_min),
                                                      absl::GetFlag(FLAGS_prompt_max));
    std::uniform_int_distribution<int32_t> output_len(absl::GetFlag(FLAGS_output_min),
                                                      absl::GetFlag(FLAGS_output_max));
    std::uniform_int_distribution<int32_t> token(3, absl::GetFlag(FLAGS_vocab) - 1);
    std::vector<int32_t> prompt(prompt_len(rng));
    for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = i == 0 ? 1 : token(rng);
    const int32_t max_tokens = output_len(rng);
    if (http_ != nullptr) return HttpRequest(adapter, prompt, max_tokens);
    v1::GenerateRequest request;
    request.mutable_token_ids()->mutable_ids()->Assign(prompt.begin(), prompt.end());
    request.set_max_tokens(max_tokens);
    request.set_ignore_eos(true);
    request.set_adapter(adapter);
    request.mutable_sampling()->set_temperature(0.0f);
    grpc::ClientContext context;
    StreamTimer timer;
    auto reader = stub_->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) timer.Token();
    return timer.Finish(reader->Finish().ok());
  }

 private:
  // An SSE event with a choice carries a token, unless it is a closing event
  // (no text, a finish_reason) as some servers send; the usage event at the
  // end gives the server's count of the tokens.
  Sample HttpRequest(const std::string& adapter, const std::vector<int32_t>& prompt,
                     int32_t max_tokens) {
    nlohmann::json body = {{"model", adapter.empty() || llama_lora_ ? base_model_ : adapter},
                           {"prompt", prompt},
                           {"max_tokens", max_tokens},
                           {"temperature", 0},
                           {"ignore_eos", true},
                           {"stream", true},
                           {"stream_options", {{"include_usage", true}}}};
    if (llama_lora_ && !adapter.empty()) {
      body["lora"] = nlohmann::json::array({{{"id", std::stoi(adapter)}, {"scale", 1.0}}});
    }
    httplib::Request request;
    request.method = "POST";
    request.path = "/v1/completions";
    request.body = body.dump();
    request.set_header("Content-Type", "application/json");
    StreamTimer timer;
    std::string pending;
    request.content_receiver = [&](const char* data, size_t size, uint64_t, uint64_t) {
      pending.append(data, size);
      for (size_t end = pending.find("\n\n"); end != std::string::npos;
           end = pending.find("\n\n")) {
        if (pending.compare(0, 6, "data: ") == 0 && pending.compare(6, 6, "[DONE]") != 0) {
          CountEvent(nlohmann::json::parse(pending.substr(6, end - 6), nullptr, false), timer);
        }
        pending.erase(0, end + 2);
      }
      return true;
    };
    httplib::Result result = http_->send(request);
    return timer.Finish(result && result->status == 200);
  }

  static void CountEvent(const nlohmann::json& event, StreamTimer& timer) {
    if (!event.is_object()) return;
    const auto usage = event.find("usage");
    if (usage != event.end() && usage->is_object()) {
      timer.ReportedTokens(usage->value("completion_tokens", int64_t{0}));
    }
    const auto choices = event.find("choices");
    if (choices == event.end() || !choices->is_array() || choices->empty()) return;
    const nlohmann::json& choice = choices->front();
    const bool closing = choice.value("text", std::string()).empty() &&
                         choice.contains("finish_reason") && !choice["finish_reason"].is_null();
    if (!closing) timer.Token();
  }

  std::unique_ptr<v1::Inference::Stub> stub_;
  std::unique_ptr<httplib::Client> http_;
  std::string base_model_;
  bool llama_lora_ = false;
};

// The HTTP API's base model name (the first entry of GET /v1/models).
absl::StatusOr<std::string> HttpBaseModel(const std::string& http) {
  httplib::Client client(absl::StrCat("http://", http));
  httplib::Result result = client.Get("/v1/models");
  if (!result || result->status != 200) {
    return absl::UnavailableError(absl::StrCat("GET http://", http, "/v1/models failed"));
  }
  const nlohmann::json models = nlohmann::json::parse(result->body, nullptr, false);
  if (!models.is_object() || !models.contains("data") || models["data"].empty()) {
    return absl::UnavailableError(absl::StrCat("GET http://", http, "/v1/models: no models"));
  }
  return models["data"][0].value("id", "");
}

absl::StatusOr<std::vector<std::string>> PrepareAdapters(std::shared_ptr<grpc::Channel> channel) {
  std::vector<std::string> ids = absl::GetFlag(FLAGS_adapters);
  const int32_t make = absl::GetFlag(FLAGS_make_adapters);
  if (make == 0) return ids;
  ASSIGN_OR_RETURN(formats::ModelConfig config, formats::DummyPreset(absl::GetFlag(FLAGS_preset)));
  const adapters::BaseModelShape shape = adapters::LlamaBaseShape(
      config.num_hidden_layers, config.hidden_size, config.intermediate_size,
      config.num_attention_heads, config.num_key_value_heads, config.head_dim);
  const std::string root =
      (std::filesystem::temp_directory_path() / absl::StrCat("loraserve_load_", ::getpid()))
          .string();
  auto stub = v1::Adapters::NewStub(channel);
  for (int32_t i = 0; i < make; ++i) {
    const std::string dir = absl::StrCat(root, "/a", i);
    RETURN_IF_ERROR(adapters::WriteDummyAdapter(dir, shape,
                                                {.rank = absl::GetFlag(FLAGS_rank),
                                                 .alpha = 2.0 * absl::GetFlag(FLAGS_rank),
                                                 .seed = static_cast<uint64_t>(i)}));
    v1::LoadAdapterRequest load;
    load.set_id(absl::StrCat("load/a", i));
    load.set_path(dir);
    v1::AdapterInfo info;
    grpc::ClientContext context;
    const grpc::Status status = stub->Load(&context, load, &info);
    if (!status.ok()) {
      return absl::UnavailableError(
          absl::StrCat("Adapters.Load ", load.id(), ": ", status.error_message()));
    }
    ids.push_back(load.id());
  }
  return ids;
}

absl::Status Run() {
  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_target), grpc::InsecureChannelCredentials());
  const std::string http = absl::GetFlag(FLAGS_http);
  const int32_t llama_lora = absl::GetFlag(FLAGS_llama_lora);
  std::vector<std::string> ids;
  if (llama_lora > 0) {
    if (http.empty()) return absl::InvalidArgumentError("--llama_lora needs --http");
    for (int32_t i = 0; i < llama_lora; ++i) ids.push_back(absl::StrCat(i));
  } else {
    ASSIGN_OR_RETURN(ids, PrepareAdapters(channel));
  }
  if (absl::GetFlag(FLAGS_base_only) || ids.empty()) ids = {""};
  std::string base_model;
  if (!http.empty()) {
    ASSIGN_OR_RETURN(base_model, HttpBaseModel(http));
  }
  const auto deadline =
      Clock::now() + std::chrono::duration_cast<Clock::duration>(
                         std::chrono::duration<double>(absl::GetFlag(FLAGS_seconds)));
  std::mutex mu;
  std::vector<Sample> samples;
  auto record = [&](const Sample& s) {
    std::lock_guard<std::mutex> lock(mu);
    samples.push_back(s);
  };
  const int32_t scrape_every_ms = absl::GetFlag(FLAGS_scrape_every_ms);
  if (scrape_every_ms > 0 && http.empty()) {
    return absl::InvalidArgumentError("--scrape_every_ms needs --http");
  }
  std::vector<double> scrape_seconds;
  size_t scrape_bytes = 0;
  int64_t failed_scrapes = 0;
  std::thread scraper;
  if (scrape_every_ms > 0) {
    scraper = std::thread([&] {
      httplib::Client client(absl::StrCat("http://", http));
      for (Clock::time_point next = Clock::now(); next < deadline;
           next += std::chrono::milliseconds(scrape_every_ms)) {
        std::this_thread::sleep_until(next);
        const Clock::time_point sent = Clock::now();
        httplib::Result result = client.Get("/metrics");
        if (!result || result->status != 200) {
          ++failed_scrapes;
          continue;
        }
        scrape_seconds.push_back(std::chrono::duration<double>(Clock::now() - sent).count());
        scrape_bytes = result->body.size();
      }
    });
  }
  std::vector<std::thread> threads;
  const Clock::time_point start = Clock::now();
  const double rate = absl::GetFlag(FLAGS_rate);
  if (rate <= 0) {
    for (int32_t c = 0; c < absl::GetFlag(FLAGS_clients); ++c) {
      threads.emplace_back([&, c] {
        Load load(channel, http, base_model, llama_lora > 0);
        std::mt19937 rng(c);
        while (Clock::now() < deadline) record(load.Request(ids[c % ids.size()], rng));
      });
    }
  } else {
    // Poisson arrivals; each request on its own thread so arrivals never wait.
    std::mt19937 rng(0);
    std::exponential_distribution<double> gap(rate);
    std::vector<double> weights(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      weights[i] = 1.0 / std::pow(static_cast<double>(i + 1), absl::GetFlag(FLAGS_zipf));
    }
    std::discrete_distribution<size_t> zipf(weights.begin(), weights.end());
    Clock::time_point next = Clock::now();
    int seed = 0;
    while (next < deadline) {
      std::this_thread::sleep_until(next);
      const std::string adapter = ids[zipf(rng)];
      threads.emplace_back([&, adapter, s = ++seed] {
        Load load(channel, http, base_model, llama_lora > 0);
        std::mt19937 request_rng(s);
        record(load.Request(adapter, request_rng));
      });
      next += std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(gap(rng)));
    }
  }
  for (auto& t : threads) t.join();
  if (scraper.joinable()) scraper.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  std::vector<double> ttft, tpot;
  int64_t tokens = 0, failed = 0;
  for (const Sample& s : samples) {
    if (!s.ok) {
      ++failed;
      continue;
    }
    tokens += s.tokens;
    ttft.push_back(s.ttft_s);
    if (s.tokens > 1) tpot.push_back(s.tpot_s);
  }
  std::printf(
      "{\"bench\": \"grpc_load\", \"api\": \"%s\", \"mode\": \"%s\", \"adapters\": %zu, "
      "\"requests\": %zu, "
      "\"failed\": %lld, \"seconds\": %.1f, \"output_tokens_per_s\": %.2f, "
      "\"ttft_p50_ms\": %.1f, \"ttft_p99_ms\": %.1f, \"tpot_p50_ms\": %.1f, \"tpot_p99_ms\": "
      "%.1f, \"scrapes\": %zu, \"failed_scrapes\": %lld, \"scrape_p50_ms\": %.2f, "
      "\"scrape_p99_ms\": %.2f, \"scrape_bytes\": %zu}\n",
      http.empty() ? "grpc" : "http",
      rate > 0
          ? absl::StrFormat("poisson %.2f/s zipf %.2f", rate, absl::GetFlag(FLAGS_zipf)).c_str()
          : absl::StrCat("closed ", absl::GetFlag(FLAGS_clients), " clients").c_str(),
      ids.size(), samples.size(), static_cast<long long>(failed), elapsed, tokens / elapsed,
      bench::Percentile(ttft, 0.5) * 1e3, bench::Percentile(ttft, 0.99) * 1e3,
      bench::Percentile(tpot, 0.5) * 1e3, bench::Percentile(tpot, 0.99) * 1e3,
      scrape_seconds.size(), static_cast<long long>(failed_scrapes),
      bench::Percentile(scrape_seconds, 0.5) * 1e3, bench::Percentile(scrape_seconds, 0.99) * 1e3,
      scrape_bytes);
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  return loraserve::bench::BenchMain(argc, argv, "grpc_load", loraserve::Run);
}
