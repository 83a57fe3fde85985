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
//   Engine engine(model.get(), tokenizer.get(), cache.get(), {});
//   ASSIGN_OR_RETURN(RequestId id, engine.Add(request, [](const TokenEvent& e) {...}));
//   while (engine.HasWork()) RETURN_IF_ERROR(engine.Step());
#ifndef LORASERVE_SERVER_ENGINE_ENGINE_H_
#define LORASERVE_SERVER_ENGINE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/engine/kv_cache.h"
#include "server/engine/sampler.h"
#include "server/model/llama_model.h"
#include "server/model/tokenizer.h"

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
};

enum class FinishReason { kNone, kStop, kLength };
const char* FinishReasonName(FinishReason reason);

// One generated token as the client sees it.
struct TokenEvent {
  int32_t token_id = 0;
  std::string text;  // new text (may be empty: incomplete character, held-back stop prefix)
  float logprob = 0.0f;
  std::vector<TokenLogprob> top_logprobs;
  FinishReason finish = FinishReason::kNone;  // set on the last event
};

using RequestId = int64_t;
using TokenCallback = std::function<void(const TokenEvent&)>;

struct EngineOptions {
  int32_t max_batch_tokens = 2048;  // prompt + decode tokens in one step
  int32_t max_running_requests = 256;
};

class Engine {
 public:
  Engine(model::LlamaModel* model, const model::Tokenizer* tokenizer, KvCache* cache,
         EngineOptions options);
  ~Engine();

  // Validates and queues a request. InvalidArgument names the bad field.
  absl::StatusOr<RequestId> Add(GenerationRequest request, TokenCallback callback);
  // Runs one batched forward pass and delivers its tokens.
  absl::Status Step();
  bool HasWork() const;

 private:
  struct Sequence;
  absl::Status Validate(const GenerationRequest& request) const;
  void Emit(Sequence& seq, const SampledToken& sampled);

  model::LlamaModel* model_;
  const model::Tokenizer* tokenizer_;
  KvCache* cache_;
  EngineOptions options_;
  RequestId next_id_ = 1;
  std::vector<std::unique_ptr<Sequence>> waiting_;
  std::vector<std::unique_ptr<Sequence>> running_;
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_ENGINE_H_
