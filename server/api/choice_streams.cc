#include "server/api/choice_streams.h"

#include <utility>

#include "absl/time/clock.h"
#include "server/api/status_mapping.h"

namespace loraserve::api {

ChoiceStreams::ChoiceStreams(v1::Inference::StubInterface* stub,
                             std::vector<v1::GenerateRequest> requests) {
  for (size_t i = 0; i < requests.size(); ++i) {
    contexts_.push_back(std::make_unique<grpc::ClientContext>());
  }
  running_ = static_cast<int>(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    threads_.emplace_back([this, stub, i, request = std::move(requests[i])]() mutable {
      std::unique_ptr<grpc::ClientReaderInterface<v1::GenerateResponse>> reader =
          stub->Generate(contexts_[i].get(), request);
      ChoiceEvent event;
      event.choice = static_cast<int>(i);
      event.has_token = true;
      while (reader->Read(&event.token)) Push(event);
      event.has_token = false;
      event.token.Clear();
      event.status = FromGrpcStatus(reader->Finish());
      Push(std::move(event));
    });
  }
}

ChoiceStreams::~ChoiceStreams() {
  Cancel();
  for (std::thread& thread : threads_) thread.join();
}

void ChoiceStreams::Push(ChoiceEvent event) {
  event.received = absl::Now();
  std::lock_guard<std::mutex> lock(mu_);
  if (!event.has_token) --running_;
  events_.push_back(std::move(event));
  ready_.notify_one();
}

ChoiceEvent ChoiceStreams::Next() {
  std::unique_lock<std::mutex> lock(mu_);
  ready_.wait(lock, [this] { return !events_.empty() || running_ == 0; });
  if (events_.empty()) {
    ChoiceEvent done;
    done.done = true;
    return done;
  }
  ChoiceEvent event = std::move(events_.front());
  events_.pop_front();
  return event;
}

void ChoiceStreams::Cancel() {
  // TryCancel is thread-safe and a no-op on a finished call.
  for (auto& context : contexts_) context->TryCancel();
}

}  // namespace loraserve::api
