// How an absl::Status leaves and enters the APIs, in one place: the gRPC
// status of a call (the same codes, the message kept) and the HTTP status of
// a response. Every API handler translates through these; none builds a
// grpc::Status or picks an HTTP error code for a Status by itself.
//
// Pure functions; any thread.
//
// Example:
//   reactor->Finish(ToGrpcStatus(registry.Unload(id)));
//   res.status = HttpStatusFor(FromGrpcStatus(stub->Get(&context, request, &info)));
#ifndef LORASERVE_SERVER_API_STATUS_MAPPING_H_
#define LORASERVE_SERVER_API_STATUS_MAPPING_H_

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"

namespace loraserve::api {

// absl and gRPC share their status codes; the message is kept, payloads are not.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
// Finishes a unary callback call with `status` (ToGrpcStatus).
grpc::ServerUnaryReactor* FinishUnary(grpc::CallbackServerContext* context,
                                      const absl::Status& status);

// InvalidArgument/OutOfRange/FailedPrecondition/DataLoss 400, Unauthenticated
// 401, PermissionDenied 403, NotFound 404, AlreadyExists/Aborted 409,
// ResourceExhausted 429 (507 when marked by ServerOutOfRoom), Cancelled 499,
// Unimplemented 501, Unavailable 503, DeadlineExceeded 504, others 500; OK 200.
int HttpStatusFor(const absl::Status& status);

// Marks a RESOURCE_EXHAUSTED status as the server's own room running out (its
// upload store, its adapter memory) rather than a client's quota: HTTP 507
// Insufficient Storage, not 429. Other statuses are returned unchanged.
absl::Status ServerOutOfRoom(absl::Status status);

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_STATUS_MAPPING_H_
