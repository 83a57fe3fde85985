#include "server/engine/engine_loop.h"

#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace loraserve::engine {

EngineLoop::EngineLoop(Engine* engine, EngineLoopOptions options)
    : engine_(engine), options_(options) {
  // Scrapes before the first step see the idle engine's bounds (KV blocks,
  // adapter slots), not zeros. No other thread runs yet: no lock needed.
  RefreshSnapshotLocked();
}

EngineLoop::~EngineLoop() { Drain(absl::ZeroDuration()); }

void EngineLoop::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (thread_.joinable() || stop_) return;
  thread_ = std::thread([this] { Run(); });
}

absl::StatusOr<RequestId> EngineLoop::Submit(GenerationRequest request, TokenCallback callback) {
  // Validation reads only immutable engine state: done here, on the caller's
  // thread, so a bad request never reaches the engine thread.
  if (absl::Status status = engine_->Validate(request); !status.ok()) return status;
  std::lock_guard<std::mutex> lock(mu_);
  if (draining_ || stop_) {
    return absl::UnavailableError("the server is shutting down and accepts no new requests");
  }
  const int64_t queued = static_cast<int64_t>(incoming_.size()) + snapshot_.waiting;
  if (queued >= options_.max_queued_requests) {
    return absl::ResourceExhaustedError(
        absl::StrCat("request queue is full (", queued,
                     " waiting, --max-queued-requests=", options_.max_queued_requests, ")"));
  }
  const RequestId id = next_id_++;
  incoming_.emplace_back(std::move(request), std::move(callback));
  incoming_ids_.push_back(id);
  wake_.notify_one();
  return id;
}

void EngineLoop::Cancel(RequestId id) {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_.insert(id);
  wake_.notify_one();
}

void EngineLoop::Drain(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  {
    std::unique_lock<std::mutex> lock(mu_);
    draining_ = true;
    snapshot_.draining = true;
    wake_.notify_one();
    // Wait for in-flight requests to finish on their own until the deadline.
    while (thread_.joinable() &&
           (snapshot_.running + snapshot_.waiting > 0 || !incoming_.empty())) {
      // Every step wakes this wait: the deadline is checked at each wake-up,
      // or a busy engine would drain past it.
      wake_.wait_for(lock, std::chrono::milliseconds(20));
      if (absl::Now() >= deadline) break;
    }
    stop_ = true;
    wake_.notify_one();
  }
  if (thread_.joinable()) thread_.join();
}

EngineSnapshot EngineLoop::Snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineSnapshot snapshot = snapshot_;
  snapshot.waiting += static_cast<int64_t>(incoming_.size());
  std::set<std::string> waiting(snapshot.adapters.waiting.begin(), snapshot.adapters.waiting.end());
  for (const auto& [request, callback] : incoming_) {
    if (request.adapter != nullptr) waiting.insert(request.adapter->id);
  }
  snapshot.adapters.waiting.assign(waiting.begin(), waiting.end());
  return snapshot;
}

void EngineLoop::Run() {
  while (true) {
    std::deque<std::pair<GenerationRequest, TokenCallback>> incoming;
    std::deque<RequestId> ids;
    std::set<RequestId> cancelled;
    bool stop;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] {
        return stop_ || !incoming_.empty() || !cancelled_.empty() || engine_->HasWork();
      });
      incoming.swap(incoming_);
      ids.swap(incoming_ids_);
      cancelled.swap(cancelled_);
      stop = stop_;
      // Until the snapshot is refreshed after this step, the requests taken
      // here count as waiting: Submit's queue bound and Drain see them.
      snapshot_.waiting += static_cast<int64_t>(incoming.size());
    }
    for (size_t i = 0; i < incoming.size(); ++i) {
      auto& [request, callback] = incoming[i];
      TokenCallback on_event = callback;
      if (absl::Status status = engine_->Add(ids[i], std::move(request), std::move(callback));
          !status.ok()) {
        // Validated at Submit; only a changed engine state can land here.
        TokenEvent event;
        event.finish = FinishReason::kError;
        event.error = status;
        on_event(event);
      }
    }
    for (RequestId id : cancelled) engine_->Cancel(id);
    // Whatever is left ends now, with its final event: the clients should
    // retry elsewhere (UNAVAILABLE), not take it for their own cancellation.
    if (stop) {
      engine_->AbortAll(absl::UnavailableError(
          "the server shut down before this request finished (--drain-seconds); retry it"));
    }
    if (engine_->HasWork() || stop) {
      if (absl::Status status = engine_->Step(); !status.ok() && !stop) {
        // The failed step's requests already got their error event; a step
        // that cannot admit anything waits for more room.
        if (absl::IsResourceExhausted(status)) {
          std::unique_lock<std::mutex> lock(mu_);
          wake_.wait_for(lock, std::chrono::milliseconds(10));
        }
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      RefreshSnapshotLocked();
      wake_.notify_all();  // Drain watches the counts
      if (stop && !engine_->HasWork()) return;
    }
  }
}

void EngineLoop::RefreshSnapshotLocked() {
  snapshot_.running = engine_->num_running();
  snapshot_.waiting = engine_->num_waiting();
  snapshot_.adapters = engine_->adapter_activity();
  snapshot_.kv_blocks_total = engine_->kv_cache().num_blocks();
  snapshot_.kv_blocks_used = snapshot_.kv_blocks_total - engine_->kv_cache().free_blocks();
  snapshot_.kv_cache_bytes = engine_->kv_cache().bytes();
  snapshot_.stats = engine_->stats();
  const adapters::DeviceAdapterCache& device = engine_->device_adapters();
  // The set only changes with an upload or an eviction.
  if (device.stats().misses != snapshot_.device_adapters.misses ||
      device.stats().evictions != snapshot_.device_adapters.evictions) {
    snapshot_.device_resident_hashes = device.ResidentHashes();
  }
  snapshot_.device_adapters = device.stats();
  snapshot_.device_adapter_budget_bytes = device.budget_bytes();
}

}  // namespace loraserve::engine
