// The Inference gRPC service (proto/loraserve/v1/inference.proto) on the
// callback API: Generate, Tokenize, Detokenize, Stats.
//
// Generate runs one ServerWriteReactor per stream: the engine thread hands
// each token event to the stream's queue (a small mutex, never held across a
// gRPC call that can block), and writes go out one at a time
// (StartWrite → OnWriteDone → next). A client that goes away or a deadline
// cancels the request in the engine, which frees its KV blocks at once.
// No gRPC thread waits on a disk: a Generate for an adapter evicted from host
// memory acquires it on this service's loading thread (JobQueue).
//
// Ownership and threading: the service borrows the engine loop, registry and
// tokenizer, which must outlive the gRPC server; every method is called on
// gRPC's threads. Destroy the service after the server has shut down (it
// joins its thread).
//
// Example:
//   InferenceService inference(&loop, &registry, tokenizer.get(), {.server = info});
//   builder.RegisterService(&inference);
#ifndef LORASERVE_SERVER_API_INFERENCE_SERVICE_H_
#define LORASERVE_SERVER_API_INFERENCE_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "adapters/registry.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "server/api/job_queue.h"
#include "server/api/status_mapping.h"
#include "server/engine/engine_loop.h"
#include "server/tokenizer/tokenizer.h"

namespace loraserve::api {

// What Stats reports beyond the engine's and the registry's counters.
struct InferenceServiceOptions {
  v1::ServerInfo server;
  int64_t merged_cache_budget_bytes = 0;  // --merged-cache-bytes
};

class InferenceService final : public v1::Inference::CallbackService {
 public:
  InferenceService(engine::EngineLoop* loop, adapters::AdapterRegistry* registry,
                   const model::Tokenizer* tokenizer, InferenceServiceOptions options)
      : loop_(loop), registry_(registry), tokenizer_(tokenizer), options_(std::move(options)) {}

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* context,
                                  const v1::StatsRequest* request,
                                  v1::StatsResponse* response) override;

 private:
  // The engine request for `request`, or the error naming the bad field.
  absl::StatusOr<engine::GenerationRequest> ToEngineRequest(const v1::GenerateRequest& request);

  engine::EngineLoop* loop_;
  adapters::AdapterRegistry* registry_;
  const model::Tokenizer* tokenizer_;
  const InferenceServiceOptions options_;
  JobQueue adapter_loads_;  // Generate's requests for adapters not in host memory
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_INFERENCE_SERVICE_H_
