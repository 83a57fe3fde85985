// gMock matchers and assertions for absl::Status and absl::StatusOr<T>, one
// set for every test: on failure they print the status itself (its code and
// message), which hand-written `.ok()` checks forget to.
//
// Example:
//   ASSERT_OK(registry->Pin("t/x"));
//   ASSERT_OK_AND_ASSIGN(AdapterHandle handle, registry->Acquire("t/x"));
//   EXPECT_THAT(registry->Get("t/none"), StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(info.status(), StatusIs(absl::StatusCode::kInvalidArgument,
//                                       HasSubstr("qq_proj")));
#ifndef LORASERVE_TESTS_SUPPORT_STATUS_MATCHERS_H_
#define LORASERVE_TESTS_SUPPORT_STATUS_MATCHERS_H_

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace loraserve::test_support {

inline const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

MATCHER(IsOk, negation ? "is not OK" : "is OK") {
  const absl::Status& status = StatusOf(arg);
  if (!status.ok()) *result_listener << "whose status is " << status;
  return status.ok();
}

MATCHER_P(StatusIs, code,
          std::string(negation ? "has a status other than " : "has status ") +
              absl::StatusCodeToString(code)) {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "whose status is " << status;
  return status.code() == code;
}

MATCHER_P2(StatusIs, code, message_matcher,
           std::string(negation ? "does not have status " : "has status ") +
               absl::StatusCodeToString(code) + " with a message that " +
               ::testing::DescribeMatcher<std::string>(message_matcher, negation)) {
  const absl::Status& status = StatusOf(arg);
  *result_listener << "whose status is " << status;
  return status.code() == code &&
         ::testing::Matches(message_matcher)(std::string(status.message()));
}

}  // namespace loraserve::test_support

#define EXPECT_OK(expr) EXPECT_THAT((expr), ::loraserve::test_support::IsOk())
#define ASSERT_OK(expr) ASSERT_THAT((expr), ::loraserve::test_support::IsOk())

// Declares or assigns `lhs` from the value of the StatusOr `rexpr`, or fails
// the test (returning from it) with the status.
#define ASSERT_OK_AND_ASSIGN(lhs, rexpr)                                                           \
  LORASERVE_ASSERT_OK_AND_ASSIGN_IMPL(LORASERVE_STATUS_MATCHERS_CONCAT(status_or_, __LINE__), lhs, \
                                      rexpr)
#define LORASERVE_ASSERT_OK_AND_ASSIGN_IMPL(status_or, lhs, rexpr) \
  auto status_or = (rexpr);                                        \
  ASSERT_OK(status_or);                                            \
  lhs = std::move(status_or).value()
#define LORASERVE_STATUS_MATCHERS_CONCAT(a, b) LORASERVE_STATUS_MATCHERS_CONCAT_INNER(a, b)
#define LORASERVE_STATUS_MATCHERS_CONCAT_INNER(a, b) a##b

#endif  // LORASERVE_TESTS_SUPPORT_STATUS_MATCHERS_H_
