#include "server/api/inference_service.h"

#include <deque>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/bucket_counts.h"
#include "base/status_macros.h"

namespace loraserve::api {
namespace {

// One Generate stream. The engine thread hands events over through a shared
// Channel, which outlives the reactor (a cancelled event may still arrive
// after gRPC is done with the stream). Decisions are made under mu_; the
// gRPC calls they lead to (StartWrite, Finish) and EngineLoop::Cancel are made
// after it is released. That is safe without the lock because only the party
// that sets finished_ calls Finish, and gRPC keeps the reactor alive until
// Finish has completed (OnDone).
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  // What the engine callback and the reactor share.
  struct Channel {
    std::mutex mu;
    GenerateReactor* reactor = nullptr;  // null once the stream is done
  };

  // `tokenizer` is non-null when the client asked for token_texts.
  GenerateReactor(engine::EngineLoop* loop, const model::Tokenizer* tokenizer)
      : loop_(loop), tokenizer_(tokenizer), channel_(std::make_shared<Channel>()) {
    channel_->reactor = this;
  }

  // Submits the request, or ends the stream with the error. Called once, on a
  // gRPC thread or the adapter loading thread, possibly after gRPC took the
  // reactor: no Finish has been called before it, so the reactor is alive;
  // channel->mu is held until the id is recorded, so no event (and so no
  // Finish and OnDone) can overtake it.
  void Start(absl::StatusOr<engine::GenerationRequest> request) {
    std::shared_ptr<Channel> channel = channel_;
    engine::EngineLoop* const loop = loop_;
    Action action;
    bool cancel = false;
    engine::RequestId cancel_id = 0;
    {
      std::lock_guard<std::mutex> channel_lock(channel->mu);
      bool client_gone;
      {
        std::lock_guard<std::mutex> lock(mu_);
        client_gone = cancel_requested_;
        if (request.ok()) {
          prompt_tokens_ = static_cast<int32_t>(request->prompt_ids.size());
          if (!request->prompt_ids.empty()) previous_token_ = request->prompt_ids.back();
        }
      }
      absl::StatusOr<engine::RequestId> id =
          absl::CancelledError("the client cancelled the stream");
      if (!request.ok()) {
        id = request.status();
      } else if (!client_gone) {
        id = loop_->Submit(std::move(*request), [channel](const engine::TokenEvent& event) {
          GenerateReactor* reactor;
          Action action;
          {
            std::lock_guard<std::mutex> lock(channel->mu);
            reactor = channel->reactor;
            if (reactor == nullptr) return;
            action = reactor->OnEvent(event);
          }
          // Nothing to do means another thread may own the stream's end
          // (a failed write finishes it): once channel->mu is released,
          // OnDone may delete the reactor, so it is not touched again. A
          // write or a Finish keeps it alive: no one else can end the
          // stream before this thread has started them.
          if (action.write == nullptr && !action.finish) return;
          reactor->Run(action);
        });
      }
      std::lock_guard<std::mutex> lock(mu_);
      if (!id.ok()) {
        action = FinishLocked(ToGrpcStatus(id.status()));
      } else {
        id_ = *id;
        submitted_ = true;
        // The client may have gone while Submit ran.
        cancel = cancel_requested_;
        cancel_id = id_;
      }
    }
    // Once the locks are released the request's last event may finish the
    // stream and OnDone delete the reactor: no member is read from here on.
    if (cancel) loop->Cancel(cancel_id);
    // Set only when this call ends the stream itself, which keeps it alive until then.
    if (action.finish) Run(action);
  }

  void OnWriteDone(bool ok) override {
    Action action;
    bool cancel = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      pending_.pop_front();
      if (ok) {
        action = NextLocked();
      } else {  // the client went away
        cancel = submitted_ && !last_received_;
        action = FinishLocked(ToGrpcStatus(absl::CancelledError("stream closed by the client")));
      }
    }
    if (cancel) loop_->Cancel(id_);
    Run(action);
  }

  // The client cancelled or the deadline passed: the engine frees the
  // request's KV blocks and ends the stream with a kCancelled event.
  void OnCancel() override {
    bool cancel;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancel_requested_ = true;
      cancel = submitted_ && !last_received_;
    }
    if (cancel) loop_->Cancel(id_);
  }

  void OnDone() override {
    {
      std::lock_guard<std::mutex> lock(channel_->mu);
      channel_->reactor = nullptr;
    }
    delete this;
  }

 private:
  // What to do once mu_ is released.
  struct Action {
    const v1::GenerateResponse* write = nullptr;
    bool finish = false;
    grpc::Status status;
  };

  void Run(const Action& action) {
    if (action.write != nullptr) StartWrite(action.write);
    if (action.finish) Finish(action.status);
  }

  // Engine thread, under channel->mu.
  Action OnEvent(const engine::TokenEvent& event) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return {};
    if (event.finish == engine::FinishReason::kCancelled) {
      last_received_ = true;
      return FinishLocked(ToGrpcStatus(absl::CancelledError("request cancelled")));
    }
    if (event.finish == engine::FinishReason::kError) {
      end_status_ =
          ToGrpcStatus(event.error.ok() ? absl::InternalError("generation failed") : event.error);
      last_received_ = true;
      return NextLocked();
    }
    v1::GenerateResponse response;
    response.set_token_id(event.token_id);
    response.set_text(event.text);
    response.set_logprob(event.logprob);
    if (tokenizer_ != nullptr) response.set_token(TokenText(event.token_id));
    for (const engine::TokenLogprob& alt : event.top_logprobs) {
      v1::TokenLogprob* out = response.add_top_logprobs();
      out->set_token_id(alt.id);
      out->set_logprob(alt.logprob);
      if (tokenizer_ != nullptr) out->set_token(TokenText(alt.id));
    }
    previous_token_ = event.token_id;
    ++completion_tokens_;
    if (event.finish != engine::FinishReason::kNone) {
      response.set_finish_reason(engine::FinishReasonName(event.finish));
      response.mutable_usage()->set_prompt_tokens(prompt_tokens_);
      response.mutable_usage()->set_completion_tokens(completion_tokens_);
      last_received_ = true;
    }
    pending_.push_back(std::move(response));
    return NextLocked();
  }

  // The next write (deque elements keep their address while others are
  // pushed), or the Finish once the last event's message is out.
  Action NextLocked() {
    if (writing_ || finished_) return {};
    if (!pending_.empty()) {
      writing_ = true;
      Action action;
      action.write = &pending_.front();
      return action;
    }
    if (last_received_) return FinishLocked(end_status_);
    return {};
  }

  Action FinishLocked(const grpc::Status& status) {
    if (finished_) return {};
    finished_ = true;
    Action action;
    action.finish = true;
    action.status = status;
    return action;
  }

  // The text `id` adds after the previous token: decoded alone, a
  // SentencePiece token would lose its leading space.
  std::string TokenText(int32_t id) const {
    const int32_t alone[] = {id};
    if (previous_token_ < 0) return tokenizer_->Decode(alone, /*skip_special_tokens=*/false);
    const int32_t before[] = {previous_token_};
    const int32_t pair[] = {previous_token_, id};
    const std::string prefix = tokenizer_->Decode(before, /*skip_special_tokens=*/false);
    const std::string both = tokenizer_->Decode(pair, /*skip_special_tokens=*/false);
    return absl::StartsWith(both, prefix) ? both.substr(prefix.size())
                                          : tokenizer_->Decode(alone, false);
  }

  engine::EngineLoop* const loop_;
  const model::Tokenizer* const tokenizer_;
  int32_t prompt_tokens_ = 0;    // set by Start
  int32_t previous_token_ = -1;  // the last prompt or generated token (token_texts)
  std::shared_ptr<Channel> channel_;
  std::mutex mu_;
  std::deque<v1::GenerateResponse> pending_;  // front is being written while writing_
  engine::RequestId id_ = 0;
  bool submitted_ = false;
  bool cancel_requested_ = false;
  bool writing_ = false;
  bool last_received_ = false;
  bool finished_ = false;
  int32_t completion_tokens_ = 0;
  grpc::Status end_status_ = grpc::Status::OK;
};

void CopyBucketCounts(const BucketCounts& from, v1::Histogram* to) {
  to->mutable_upper_bounds()->Assign(from.upper_bounds.begin(), from.upper_bounds.end());
  to->mutable_counts()->Assign(from.counts.begin(), from.counts.end());
  to->set_sum(from.sum);
}

}  // namespace

absl::StatusOr<engine::GenerationRequest> InferenceService::ToEngineRequest(
    const v1::GenerateRequest& request) {
  engine::GenerationRequest out;
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      ASSIGN_OR_RETURN(out.prompt_ids, tokenizer_->Encode(request.text(), true));
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      out.prompt_ids.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("prompt: set text or token_ids");
  }
  if (!request.adapters().empty()) {
    if (!request.adapter().empty()) {
      return absl::InvalidArgumentError(
          "set adapter (one adapter) or adapters (a composition), not both");
    }
    std::vector<adapters::WeightedAdapterId> parts;
    for (const v1::WeightedAdapter& part : request.adapters()) {
      parts.push_back({part.id(), part.weight() == 0.0f ? 1.0f : part.weight()});
    }
    ASSIGN_OR_RETURN(out.adapter, registry_->AcquireComposed(parts));
  } else if (!request.adapter().empty()) {
    ASSIGN_OR_RETURN(out.adapter, registry_->Acquire(request.adapter()));
  }
  // A composition's id starts with its first component's (sorted by id).
  if (out.adapter != nullptr) out.tenant = out.adapter->id.substr(0, out.adapter->id.find('/'));
  out.adapter_scale = request.adapter_scale() == 0.0f ? 1.0f : request.adapter_scale();
  out.sampling.temperature = request.sampling().temperature();
  out.sampling.top_k = request.sampling().top_k();
  out.sampling.top_p = request.sampling().top_p() == 0.0f ? 1.0f : request.sampling().top_p();
  out.sampling.seed =
      request.sampling().has_seed() ? request.sampling().seed() : std::random_device{}();
  out.max_tokens = request.max_tokens();
  out.stop.assign(request.stop().begin(), request.stop().end());
  out.stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  out.ignore_eos = request.ignore_eos();
  out.top_logprobs = request.logprobs();
  out.skip_special_tokens = !request.keep_special_tokens();
  return out;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* reactor = new GenerateReactor(loop_, request->token_texts() ? tokenizer_ : nullptr);
  // Acquiring an adapter evicted from the host tier reads it from disk, and
  // composing adapters builds a new one: that happens on the loading thread,
  // not on gRPC's.
  if (request->adapters().empty() &&
      (request->adapter().empty() || registry_->IsResident(request->adapter()))) {
    reactor->Start(ToEngineRequest(*request));
  } else {
    adapter_loads_.Run([this, reactor, request] { reactor->Start(ToEngineRequest(*request)); });
  }
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const v1::TokenizeRequest* request,
                                                     v1::TokenizeResponse* response) {
  absl::StatusOr<std::vector<int32_t>> ids =
      tokenizer_->Encode(request->text(), request->add_special_tokens());
  if (ids.ok()) response->mutable_token_ids()->Add(ids->begin(), ids->end());
  return FinishUnary(context, ids.status());
}

grpc::ServerUnaryReactor* InferenceService::Detokenize(grpc::CallbackServerContext* context,
                                                       const v1::DetokenizeRequest* request,
                                                       v1::DetokenizeResponse* response) {
  const std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  // The tokenizer decodes unknown ids to nothing; a client sending one has a
  // bug it should hear about.
  const int64_t vocab = tokenizer_->vocab_size();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return FinishUnary(context, absl::InvalidArgumentError(
                                      absl::StrCat("token_ids[", i, "]: ", ids[i],
                                                   " is outside the vocabulary [0, ", vocab, ")")));
    }
  }
  response->set_text(tokenizer_->Decode(ids, request->skip_special_tokens()));
  return FinishUnary(context, absl::OkStatus());
}

grpc::ServerUnaryReactor* InferenceService::Stats(grpc::CallbackServerContext* context,
                                                  const v1::StatsRequest* request,
                                                  v1::StatsResponse* response) {
  const engine::EngineSnapshot snapshot = loop_->Snapshot();
  response->set_running(snapshot.running);
  response->set_waiting(snapshot.waiting);
  response->set_kv_blocks_used(snapshot.kv_blocks_used);
  response->set_kv_blocks_total(snapshot.kv_blocks_total);
  response->set_steps(snapshot.stats.steps);
  response->set_prefix_cached_tokens(snapshot.stats.prefix_cached_tokens);
  response->set_preemptions(snapshot.stats.preemptions);
  response->set_kv_cache_bytes(snapshot.kv_cache_bytes);
  response->set_device_adapters_resident(snapshot.device_adapters.resident_adapters);
  response->set_device_adapter_bytes(snapshot.device_adapters.resident_bytes);
  response->set_device_adapter_uploads(snapshot.device_adapters.misses);
  response->set_merged_steps(snapshot.stats.merged_steps);
  response->set_graph_steps(snapshot.stats.graph_steps);
  response->set_graph_fallbacks(snapshot.stats.graph_fallbacks);
  response->set_draining(snapshot.draining);
  response->set_device_adapter_evictions(snapshot.device_adapters.evictions);
  response->set_device_adapter_budget_bytes(snapshot.device_adapter_budget_bytes);
  for (const std::string& hash : snapshot.device_resident_hashes) {
    response->add_device_resident_hashes(hash);
  }
  CopyBucketCounts(snapshot.device_adapters.upload_seconds,
                   response->mutable_device_upload_seconds());
  response->set_merges(snapshot.stats.merges);
  response->set_merge_evictions(snapshot.stats.merge_evictions);
  response->set_merge_failures(snapshot.stats.merge_failures);
  response->set_merged_bytes(snapshot.stats.merged_bytes);
  response->set_merged_cache_budget_bytes(options_.merged_cache_budget_bytes);
  const adapters::AdapterRegistryStats host = registry_->stats();
  response->set_host_adapters_registered(host.registered);
  response->set_host_adapters_resident(host.resident);
  response->set_host_adapter_bytes(static_cast<int64_t>(host.host_bytes));
  response->set_host_adapter_budget_bytes(static_cast<int64_t>(host.host_budget_bytes));
  response->set_host_adapter_loads(host.host.loads);
  response->set_host_adapter_evictions(host.host.evictions);
  CopyBucketCounts(host.host.load_seconds, response->mutable_host_load_seconds());
  *response->mutable_server() = options_.server;
  response->mutable_running_adapters()->Add(snapshot.adapters.running.begin(),
                                            snapshot.adapters.running.end());
  response->mutable_waiting_adapters()->Add(snapshot.adapters.waiting.begin(),
                                            snapshot.adapters.waiting.end());
  response->set_max_adapters(snapshot.adapters.max_adapters);
  return FinishUnary(context, absl::OkStatus());
}

}  // namespace loraserve::api
