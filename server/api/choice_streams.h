// The Inference.Generate streams of one HTTP request (one per choice: prompts
// × n), merged into one queue of events in arrival order, so the HTTP thread
// can answer from a single loop whether it streams (SSE) or not.
//
// Each stream is read on its own thread with gRPC's synchronous client API:
// a request has at most --max-choices streams, and a blocking reader per
// stream is simpler than callback reactors for the same work. Cancel (or the
// destructor) cancels every stream still running; the server then frees
// their KV blocks.
//
// Ownership: owns its threads and ClientContexts; the stub must outlive it.
// Next and Cancel may be called from different threads.
//
// Example:
//   ChoiceStreams streams(stub, std::move(requests));
//   for (ChoiceEvent event = streams.Next(); !event.done; event = streams.Next()) { ... }
#ifndef LORASERVE_SERVER_API_CHOICE_STREAMS_H_
#define LORASERVE_SERVER_API_CHOICE_STREAMS_H_

#include <grpcpp/grpcpp.h>

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "loraserve/v1/inference.grpc.pb.h"

namespace loraserve::api {

struct ChoiceEvent {
  bool done = false;  // every stream has ended; nothing else is set
  int choice = 0;     // index into the requests
  // A token, or (when !has_token) the end of the stream with `status`.
  bool has_token = false;
  v1::GenerateResponse token;
  absl::Status status;
  absl::Time received;  // when the reader thread got it (token timings)
};

class ChoiceStreams {
 public:
  ChoiceStreams(v1::Inference::StubInterface* stub, std::vector<v1::GenerateRequest> requests);
  ~ChoiceStreams();  // cancels what still runs and joins
  ChoiceStreams(const ChoiceStreams&) = delete;
  ChoiceStreams& operator=(const ChoiceStreams&) = delete;

  // Blocks until the next event; after the last stream's end, `done`.
  ChoiceEvent Next();
  void Cancel();
  int size() const { return static_cast<int>(contexts_.size()); }

 private:
  void Push(ChoiceEvent event);

  std::vector<std::unique_ptr<grpc::ClientContext>> contexts_;
  std::mutex mu_;
  std::condition_variable ready_;
  std::deque<ChoiceEvent> events_;  // guarded by mu_
  int running_ = 0;                 // guarded by mu_
  std::vector<std::thread> threads_;
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_CHOICE_STREAMS_H_
