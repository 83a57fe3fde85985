// How deeply JSON text nests arrays and objects, found by a scan of its bytes
// (brackets inside strings do not count), before anything parses it.
//
// nlohmann::json parses and frees any depth without recursing, but dump()
// (the text of a value in an error message) and code that walks values
// recurse once per level: a body of a few hundred kB of "[[[[...]]]]"
// overflows a thread's stack there. Every parser of JSON (request bodies,
// uploaded adapters, the model's and tokenizer's files) refuses more than
// kMaxJsonDepth levels first; real files nest a handful.
//
// A pure function; any thread.
//
// Example:
//   RETURN_IF_ERROR(CheckJsonDepth(body, "the request body"));
#ifndef LORASERVE_BASE_JSON_DEPTH_H_
#define LORASERVE_BASE_JSON_DEPTH_H_

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace loraserve {

inline constexpr int kMaxJsonDepth = 64;

// Whether `text` opens more than `max_depth` arrays or objects inside one
// another. Exact for valid JSON; for other text an estimate, which the
// parser then refuses anyway.
inline bool JsonDeeperThan(absl::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false;
  bool escaped = false;
  for (const char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth) return true;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return false;
}

// InvalidArgument naming `what` (a file, "the request body") when `text` nests
// deeper than kMaxJsonDepth; OK otherwise.
inline absl::Status CheckJsonDepth(absl::string_view text, absl::string_view what) {
  if (!JsonDeeperThan(text, kMaxJsonDepth)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(what, " nests arrays and objects deeper than ", kMaxJsonDepth, " levels"));
}

}  // namespace loraserve

#endif  // LORASERVE_BASE_JSON_DEPTH_H_
