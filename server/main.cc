// loraserve: flags -> config (RuntimeConfig; the stack below the APIs is built by server/runtime.h,
// the same for every command) -> wiring. Subcommands:
//   loraserve generate --model DIR --prompt TEXT [--max-tokens N] [--temperature T] [--seed S]
//                      [--adapter NAME=DIR]... [--adapter-dir DIR] [--lora NAME]
//   loraserve serve --model DIR [--adapter-dir DIR] [--grpc-port 50051] ...
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <future>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "adapters/merge_policy.h"
#include "adapters/registry.h"
#include "base/flag_names.h"
#include "base/status_macros.h"
#include "formats/chat_template.h"
#include "server/api/adapters_service.h"
#include "server/api/http_gateway.h"
#include "server/api/inference_service.h"
#include "server/engine/engine.h"
#include "server/engine/engine_loop.h"
#include "server/runtime.h"
#include "server/tokenizer/tokenizer.h"

ABSL_FLAG(std::string, model, "",
          "Hugging Face model directory, or a preset name with --load-format dummy");
ABSL_FLAG(std::string, load_format, "auto",
          "auto: read the checkpoint; dummy: seeded random weights (--model names a preset or a "
          "directory whose config.json gives the shapes)");
ABSL_FLAG(std::string, tokenizer, "",
          "Directory with tokenizer.json (default: the model directory)");
ABSL_FLAG(std::string, device, "cpu",
          "Compute device: cpu, or cuda (fails with a clear message without a GPU)");
ABSL_FLAG(bool, cuda_graphs, true,
          "On --device cuda, run decode steps as recorded CUDA graphs (batches padded to "
          "1, 2, 4, 8, then multiples of 8 up to 256)");
ABSL_FLAG(int32_t, threads, 0, "CPU threads for GEMM and kernels (0 = all cores)");
ABSL_FLAG(std::string, dtype, "auto",
          "Weight dtype: auto (the checkpoint's torch_dtype; on --device cuda bfloat16, float16 "
          "checkpoints staying float16), float32, bfloat16 or float16 (converted once at load; "
          "activations stay float32)");
ABSL_FLAG(std::string, quantization, "none",
          "none, or int8: weight-only int8 quantized at load in groups of 128 along each row "
          "(--device cpu; --dtype must stay auto)");
ABSL_FLAG(int64_t, kv_cache_bytes, int64_t{1} << 30, "Bytes of KV cache");
ABSL_FLAG(int32_t, block_size, 16, "Tokens per KV cache block");
ABSL_FLAG(int32_t, max_batch_tokens, 2048, "Most tokens (prompt + decode) in one step");
ABSL_FLAG(std::string, adapter_dir, "",
          "Directory whose subfolders are PEFT LoRA adapters, each named by its folder");
ABSL_FLAG(std::string, adapter_resolver_dir, "",
          "Folder an adapter that is not loaded is loaded from on its first request: "
          "DIR/NAME for a bare name, DIR/TENANT/NAME for a tenant's (a volume that a sync fills)");
ABSL_FLAG(std::vector<std::string>, adapter, {},
          "NAME=DIR of a PEFT LoRA adapter to load (repeatable)");
ABSL_FLAG(bool, lazy_adapter_load, false,
          "Register the adapters of --adapter-dir and --adapter from their adapter_config.json "
          "and safetensors header only (every check but the values), and read each one's "
          "weights on its first request: for start-ups with thousands of adapters");
ABSL_FLAG(std::vector<std::string>, pin_adapter, {},
          "Adapter kept in host memory whatever the budget (repeatable)");
ABSL_FLAG(int32_t, max_lora_rank, 64, "Largest LoRA rank an adapter may have");
ABSL_FLAG(double, compact_adapters_energy, 1,
          "Rank compaction of every adapter load that does not choose its own: each module "
          "kept at the smallest rank holding this share of its update's energy, in (0, 1]; "
          "1: none");
ABSL_FLAG(int64_t, adapter_host_bytes, 0, "Host memory for adapter weights (0 = unlimited)");
ABSL_FLAG(int64_t, adapter_device_bytes, int64_t{1} << 30,
          "Device memory for adapter weights in use");
ABSL_FLAG(std::string, lora_mode, "auto",
          "auto: merge adapters that dominate traffic within --merged-cache-bytes; unmerged: "
          "always base GEMM + LoRA segments; merged: single-adapter batches on merged weights");
ABSL_FLAG(int64_t, merged_cache_bytes, 0,
          "Memory for merged weight sets (each a copy of the adapted matrices)");
ABSL_FLAG(double, merge_threshold, 0.5,
          "auto mode: share of recent batch tokens at which an adapter is merged");
ABSL_FLAG(int32_t, merge_window_steps, 32, "auto mode: steps over which that share is measured");
ABSL_FLAG(double, merged_min_batch_share, 1.0,
          "auto mode: least share of a step's tokens the merged adapter needs for the step to run "
          "on merged weights (the rest of the batch gets low-rank corrections)");
ABSL_FLAG(bool, enable_prefix_cache, false,
          "Reuse the KV of full blocks of earlier prompts with the same adapter and tokens");
ABSL_FLAG(int32_t, max_running_requests, 256, "Requests decoding together at most");
// Loopback by default: the API has no authentication, so exposing it is a
// deliberate choice (--host 0.0.0.0).
ABSL_FLAG(std::string, host, "127.0.0.1", "serve: address to listen on (0.0.0.0: every interface)");
ABSL_FLAG(int32_t, grpc_port, 50051, "serve: gRPC port (0 picks a free one)");
ABSL_FLAG(int32_t, max_queued_requests, 1024,
          "serve: requests waiting for admission at most; more get RESOURCE_EXHAUSTED");
ABSL_FLAG(int32_t, drain_seconds, 30,
          "serve: on SIGTERM, how long in-flight streams may take to finish");
ABSL_FLAG(std::string, upload_dir, "",
          "serve: private directory (mode 0700) for adapters sent with Adapters.Upload "
          "(default: loraserve-uploads-<pid> in the system temp directory)");
ABSL_FLAG(int64_t, max_upload_bytes, int64_t{1} << 30,
          "serve: largest Adapters.Upload (config + safetensors bytes); larger ones get "
          "RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, served_model_name, "",
          "serve: the base model's name in the HTTP API (default: the --model folder's name or "
          "preset)");
ABSL_FLAG(std::string, chat_template, "",
          "serve: chat template family for /v1/chat/completions: llama-2, llama-3, chatml, "
          "mistral (default: recognised from the tokenizer_config.json's chat_template)");
ABSL_FLAG(int32_t, http_port, -1,
          "serve: port of the OpenAI-compatible HTTP API (-1: off; 0 picks a free one); "
          "gateway: required");
ABSL_FLAG(int32_t, http_threads, 64, "serve/gateway: HTTP connections served at once");
ABSL_FLAG(int32_t, http_read_timeout_seconds, 5,
          "serve/gateway: how long a read waits for a client's next bytes of a request");
ABSL_FLAG(int32_t, http_write_timeout_seconds, 10,
          "serve/gateway: how long a write waits for room in a client's receive window (a "
          "stream whose client stops reading ends then)");
ABSL_FLAG(int32_t, http_request_timeout_seconds, 30,
          "serve/gateway: time a client has to send a request's line, headers and body, plus "
          "1 s per MiB sent; slower clients get 408 and lose the connection");
ABSL_FLAG(int32_t, http_keep_alive_seconds, 5,
          "serve/gateway: how long an idle connection waits for its next request");
ABSL_FLAG(int32_t, http_keep_alive_max_requests, 100,
          "serve/gateway: requests on one connection before it is closed");
ABSL_FLAG(int64_t, http_max_header_bytes, int64_t{64} << 10,
          "serve/gateway: request line + headers of one request at most (431 above)");
ABSL_FLAG(int64_t, http_max_body_bytes, int64_t{16} << 20,
          "serve/gateway: body of a request other than an upload at most (413 above; uploads: "
          "--max-upload-bytes)");
ABSL_FLAG(std::string, api_keys, "",
          "serve/gateway: file of HTTP API keys, one 'KEY TENANT ROLE' per line (ROLE admin or "
          "tenant); without it the HTTP API is open to anyone who can reach it");
ABSL_FLAG(int64_t, tenant_max_adapters, 0,
          "serve/gateway: adapters a tenant may store (0: no limit)");
ABSL_FLAG(int64_t, tenant_max_adapter_bytes, 0,
          "serve/gateway: float32 bytes of adapters a tenant may store (0: no limit)");
ABSL_FLAG(double, tenant_requests_per_second, 0,
          "serve/gateway: completion requests per second per tenant (0: no limit; bursts up to "
          "one second's worth); more get HTTP 429 with Retry-After");
ABSL_FLAG(int64_t, tenant_tokens_per_minute, 0,
          "serve/gateway: prompt + generated tokens per minute per tenant (0: no limit)");
ABSL_FLAG(int32_t, max_choices, 16, "serve/gateway: prompts × n in one completion request at most");
ABSL_FLAG(int32_t, metrics_max_adapters, 64,
          "serve/gateway: adapters with their own label value in /metrics (later ones: \"other\")");
ABSL_FLAG(std::string, upstream, "", "gateway: HOST:PORT of the loraserve gRPC server to serve");
ABSL_FLAG(std::string, prompt, "", "generate: prompt text");
ABSL_FLAG(std::string, lora, "", "generate: adapter id to generate with (default: base model)");
ABSL_FLAG(float, adapter_scale, 1.0f, "generate: multiplier of the adapter's scale");
ABSL_FLAG(int32_t, max_tokens, 64, "generate: tokens to generate at most");
ABSL_FLAG(float, temperature, 1.0f, "generate: sampling temperature (0 = greedy)");
ABSL_FLAG(int32_t, top_k, 0, "generate: top-k filter (0 = off)");
ABSL_FLAG(float, top_p, 1.0f, "generate: nucleus filter (1 = off)");
ABSL_FLAG(int64_t, seed, -1, "generate: sampling seed (-1 = random)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "generate: stop strings, comma-separated");
ABSL_FLAG(bool, ignore_eos, false, "generate: keep going after the end-of-sequence token");
ABSL_FLAG(int32_t, logprobs, 0, "generate: print this many top logprobs per token to stderr");

namespace loraserve {
namespace {

constexpr char kUsage[] =
    "loraserve <command> [flags]\n"
    "commands:\n"
    "  generate   stream the continuation of --prompt to stdout\n"
    "  serve      serve the gRPC API (proto/loraserve/v1) on --grpc-port, and with\n"
    "             --http-port the OpenAI-compatible HTTP API\n"
    "  gateway    serve the HTTP API alone on --http-port, in front of --upstream (gRPC)\n"
    "Try: loraserve generate --model ../shared/models/aidreams-260k --prompt \"\" "
    "--temperature 0";

absl::StatusOr<RuntimeConfig> RuntimeConfigFromFlags() {
  RuntimeConfig config;
  config.model = absl::GetFlag(FLAGS_model);
  config.load_format = absl::GetFlag(FLAGS_load_format);
  config.tokenizer = absl::GetFlag(FLAGS_tokenizer);
  config.device = absl::GetFlag(FLAGS_device);
  config.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  config.threads = absl::GetFlag(FLAGS_threads);
  config.dtype = absl::GetFlag(FLAGS_dtype);
  config.quantization = absl::GetFlag(FLAGS_quantization);
  config.kv_cache_bytes = absl::GetFlag(FLAGS_kv_cache_bytes);
  config.block_size = absl::GetFlag(FLAGS_block_size);
  config.adapter_dir = absl::GetFlag(FLAGS_adapter_dir);
  config.adapter_resolver_dir = absl::GetFlag(FLAGS_adapter_resolver_dir);
  config.adapters = absl::GetFlag(FLAGS_adapter);
  config.pinned_adapters = absl::GetFlag(FLAGS_pin_adapter);
  config.lazy_adapter_load = absl::GetFlag(FLAGS_lazy_adapter_load);
  config.max_lora_rank = absl::GetFlag(FLAGS_max_lora_rank);
  config.compact_adapters_energy = absl::GetFlag(FLAGS_compact_adapters_energy);
  config.adapter_host_bytes = absl::GetFlag(FLAGS_adapter_host_bytes);
  config.adapter_device_bytes = absl::GetFlag(FLAGS_adapter_device_bytes);
  engine::EngineOptions& options = config.engine;
  options.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  options.max_running_requests = absl::GetFlag(FLAGS_max_running_requests);
  options.enable_prefix_cache = absl::GetFlag(FLAGS_enable_prefix_cache);
  ASSIGN_OR_RETURN(options.lora_mode, adapters::ParseLoraMode(absl::GetFlag(FLAGS_lora_mode)));
  options.merged_cache_bytes = absl::GetFlag(FLAGS_merged_cache_bytes);
  options.merge_threshold = absl::GetFlag(FLAGS_merge_threshold);
  options.merge_window_steps = absl::GetFlag(FLAGS_merge_window_steps);
  options.merged_min_batch_share = absl::GetFlag(FLAGS_merged_min_batch_share);
  return config;
}

absl::Status Generate() {
  ASSIGN_OR_RETURN(const RuntimeConfig config, RuntimeConfigFromFlags());
  ASSIGN_OR_RETURN(std::unique_ptr<Runtime> runtime, BuildRuntime(config));
  const model::Tokenizer& tokenizer = *runtime->tokenizer;

  engine::GenerationRequest request;
  ASSIGN_OR_RETURN(request.prompt_ids, tokenizer.Encode(absl::GetFlag(FLAGS_prompt), true));
  request.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  request.sampling.temperature = absl::GetFlag(FLAGS_temperature);
  request.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  request.sampling.top_p = absl::GetFlag(FLAGS_top_p);
  const int64_t seed = absl::GetFlag(FLAGS_seed);
  request.sampling.seed = seed >= 0 ? static_cast<uint64_t>(seed) : std::random_device{}();
  request.stop = absl::GetFlag(FLAGS_stop);
  request.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  request.top_logprobs = absl::GetFlag(FLAGS_logprobs);
  if (!absl::GetFlag(FLAGS_lora).empty()) {
    ASSIGN_OR_RETURN(request.adapter, runtime->registry->Acquire(absl::GetFlag(FLAGS_lora)));
  }
  request.adapter_scale = absl::GetFlag(FLAGS_adapter_scale);

  engine::Engine& engine = *runtime->engine;
  int64_t generated = 0;
  engine::FinishReason finish = engine::FinishReason::kNone;
  ASSIGN_OR_RETURN(engine::RequestId id, engine.Add(request, [&](const engine::TokenEvent& event) {
    std::fwrite(event.text.data(), 1, event.text.size(), stdout);
    std::fflush(stdout);
    ++generated;
    finish = event.finish;
    if (request.top_logprobs > 0) {
      std::string alternatives;
      for (const auto& t : event.top_logprobs) {
        absl::StrAppendFormat(&alternatives, " %d:%.4f", t.id, t.logprob);
      }
      absl::FPrintF(stderr, "[token %d logprob %.4f |%s]\n", event.token_id, event.logprob,
                    alternatives);
    }
  }));
  (void)id;
  const absl::Time start = absl::Now();
  while (engine.HasWork()) RETURN_IF_ERROR(engine.Step());
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::fputc('\n', stdout);
  absl::FPrintF(stderr, "%d prompt tokens, %d generated (finish: %s) in %.3fs, %.1f tokens/s\n",
                request.prompt_ids.size(), generated, engine::FinishReasonName(finish), seconds,
                generated / std::max(seconds, 1e-9));
  return absl::OkStatus();
}

// SIGTERM and SIGINT, blocked in this thread and so in every thread it
// starts (gRPC's, the engine's, HTTP's): one thread takes them with sigwait.
sigset_t BlockStopSignals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  return signals;
}

absl::StatusOr<api::HttpGatewayOptions> GatewayOptionsFromFlags() {
  api::HttpGatewayOptions options;
  options.host = absl::GetFlag(FLAGS_host);
  options.port = absl::GetFlag(FLAGS_http_port);
  options.threads = absl::GetFlag(FLAGS_http_threads);
  if (options.threads < 1) return absl::InvalidArgumentError("--http-threads must be >= 1");
  if (!absl::GetFlag(FLAGS_api_keys).empty()) {
    ASSIGN_OR_RETURN(options.api_keys, api::ApiKeys::LoadFile(absl::GetFlag(FLAGS_api_keys)));
  }
  options.tenant_quota = {.max_adapters = absl::GetFlag(FLAGS_tenant_max_adapters),
                          .max_adapter_bytes = absl::GetFlag(FLAGS_tenant_max_adapter_bytes)};
  options.rate_limits = {.requests_per_second = absl::GetFlag(FLAGS_tenant_requests_per_second),
                         .tokens_per_minute = absl::GetFlag(FLAGS_tenant_tokens_per_minute)};
  options.max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes);
  const int32_t read_timeout = absl::GetFlag(FLAGS_http_read_timeout_seconds);
  const int32_t write_timeout = absl::GetFlag(FLAGS_http_write_timeout_seconds);
  const int32_t request_timeout = absl::GetFlag(FLAGS_http_request_timeout_seconds);
  const int32_t keep_alive = absl::GetFlag(FLAGS_http_keep_alive_seconds);
  if (read_timeout < 1 || write_timeout < 1 || request_timeout < 1 || keep_alive < 1) {
    return absl::InvalidArgumentError(
        "--http-read-timeout-seconds, --http-write-timeout-seconds, "
        "--http-request-timeout-seconds and --http-keep-alive-seconds must be >= 1");
  }
  options.read_timeout = absl::Seconds(read_timeout);
  options.write_timeout = absl::Seconds(write_timeout);
  options.request_timeout = absl::Seconds(request_timeout);
  options.keep_alive_timeout = absl::Seconds(keep_alive);
  options.keep_alive_max_requests = absl::GetFlag(FLAGS_http_keep_alive_max_requests);
  options.max_header_bytes = absl::GetFlag(FLAGS_http_max_header_bytes);
  options.max_body_bytes = absl::GetFlag(FLAGS_http_max_body_bytes);
  if (options.keep_alive_max_requests < 1 || options.max_header_bytes < 1024 ||
      options.max_body_bytes < 1) {
    return absl::InvalidArgumentError(
        "--http-keep-alive-max-requests must be >= 1, --http-max-header-bytes >= 1024, "
        "--http-max-body-bytes >= 1");
  }
  options.parse_limits.max_choices = absl::GetFlag(FLAGS_max_choices);
  if (options.parse_limits.max_choices < 1) {
    return absl::InvalidArgumentError("--max-choices must be >= 1");
  }
  return options;
}

api::GatewayMetricsOptions MetricsOptionsFromFlags() {
  return {.max_adapter_labels = static_cast<size_t>(absl::GetFlag(FLAGS_metrics_max_adapters))};
}

absl::StatusOr<std::unique_ptr<api::HttpGateway>> StartGateway(
    std::shared_ptr<grpc::Channel> channel, api::GatewayMetrics* metrics) {
  ASSIGN_OR_RETURN(api::HttpGatewayOptions options, GatewayOptionsFromFlags());
  const bool open = !options.api_keys.has_value();
  const size_t keys = open ? 0 : options.api_keys->size();
  ASSIGN_OR_RETURN(std::unique_ptr<api::HttpGateway> gateway,
                   api::HttpGateway::Start(std::move(channel), std::move(options), metrics));
  if (open) {
    absl::FPrintF(stderr,
                  "loraserve: HTTP API without --api-keys: single-user mode, every caller is an "
                  "admin\n");
  } else {
    absl::FPrintF(stderr, "loraserve: HTTP API keys: %d\n", keys);
  }
  absl::FPrintF(stderr, "loraserve: HTTP listening on %s:%d\n", absl::GetFlag(FLAGS_host),
                gateway->port());
  return gateway;
}

// What HTTP clients learn about the model through Inference.Stats.
absl::StatusOr<v1::ServerInfo> ServerInfoFor(const Runtime& runtime) {
  const model::LlamaModel& llama = *runtime.model;
  v1::ServerInfo info;
  std::string name = absl::GetFlag(FLAGS_served_model_name);
  if (name.empty()) {
    name = std::filesystem::path(absl::GetFlag(FLAGS_model)).lexically_normal().filename();
    if (name.empty()) {  // a path ending in a slash
      name = std::filesystem::path(absl::GetFlag(FLAGS_model))
                 .lexically_normal()
                 .parent_path()
                 .filename();
    }
  }
  info.set_model(name);
  info.set_max_context_tokens(static_cast<int32_t>(llama.config().max_position_embeddings));
  info.set_weight_bytes(static_cast<int64_t>(llama.weight_bytes()));
  info.set_kv_block_tokens(absl::GetFlag(FLAGS_block_size));
  if (!absl::GetFlag(FLAGS_chat_template).empty()) {
    ASSIGN_OR_RETURN(formats::ChatTemplate chat_template,
                     formats::ChatTemplate::FromName(absl::GetFlag(FLAGS_chat_template)));
    info.set_chat_template(chat_template.name());
  } else {
    absl::StatusOr<formats::ChatTemplate> chat_template =
        formats::ChatTemplate::FromTokenizerConfig(runtime.tokenizer_dir);
    if (chat_template.ok()) {
      info.set_chat_template(chat_template->name());
    } else {
      info.set_chat_template_error(std::string(chat_template.status().message()));
    }
  }
  return info;
}

// Serves the gRPC API (and the HTTP API with --http-port) until SIGTERM or
// SIGINT, then drains.
absl::Status Serve() {
  sigset_t signals = BlockStopSignals();

  ASSIGN_OR_RETURN(const RuntimeConfig config, RuntimeConfigFromFlags());
  ASSIGN_OR_RETURN(std::unique_ptr<Runtime> runtime, BuildRuntime(config));
  adapters::AdapterRegistry* registry = runtime->registry.get();
  engine::EngineLoop loop(runtime->engine.get(),
                          {.max_queued_requests = absl::GetFlag(FLAGS_max_queued_requests)});
  loop.Start();

  std::string upload_dir = absl::GetFlag(FLAGS_upload_dir);
  const bool own_upload_dir = upload_dir.empty();  // ours alone: removed at exit
  if (own_upload_dir) {
    upload_dir =
        (std::filesystem::temp_directory_path() / absl::StrCat("loraserve-uploads-", getpid()))
            .string();
  }
  ASSIGN_OR_RETURN(v1::ServerInfo info, ServerInfoFor(*runtime));
  api::InferenceService inference(
      &loop, registry, runtime->tokenizer.get(),
      {.server = info, .merged_cache_budget_bytes = absl::GetFlag(FLAGS_merged_cache_bytes)});
  ASSIGN_OR_RETURN(std::unique_ptr<api::AdaptersService> adapter_service,
                   api::AdaptersService::Create(
                       registry, {.upload_dir = upload_dir,
                                  .max_upload_bytes = absl::GetFlag(FLAGS_max_upload_bytes)}));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  const std::string address =
      absl::StrCat(absl::GetFlag(FLAGS_host), ":", absl::GetFlag(FLAGS_grpc_port));
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&inference);
  builder.RegisterService(adapter_service.get());
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", address));
  }
  std::vector<std::string> adapter_ids;
  for (const adapters::AdapterInfo& info : registry->List()) adapter_ids.push_back(info.id);
  absl::FPrintF(stderr,
                "loraserve: serving %s with %d adapters [%s], KV cache %d blocks, uploads in %s\n",
                absl::GetFlag(FLAGS_model), adapter_ids.size(), absl::StrJoin(adapter_ids, " "),
                runtime->kv_cache->num_blocks(), upload_dir);
  absl::FPrintF(stderr, "loraserve: listening on %s:%d\n", absl::GetFlag(FLAGS_host), port);
  api::GatewayMetrics metrics(MetricsOptionsFromFlags());  // outlives the gateway
  std::unique_ptr<api::HttpGateway> gateway;
  if (absl::GetFlag(FLAGS_http_port) >= 0) {
    absl::StatusOr<std::unique_ptr<api::HttpGateway>> started =
        StartGateway(server->InProcessChannel(grpc::ChannelArguments()), &metrics);
    if (!started.ok()) {
      server->Shutdown();
      loop.Drain(absl::ZeroDuration());
      return started.status();
    }
    gateway = *std::move(started);
  }

  int signal = 0;
  sigwait(&signals, &signal);
  const absl::Duration drain = absl::Seconds(absl::GetFlag(FLAGS_drain_seconds));
  const absl::Time deadline = absl::Now() + drain;
  absl::FPrintF(stderr, "loraserve: signal %d, draining for up to %s\n", signal,
                absl::FormatDuration(drain));
  // Both servers keep listening while in-flight streams finish (or are
  // cancelled at the deadline), so that a new request hears why it is
  // refused: the engine loop answers new Generate calls UNAVAILABLE (HTTP
  // 503, through the in-process channel), /ready says 503 and the gRPC health
  // check NOT_SERVING. Only then does HTTP stop (its handlers end with their
  // streams), and then gRPC: shutting gRPC down first would close the
  // in-process channel under the HTTP streams still running.
  server->GetHealthCheckService()->SetServingStatus(false);
  // A little of the time is kept for the last messages to go out.
  const absl::Time drain_deadline = deadline - std::min(absl::Seconds(1), drain / 4);
  std::promise<void> drained;
  std::thread drain_thread([&] {
    loop.Drain(drain_deadline - absl::Now());
    drained.set_value();
  });
  bool shut_down = false;
  if (drained.get_future().wait_until(absl::ToChronoTime(drain_deadline)) !=
      std::future_status::ready) {
    // The engine loop's drain ends its requests at the deadline (UNAVAILABLE);
    // should it still not return (a call blocked elsewhere), shutting the
    // calls down ends them.
    server->Shutdown(absl::ToChronoTime(absl::Now()));
    shut_down = true;
  }
  drain_thread.join();
  std::promise<void> http_stopped;
  std::thread http_shutdown([&] {
    if (gateway != nullptr) gateway->Stop();
    http_stopped.set_value();
  });
  http_stopped.get_future().wait_until(absl::ToChronoTime(deadline));
  // Whatever still runs now (an upload, a call past the deadline) is cancelled.
  if (!shut_down) server->Shutdown(absl::ToChronoTime(std::max(deadline, absl::Now())));
  http_shutdown.join();
  if (own_upload_dir) {
    std::error_code ignored;
    std::filesystem::remove_all(upload_dir, ignored);
  }
  absl::FPrintF(stderr, "loraserve: stopped\n");
  return absl::OkStatus();
}

// Serves the HTTP API in front of a loraserve gRPC server until SIGTERM or
// SIGINT; in-flight requests finish (or end when the upstream ends them).
absl::Status Gateway() {
  sigset_t signals = BlockStopSignals();
  const std::string upstream = absl::GetFlag(FLAGS_upstream);
  if (upstream.empty()) return absl::InvalidArgumentError("--upstream HOST:PORT is required");
  if (absl::GetFlag(FLAGS_http_port) < 0) {
    return absl::InvalidArgumentError("--http-port is required (0 picks a free one)");
  }
  api::GatewayMetrics metrics(MetricsOptionsFromFlags());  // outlives the gateway
  ASSIGN_OR_RETURN(
      std::unique_ptr<api::HttpGateway> gateway,
      StartGateway(grpc::CreateChannel(upstream, grpc::InsecureChannelCredentials()), &metrics));
  absl::FPrintF(stderr, "loraserve gateway: upstream %s\n", upstream);
  int signal = 0;
  sigwait(&signals, &signal);
  absl::FPrintF(stderr, "loraserve gateway: signal %d, stopping\n", signal);
  gateway->Stop();
  return absl::OkStatus();
}

}  // namespace
}  // namespace loraserve

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(loraserve::kUsage);
  // --help lists the flags of this file (Abseil's default looks for a file
  // named after the program).
  absl::FlagsUsageConfig usage;
  usage.contains_help_flags = [](absl::string_view path) {
    return absl::EndsWith(path, "server/main.cc");
  };
  absl::SetFlagsUsageConfig(usage);
  std::vector<std::string> normalized = loraserve::MergeRepeatedFlags(
      loraserve::DashesToUnderscores(argc, argv), {"adapter", "pin_adapter"});
  std::vector<char*> normalized_argv = loraserve::ArgvOf(normalized);
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(normalized_argv.size()), normalized_argv.data());
  if (args.size() < 2) {
    std::cerr << loraserve::kUsage << "\n";
    return 2;
  }
  const std::string command = args[1];
  absl::Status status;
  if (command == "generate") {
    status = loraserve::Generate();
  } else if (command == "serve") {
    status = loraserve::Serve();
  } else if (command == "gateway") {
    status = loraserve::Gateway();
  } else {
    std::cerr << "unknown command '" << command << "'\n" << loraserve::kUsage << "\n";
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "loraserve " << command << ": " << status << "\n";
    return 1;
  }
  return 0;
}
