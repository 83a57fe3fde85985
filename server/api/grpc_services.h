// The gRPC services of loraserve (proto/loraserve/v1), on the callback API.
//
// Generate runs one ServerWriteReactor per stream: the engine thread hands
// each token event to the stream's queue (a small mutex, never held across a
// gRPC call that can block), and writes go out one at a time
// (StartWrite → OnWriteDone → next). A client that goes away or a deadline
// cancels the request in the engine, which frees its KV blocks at once.
//
// No gRPC thread waits on a disk: a Generate for an adapter evicted from host
// memory acquires it on the Inference service's loading thread (JobQueue),
// and adapter changes that read or write files (Load, Upload's final check
// and load, Unload's clean-up) run one at a time on the Adapters service's,
// so two replacements of one id never interleave. Upload writes to a private directory per upload
// under --upload-dir; an uploaded adapter's directory stays while it is the
// current version (the registry reloads evicted adapters from it) and is
// removed when the id is replaced or unloaded.
//
// absl::Status ↔ grpc::Status translation happens in status_mapping.h, once.
//
// Ownership and threading: the services borrow the engine loop, registry and
// tokenizer, which must outlive the gRPC server; every method is called on
// gRPC's threads. Destroy the services after the server has shut down (they
// join their threads).
//
// Example:
//   InferenceService inference(&loop, &registry, tokenizer.get(), {.server = info});
//   ASSIGN_OR_RETURN(auto adapters, AdaptersService::Create(
//       &registry, {.upload_dir = "/tmp/loraserve-uploads", .max_upload_bytes = 1 << 30}));
//   builder.RegisterService(&inference);
//   builder.RegisterService(adapters.get());
#ifndef LORASERVE_SERVER_API_GRPC_SERVICES_H_
#define LORASERVE_SERVER_API_GRPC_SERVICES_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "adapters/registry.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "server/api/job_queue.h"
#include "server/api/status_mapping.h"
#include "server/engine/engine_loop.h"
#include "server/model/tokenizer.h"

namespace loraserve::api {

// Finishes a unary call with `status` (translated by ToGrpcStatus).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

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

struct AdaptersServiceOptions {
  std::string upload_dir;        // created (mode 0700) if missing
  int64_t max_upload_bytes = 0;  // safetensors + config bytes of one Upload
};

class AdaptersService final : public v1::Adapters::CallbackService {
 public:
  // Fails when the upload directory cannot be created.
  static absl::StatusOr<std::unique_ptr<AdaptersService>> Create(
      adapters::AdapterRegistry* registry, AdaptersServiceOptions options);

  grpc::ServerUnaryReactor* Load(grpc::CallbackServerContext* context,
                                 const v1::LoadAdapterRequest* request,
                                 v1::AdapterInfo* response) override;
  grpc::ServerReadReactor<v1::UploadAdapterRequest>* Upload(grpc::CallbackServerContext* context,
                                                            v1::AdapterInfo* response) override;
  grpc::ServerUnaryReactor* Unload(grpc::CallbackServerContext* context,
                                   const v1::UnloadAdapterRequest* request,
                                   v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* context,
                                 const v1::ListAdaptersRequest* request,
                                 v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* Get(grpc::CallbackServerContext* context,
                                const v1::GetAdapterRequest* request,
                                v1::AdapterInfo* response) override;

 private:
  friend class UploadReactor;

  AdaptersService(adapters::AdapterRegistry* registry, AdaptersServiceOptions options);

  // Worker thread: loads `dir` as `id` and, once it is in, removes the upload
  // directory of the version it replaced.
  absl::StatusOr<adapters::AdapterInfo> LoadAndReplace(const std::string& id,
                                                       const std::string& dir);
  absl::Status UnloadAndClean(const std::string& id);
  // Removes `dir` when it is one of our upload directories.
  void RemoveIfUploaded(const std::string& dir);

  adapters::AdapterRegistry* const registry_;
  const AdaptersServiceOptions options_;
  JobQueue jobs_;  // file work (Load, Upload's commit, Unload), one at a time
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_GRPC_SERVICES_H_
