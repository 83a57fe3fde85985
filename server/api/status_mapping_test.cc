#include "server/api/status_mapping.h"

#include <gtest/gtest.h>

#include "tests/support/status_matchers.h"

namespace loraserve::api {
namespace {

TEST(StatusMappingTest, HttpStatusForEachCodeFamily) {
  EXPECT_EQ(HttpStatusFor(absl::OkStatus()), 200);
  EXPECT_EQ(HttpStatusFor(absl::InvalidArgumentError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::OutOfRangeError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::FailedPreconditionError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::DataLossError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::UnauthenticatedError("x")), 401);
  EXPECT_EQ(HttpStatusFor(absl::PermissionDeniedError("x")), 403);
  EXPECT_EQ(HttpStatusFor(absl::NotFoundError("x")), 404);
  EXPECT_EQ(HttpStatusFor(absl::AlreadyExistsError("x")), 409);
  EXPECT_EQ(HttpStatusFor(absl::AbortedError("x")), 409);
  EXPECT_EQ(HttpStatusFor(absl::ResourceExhaustedError("x")), 429);
  EXPECT_EQ(HttpStatusFor(absl::CancelledError("x")), 499);
  EXPECT_EQ(HttpStatusFor(absl::UnimplementedError("x")), 501);
  EXPECT_EQ(HttpStatusFor(absl::UnavailableError("x")), 503);
  EXPECT_EQ(HttpStatusFor(absl::DeadlineExceededError("x")), 504);
  EXPECT_EQ(HttpStatusFor(absl::InternalError("x")), 500);
  EXPECT_EQ(HttpStatusFor(absl::UnknownError("x")), 500);
}

TEST(StatusMappingTest, ServerOutOfRoomIs507AndOnlyMarksResourceExhausted) {
  const absl::Status full = ServerOutOfRoom(absl::ResourceExhaustedError("the store is full"));
  EXPECT_EQ(HttpStatusFor(full), 507);
  EXPECT_EQ(full.message(), "the store is full");
  EXPECT_EQ(ServerOutOfRoom(absl::NotFoundError("x")), absl::NotFoundError("x"));
  EXPECT_OK(ServerOutOfRoom(absl::OkStatus()));
}

TEST(StatusMappingTest, GrpcRoundTripKeepsEveryCodeAndTheMessage) {
  for (int code = 0; code <= static_cast<int>(absl::StatusCode::kUnauthenticated); ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code), code == 0 ? "" : "why");
    const grpc::Status grpc_status = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(grpc_status.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(grpc_status), status) << code;
  }
  EXPECT_EQ(ToGrpcStatus(absl::CancelledError("gone")).error_message(), "gone");
}

}  // namespace
}  // namespace loraserve::api
