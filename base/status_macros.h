// Propagation helpers for absl::Status and absl::StatusOr.
//
// Debian's Abseil (20220623) ships without RETURN_IF_ERROR / ASSIGN_OR_RETURN,
// so they are defined here, once, for the whole tree (kernels/ excepted: it
// depends on nothing of ours and spells its few checks out).
//
// Example:
//   absl::StatusOr<Config> LoadConfig(const std::string& path) {
//     ASSIGN_OR_RETURN(std::string text, ReadFile(path));
//     RETURN_IF_ERROR(Validate(text));
//     return Parse(text);
//   }
#ifndef LORASERVE_BASE_STATUS_MACROS_H_
#define LORASERVE_BASE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define LORASERVE_CONCAT_INNER(a, b) a##b
#define LORASERVE_CONCAT(a, b) LORASERVE_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                   \
  do {                                          \
    ::absl::Status _status = (expr);            \
    if (!_status.ok()) return _status;          \
  } while (0)

#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL(LORASERVE_CONCAT(_statusor_, __LINE__), lhs, expr)

#define ASSIGN_OR_RETURN_IMPL(statusor, lhs, expr) \
  auto statusor = (expr);                          \
  if (!statusor.ok()) return statusor.status();    \
  lhs = std::move(statusor).value()

#endif  // LORASERVE_BASE_STATUS_MACROS_H_
