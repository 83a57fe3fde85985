// The gRPC services of loraserve (proto/loraserve/v1), on the callback API.
//
// Generate runs one ServerWriteReactor per stream: the engine thread hands
// each token event to the stream's queue (a small mutex, never held across a
// gRPC call that can block), and writes go out one at a time
// (StartWrite → OnWriteDone → next). A client that goes away or a deadline
// cancels the request in the engine, which frees its KV blocks at once.
//
// absl::Status → grpc::Status translation happens in ToGrpcStatus, once.
//
// Ownership and threading: the services borrow the engine loop, registry and
// tokenizer, which must outlive the gRPC server; every method is called on
// gRPC's threads.
//
// Example:
//   InferenceService inference(&loop, &registry, tokenizer.get());
//   AdaptersService adapters(&registry);
//   builder.RegisterService(&inference);
//   builder.RegisterService(&adapters);
#ifndef LORASERVE_SERVER_API_GRPC_SERVICES_H_
#define LORASERVE_SERVER_API_GRPC_SERVICES_H_

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "adapters/registry.h"
#include "loraserve/v1/adapters.grpc.pb.h"
#include "loraserve/v1/inference.grpc.pb.h"
#include "server/engine/engine_loop.h"
#include "server/model/tokenizer.h"

namespace loraserve::api {

// absl and gRPC share their status codes; the message is kept.
grpc::Status ToGrpcStatus(const absl::Status& status);

class InferenceService final : public v1::Inference::CallbackService {
 public:
  InferenceService(engine::EngineLoop* loop, adapters::AdapterRegistry* registry,
                   const model::Tokenizer* tokenizer)
      : loop_(loop), registry_(registry), tokenizer_(tokenizer) {}

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
};

class AdaptersService final : public v1::Adapters::CallbackService {
 public:
  explicit AdaptersService(adapters::AdapterRegistry* registry) : registry_(registry) {}

  grpc::ServerUnaryReactor* Load(grpc::CallbackServerContext* context,
                                 const v1::LoadAdapterRequest* request,
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
  adapters::AdapterRegistry* registry_;
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_GRPC_SERVICES_H_
