// Runs an Engine on its own thread, the one thread that owns the batch and
// the device; API threads talk to it only through this class's queues.
//
// Submit validates a request at once (the caller gets INVALID_ARGUMENT,
// RESOURCE_EXHAUSTED for a full queue, UNAVAILABLE once draining)
// and queues it; the engine thread admits it between steps. Events for a
// request arrive through its callback, on the engine thread, in order; the
// last one has `finish` set (stop, length, cancelled or error) and nothing
// follows it. Callbacks must not block: they hand the event to the caller's
// own machinery (for gRPC, a reactor's write queue) and return.
//
// Cancel (client gone, deadline passed) is thread-safe and idempotent; the
// request's KV blocks are freed before the next step, and its callback gets
// one final event with finish = kCancelled.
//
// Ownership and threading: the loop borrows the engine, which must outlive
// it; after Start, nothing else may touch the engine. All public methods are
// thread-safe.
//
// Example:
//   EngineLoop loop(&engine, {.max_queued_requests = 1024});
//   loop.Start();
//   ASSIGN_OR_RETURN(RequestId id, loop.Submit(request, [](const TokenEvent& e) {...}));
//   loop.Cancel(id);
//   loop.Drain(absl::Seconds(30));  // stop accepting, finish or cancel the rest
#ifndef LORASERVE_SERVER_ENGINE_ENGINE_LOOP_H_
#define LORASERVE_SERVER_ENGINE_ENGINE_LOOP_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/engine/engine.h"

namespace loraserve::engine {

struct EngineLoopOptions {
  int32_t max_queued_requests = 1024;  // waiting to be admitted; more is RESOURCE_EXHAUSTED
};

// A consistent view of the engine for health checks and metrics.
struct EngineSnapshot {
  int64_t running = 0;
  int64_t waiting = 0;  // queued in the loop or waiting in the engine
  int64_t kv_blocks_used = 0;
  int64_t kv_blocks_total = 0;
  int64_t kv_cache_bytes = 0;
  EngineStats stats;
  adapters::DeviceCacheStats device_adapters;
  int64_t device_adapter_budget_bytes = 0;
  std::vector<std::string> device_resident_hashes;  // content hashes, sorted
  // Requests queued in the loop count as waiting, their adapters too.
  AdapterActivity adapters;
  bool draining = false;
};

class EngineLoop {
 public:
  EngineLoop(Engine* engine, EngineLoopOptions options);
  ~EngineLoop();  // cancels what is left and joins the thread
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  void Start();
  absl::StatusOr<RequestId> Submit(GenerationRequest request, TokenCallback callback);
  void Cancel(RequestId id);
  // Stops accepting new requests, lets in-flight ones finish for up to
  // `timeout`, cancels the rest, and stops the thread.
  void Drain(absl::Duration timeout);
  EngineSnapshot Snapshot() const;

 private:
  void Run();
  // Copies the engine's counts into snapshot_ (mu_ held, or before Start).
  void RefreshSnapshotLocked();

  Engine* engine_;
  const EngineLoopOptions options_;
  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::pair<GenerationRequest, TokenCallback>> incoming_;  // guarded by mu_
  std::deque<RequestId> incoming_ids_;                                // guarded by mu_
  std::set<RequestId> cancelled_;                                     // guarded by mu_
  RequestId next_id_ = 1;                                             // guarded by mu_
  bool draining_ = false;                                             // guarded by mu_
  bool stop_ = false;                                                 // guarded by mu_
  EngineSnapshot snapshot_;                                           // guarded by mu_
  std::thread thread_;
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_ENGINE_LOOP_H_
