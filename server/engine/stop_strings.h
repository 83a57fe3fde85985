// Cuts a streamed continuation at the first stop string.
//
// Text arrives in deltas; a delta is passed on only once no stop string can
// still begin inside it, so a client never sees the start of a stop string
// that then completes. The stop string itself is not part of the output.
//
// Not thread-safe; one per request.
//
// Example:
//   StopStringFilter filter({"\n\n"});
//   StopStringFilter::Result r = filter.Feed("Hello\n");  // r.text == "Hello"
//   r = filter.Feed("\nmore");  // r.text == "", r.stopped == true
#ifndef LORASERVE_SERVER_ENGINE_STOP_STRINGS_H_
#define LORASERVE_SERVER_ENGINE_STOP_STRINGS_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace loraserve::engine {

class StopStringFilter {
 public:
  explicit StopStringFilter(std::vector<std::string> stop);

  struct Result {
    std::string text;      // safe to send now
    bool stopped = false;  // a stop string completed; nothing more follows
  };
  Result Feed(absl::string_view delta);
  // Text held back at the end of the stream (no stop string completed).
  std::string Flush();

 private:
  std::vector<std::string> stop_;
  std::string pending_;
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_STOP_STRINGS_H_
