// The generation engine: runs requests over a LlamaModel step by step,
// batching every running request into one forward pass per step
// (iteration-level batching), with their KV in a shared paged cache.
//
// A step prefills newly admitted prompts and decodes one token for every
// running request; a request finishes at a stop token (EOS unless ignored,
// or one of its stop_token_ids), a stop string, or max_tokens, and its KV
// blocks go back to the pool at once.
//
// Ownership and threading: the engine borrows the model, tokenizer and cache
// (all must outlive it) and is driven by one thread; callbacks run on that
// thread, inside Step().
//
// Example:
//   Engine engine(model.get(), tokenizer.get(), cache.get(), nullptr, {});
//   ASSIGN_OR_RETURN(RequestId id, engine.Add(request, [](const TokenEvent& e) {...}));
//   while (engine.HasWork()) RETURN_IF_ERROR(engine.Step());
#ifndef LORASERVE_SERVER_ENGINE_ENGINE_H_
#define LORASERVE_SERVER_ENGINE_ENGINE_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/device_cache.h"
#include "adapters/merge_policy.h"
#include "adapters/registry.h"
#include "server/engine/kv_cache.h"
#include "server/engine/sampler.h"
#include "server/model/llama_model.h"
#include "server/tokenizer/tokenizer.h"

namespace loraserve::engine {

struct GenerationRequest {
  std::vector<int32_t> prompt_ids;  // non-empty
  SamplingParams sampling;
  int32_t max_tokens = 16;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // besides EOS
  std::vector<std::string> stop;        // stop strings; excluded from the text
  int32_t top_logprobs = 0;             // alternatives reported per token
  bool skip_special_tokens = true;
  // The adapter (null: the base model), held for the whole request so it
  // keeps its version, and the multiplier of its scale (adapter_scale).
  adapters::AdapterHandle adapter;
  float adapter_scale = 1.0f;
  // Fairness: waiting requests are admitted tenant by tenant, the tenant
  // with the fewest tokens served (prompt and generated) first.
  std::string tenant;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
const char* FinishReasonName(FinishReason reason);

// One generated token as the client sees it.
struct TokenEvent {
  int32_t token_id = 0;
  std::string text;  // new text (may be empty: incomplete character, held-back stop prefix)
  float logprob = 0.0f;
  std::vector<TokenLogprob> top_logprobs;
  FinishReason finish = FinishReason::kNone;  // set on the last event
  absl::Status error;                         // why, when finish is kError
};

using RequestId = int64_t;
using TokenCallback = std::function<void(const TokenEvent&)>;

struct EngineOptions {
  int32_t max_batch_tokens = 2048;  // prompt + decode tokens in one step
  int32_t max_running_requests = 256;
  // Reuse the KV of full blocks of earlier prompts with the same adapter
  // (by content hash and scale) and the same tokens.
  bool enable_prefix_cache = false;
  // When steps run on merged weights (adapters/merge_policy.h has the rules).
  adapters::LoraMode lora_mode = adapters::LoraMode::kAuto;
  int64_t merged_cache_bytes = 0;   // merged weight sets; 0 disables merging in auto mode
  double merge_threshold = 0.5;     // auto: adapter's share of recent batch tokens to merge
  int32_t merge_window_steps = 32;  // steps the share is measured over
  // auto: the least share of a step's tokens the merged adapter must have for
  // the step to run on merged weights (the rest get low-rank corrections).
  double merged_min_batch_share = 1.0;
};

struct EngineStats {
  int64_t steps = 0;
  int64_t merged_steps = 0;  // steps that ran on merged weights
  int64_t merges = 0;        // merged weight sets built
  int64_t merge_evictions = 0;
  int64_t merge_failures = 0;  // merges that failed (the unmerged path served instead)
  int64_t merged_bytes = 0;  // held now
  int64_t preemptions = 0;
  int64_t prefix_cached_tokens = 0;  // prompt tokens whose KV came from the prefix cache
  int64_t graph_steps = 0;           // decode steps launched as a recorded step graph (CUDA)
  int64_t graph_fallbacks = 0;       // decode steps a recorded graph could not take
};

// Which adapters the engine is serving, in the terms of the Gateway API
// Inference Extension's model-server protocol (vLLM's lora_requests_info).
struct AdapterActivity {
  std::vector<std::string> running;  // canonical ids of running requests' adapters, sorted, unique
  std::vector<std::string> waiting;  // the same for requests waiting for admission
  // Distinct adapters one batch can hold: one per running request, and no
  // more than the device tier's budget holds at the size of the largest
  // adapter running now (a router sends a new adapter elsewhere at this count).
  int64_t max_adapters = 0;
};

class Engine {
 public:
  // `device_adapters` may be null: the engine then serves the base model only
  // (a device cache of 0 bytes stands in, so no code path tests for null).
  Engine(model::LlamaModel* model, const model::Tokenizer* tokenizer, KvCache* cache,
         adapters::DeviceAdapterCache* device_adapters, EngineOptions options);
  ~Engine();

  // Validates and queues a request. InvalidArgument names the bad field.
  absl::StatusOr<RequestId> Add(GenerationRequest request, TokenCallback callback);
  // The same with an id chosen by the caller (unique among live requests).
  absl::Status Add(RequestId id, GenerationRequest request, TokenCallback callback);
  // What Add checks; depends only on immutable state, so any thread may call it.
  absl::Status Validate(const GenerationRequest& request) const;
  // The request ends before the next step (final event: kCancelled) and
  // its KV blocks go back to the pool; unknown ids are ignored.
  void Cancel(RequestId id);
  // Every request ends before the next step with `why` (final event: kError):
  // a shutdown past its drain deadline.
  void AbortAll(absl::Status why);
  // Runs one batched forward pass and delivers its tokens. Prompts longer
  // than the step's token budget are prefilled in chunks over several steps.
  // A failed forward pass ends that step's requests with kError (and returns
  // the error); the engine stays usable.
  absl::Status Step();
  bool HasWork() const;
  const EngineStats& stats() const { return stats_; }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  AdapterActivity adapter_activity() const;
  const KvCache& kv_cache() const { return *cache_; }
  // Never null.
  const adapters::DeviceAdapterCache& device_adapters() const { return *device_adapters_; }

 private:
  struct Sequence;
  struct MergedEntry;
  void Emit(Sequence& seq, const SampledToken& sampled);
  // Runs the forward pass of `in` and samples the next token of each of
  // `sampled` (in the order of in.logit_rows) on the model's backend.
  absl::Status ForwardAndSample(const model::ForwardInput& in,
                                const std::vector<Sequence*>& sampled,
                                std::vector<SampledToken>* tokens);  // [sampled.size()]
  // Ends a request with a final event carrying no token.
  void Finish(Sequence& seq, FinishReason reason, const absl::Status& error);
  void RemoveFinished();
  void DropCancelled();
  Sequence* NextToAdmit();
  // Removes a sequence from the waiting queue, handing it over.
  std::unique_ptr<Sequence> TakeWaiting(Sequence* seq);
  // Takes the cached KV blocks of the longest known prefix of a sequence
  // that has no blocks yet.
  void ReusePrefix(Sequence& seq);
  void ChargeTenant(const std::string& tenant, int64_t tokens);
  // Makes the sequence's adapter resident on the device: ResourceExhausted
  // when there is no room now (the request waits), another error when the
  // upload itself failed (the request fails with it).
  absl::Status AcquireAdapter(Sequence& seq);
  void ReleaseAdapter(Sequence& seq);
  void DropMergedSets();
  // Takes a running sequence off the batch, freeing its KV for recompute.
  void Preempt(std::unique_ptr<Sequence> seq);
  // A sequence's share of a step: `tokens` of it go through the forward pass.
  struct Planned {
    Sequence* seq;
    int64_t tokens;
  };
  // Step's three parts. Plan: the tokens each sequence runs this step, within
  // the step's token budget and the KV pool (preempting the newest running
  // sequence when the pool runs dry) and admitting waiting ones; ResourceExhausted
  // when nothing can run while requests wait.
  absl::StatusOr<std::vector<Planned>> Plan();
  // Orders the plan by adapter (one LoRA segment each), picks merged weights
  // and lays out the forward pass; `sampled` gets the sequences whose next
  // token this step samples.
  model::ForwardInput BuildForwardInput(std::vector<Planned>& plan,
                                        std::vector<Sequence*>* sampled);
  // After a forward pass: the KV now cached (and its prefix-cache blocks),
  // then each sampled token to its client.
  void Commit(const std::vector<Planned>& plan, const std::vector<Sequence*>& sampled,
              const std::vector<SampledToken>& tokens);
  // The merged weights this step runs on (null: unmerged), after telling the
  // merge policy the step's tokens.
  const model::MergedWeights* ChooseMerged(const std::vector<Planned>& plan);
  // Builds and caches the merged set of `representative`'s adapter, making
  // room as the policy says; null when it does not fit or cannot be built.
  const model::MergedWeights* Merge(Sequence& representative);

  model::LlamaModel* model_;
  const model::Tokenizer* tokenizer_;
  KvCache* cache_;
  std::unique_ptr<adapters::DeviceAdapterCache> base_only_device_adapters_;  // when given none
  adapters::DeviceAdapterCache* device_adapters_;
  EngineOptions options_;
  EngineStats stats_;
  RequestId next_id_ = 1;
  adapters::MergePolicy merge_policy_;
  std::map<std::string, std::unique_ptr<MergedEntry>> merged_;  // content hash -> weights
  std::vector<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
  std::set<RequestId> cancel_requests_;
  absl::Status abort_all_;  // not OK: AbortAll's reason, for the next step
  std::map<std::string, int64_t> served_;  // tenant -> tokens served (virtual time)
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_ENGINE_H_
