#include "server/engine/engine.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/engine/incremental_decoder.h"
#include "server/engine/stop_strings.h"

namespace loraserve::engine {

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

struct Engine::Sequence {
  Sequence(RequestId id, GenerationRequest request, TokenCallback callback,
           const model::Tokenizer* tokenizer)
      : id(id),
        request(std::move(request)),
        callback(std::move(callback)),
        tokens(this->request.prompt_ids),
        stop_filter(this->request.stop) {
    if (tokenizer != nullptr) {
      decoder.emplace(*tokenizer, this->request.prompt_ids, this->request.skip_special_tokens);
    }
  }

  int32_t generated() const {
    return static_cast<int32_t>(tokens.size() - request.prompt_ids.size());
  }
  // Sequences with equal keys share LoRA segments; "" is the base model.
  std::string adapter_key() const {
    return request.adapter == nullptr
               ? std::string()
               : absl::StrCat(request.adapter->content_hash(), "@", request.adapter_scale);
  }
  bool mergeable() const { return request.adapter != nullptr && request.adapter_scale == 1.0f; }

  RequestId id;
  GenerationRequest request;
  TokenCallback callback;
  std::vector<int32_t> tokens;                              // prompt, then generated tokens
  int64_t num_cached = 0;                                   // tokens whose K and V are in the cache
  std::vector<int32_t> blocks;                              // block table
  const adapters::DeviceAdapter* device_adapter = nullptr;  // while admitted
  bool preempted = false;  // waiting again after preemption: admitted first
  std::optional<IncrementalDecoder> decoder;
  StopStringFilter stop_filter;
  bool finished = false;
};

// A merged weight set and what keeps it valid: its adapter's device copy is
// held (acquired) for as long as the set exists.
struct Engine::MergedEntry {
  std::unique_ptr<model::MergedWeights> weights;
  adapters::AdapterHandle adapter;
};

Engine::Engine(model::LlamaModel* model, const model::Tokenizer* tokenizer, KvCache* cache,
               adapters::DeviceAdapterCache* device_adapters, EngineOptions options)
    : model_(model),
      tokenizer_(tokenizer),
      cache_(cache),
      base_only_device_adapters_(
          device_adapters != nullptr
              ? nullptr
              : std::make_unique<adapters::DeviceAdapterCache>(model->backend(), 0)),
      device_adapters_(device_adapters != nullptr ? device_adapters
                                                  : base_only_device_adapters_.get()),
      options_(options),
      merge_policy_({.mode = options.lora_mode,
                     .cache_bytes = options.merged_cache_bytes,
                     .threshold = options.merge_threshold,
                     .window_steps = options.merge_window_steps,
                     .min_batch_share = options.merged_min_batch_share}) {
  // DoRA adapters' norms are taken over this model's weights.
  device_adapters_->set_base_weights(model_->base_weights());
}

Engine::~Engine() {
  for (auto& seq : running_) {
    cache_->Release(seq->blocks);
    ReleaseAdapter(*seq);
  }
  DropMergedSets();
}

void Engine::DropMergedSets() {
  for (auto& [hash, entry] : merged_) {
    device_adapters_->Release(entry->adapter->adapter);
    ++stats_.merge_evictions;
  }
  merged_.clear();
  merge_policy_.Clear();
  stats_.merged_bytes = merge_policy_.cached_bytes();
}

absl::Status Engine::AcquireAdapter(Sequence& seq) {
  if (seq.request.adapter == nullptr || seq.device_adapter != nullptr) return absl::OkStatus();
  absl::StatusOr<const adapters::DeviceAdapter*> device =
      device_adapters_->Acquire(seq.request.adapter->adapter);
  if (absl::IsResourceExhausted(device.status()) && !merged_.empty()) {
    // Merged sets hold their adapters' device copies; requests come first.
    DropMergedSets();
    device = device_adapters_->Acquire(seq.request.adapter->adapter);
  }
  if (absl::IsResourceExhausted(device.status())) return device.status();
  if (!device.ok()) {
    return absl::Status(device.status().code(),
                        absl::StrCat("adapter \"", seq.request.adapter->id,
                                     "\" could not be placed on the device: ",
                                     device.status().message()));
  }
  seq.device_adapter = *device;
  return absl::OkStatus();
}

AdapterActivity Engine::adapter_activity() const {
  AdapterActivity activity;
  std::set<std::string> running;
  std::set<std::string> waiting;
  int64_t largest_device_bytes = 0;
  for (const auto& seq : running_) {
    if (seq->request.adapter == nullptr) continue;
    // Each distinct adapter once: a batch holds many requests of few adapters.
    if (!running.insert(seq->request.adapter->id).second) continue;
    largest_device_bytes = std::max(largest_device_bytes,
                                    device_adapters_->DeviceBytes(seq->request.adapter->adapter));
  }
  for (const auto& seq : waiting_) {
    if (seq->request.adapter != nullptr) waiting.insert(seq->request.adapter->id);
  }
  activity.running.assign(running.begin(), running.end());
  activity.waiting.assign(waiting.begin(), waiting.end());
  activity.max_adapters = options_.max_running_requests;
  if (device_adapters_->budget_bytes() > 0 && largest_device_bytes > 0) {
    activity.max_adapters = std::min<int64_t>(
        activity.max_adapters, device_adapters_->budget_bytes() / largest_device_bytes);
  }
  return activity;
}

void Engine::ReleaseAdapter(Sequence& seq) {
  if (seq.device_adapter == nullptr) return;
  device_adapters_->Release(seq.request.adapter->adapter);
  seq.device_adapter = nullptr;
}

void Engine::Preempt(std::unique_ptr<Sequence> seq) {
  cache_->Release(seq->blocks);
  ReleaseAdapter(*seq);
  seq->num_cached = 0;
  seq->preempted = true;
  ++stats_.preemptions;
  waiting_.insert(waiting_.begin(), std::move(seq));
}

bool Engine::HasWork() const { return !waiting_.empty() || !running_.empty(); }

absl::Status Engine::Validate(const GenerationRequest& request) const {
  const int64_t context = model_->config().max_position_embeddings;
  const int64_t prompt = static_cast<int64_t>(request.prompt_ids.size());
  if (prompt == 0) return absl::InvalidArgumentError("prompt: must hold at least one token");
  const int64_t vocab = model_->config().vocab_size;
  for (int32_t id : request.prompt_ids) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt: token id ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  if (request.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens: must be >= 1, got ", request.max_tokens));
  }
  if (prompt + request.max_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens: prompt (", prompt, " tokens) + max_tokens (", request.max_tokens,
                     ") exceeds the model's context of ", context, " tokens"));
  }
  if (cache_->BlocksFor(prompt + request.max_tokens) > cache_->num_blocks()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens: prompt + max_tokens needs ", cache_->BlocksFor(prompt + request.max_tokens),
        " KV blocks but the cache holds only ", cache_->num_blocks()));
  }
  if (request.top_logprobs < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs: must be >= 0, got ", request.top_logprobs));
  }
  if (request.adapter != nullptr && device_adapters_->budget_bytes() == 0) {
    return absl::FailedPreconditionError(
        "adapter: this engine serves the base model only (no device memory for adapters, "
        "--adapter-device-bytes=0)");
  }
  if (request.adapter != nullptr) {
    const int64_t bytes = device_adapters_->DeviceBytes(request.adapter->adapter);
    if (bytes > device_adapters_->budget_bytes()) {
      return absl::ResourceExhaustedError(absl::StrCat("adapter ", request.adapter->id, ": ", bytes,
                                                       " bytes exceed --adapter-device-bytes (",
                                                       device_adapters_->budget_bytes(), ")"));
    }
  }
  if (!std::isfinite(request.adapter_scale) || request.adapter_scale < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter_scale: must be a finite number >= 0, got ", request.adapter_scale));
  }
  if (request.adapter != nullptr && request.adapter->adapter.config().use_dora() &&
      request.adapter_scale != 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter_scale: ", request.adapter->id, " is a DoRA adapter, whose magnitudes are "
        "normalised at its trained scale; it serves at adapter_scale 1 only, got ",
        request.adapter_scale));
  }
  for (int32_t id : request.stop_token_ids) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids: ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return ValidateSamplingParams(request.sampling);
}

absl::StatusOr<RequestId> Engine::Add(GenerationRequest request, TokenCallback callback) {
  const RequestId id = next_id_++;
  RETURN_IF_ERROR(Add(id, std::move(request), std::move(callback)));
  return id;
}

absl::Status Engine::Add(RequestId id, GenerationRequest request, TokenCallback callback) {
  RETURN_IF_ERROR(Validate(request));
  waiting_.push_back(
      std::make_unique<Sequence>(id, std::move(request), std::move(callback), tokenizer_));
  return absl::OkStatus();
}

void Engine::ReusePrefix(Sequence& seq) {
  if (!options_.enable_prefix_cache) return;
  std::vector<uint64_t> hashes = cache_->BlockHashes(seq.adapter_key(), seq.tokens);
  // At least one token is computed, for the logits of the next one.
  hashes.resize(std::min<size_t>(hashes.size(), (seq.tokens.size() - 1) / cache_->block_size()));
  seq.blocks = cache_->MatchPrefix(hashes);
  seq.num_cached = static_cast<int64_t>(seq.blocks.size()) * cache_->block_size();
}

std::unique_ptr<Engine::Sequence> Engine::TakeWaiting(Sequence* seq) {
  auto it = std::find_if(waiting_.begin(), waiting_.end(),
                         [seq](const auto& w) { return w.get() == seq; });
  std::unique_ptr<Sequence> taken = std::move(*it);
  waiting_.erase(it);
  return taken;
}

Engine::Sequence* Engine::NextToAdmit() {
  // Preempted sequences first: they already waited their turn.
  for (auto& seq : waiting_) {
    if (seq->preempted) return seq.get();
  }
  // Then the oldest request of the tenant that has been served least.
  Sequence* best = nullptr;
  for (auto& seq : waiting_) {
    if (best == nullptr || served_[seq->request.tenant] < served_[best->request.tenant]) {
      best = seq.get();
    }
  }
  return best;
}

void Engine::ChargeTenant(const std::string& tenant, int64_t tokens) {
  // A tenant that was idle starts at the least active counter, so it is
  // served promptly but cannot claim the time it spent away.
  auto [it, inserted] = served_.try_emplace(tenant, 0);
  if (inserted) {
    int64_t floor = -1;
    for (const auto& [other, count] : served_) {
      if (other != tenant && (floor < 0 || count < floor)) floor = count;
    }
    it->second = std::max<int64_t>(floor, 0);
  }
  it->second += tokens;
}

absl::Status Engine::Step() {
  DropCancelled();
  ASSIGN_OR_RETURN(std::vector<Planned> plan, Plan());
  if (plan.empty()) return absl::OkStatus();
  std::vector<Sequence*> sampled;  // sequences whose whole context is cached after this step
  const model::ForwardInput in = BuildForwardInput(plan, &sampled);
  // Logits stay on the backend; only the sampled tokens come back.
  std::vector<SampledToken> tokens(sampled.size());
  const absl::Status status = ForwardAndSample(in, sampled, &tokens);
  stats_.graph_steps = model_->step_graph_stats().graph_steps;
  stats_.graph_fallbacks = model_->step_graph_stats().eager_fallbacks;
  if (!status.ok()) {
    // The step's requests fail with the error; everyone else keeps going.
    for (const Planned& p : plan) Finish(*p.seq, FinishReason::kError, status);
    RemoveFinished();
    return status;
  }
  Commit(plan, sampled, tokens);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Engine::Planned>> Engine::Plan() {
  std::vector<Planned> plan;
  // Budget of tokens for this step: running sequences first (a decode token,
  // or the next chunk of a prompt being prefilled), then waiting ones.
  int64_t budget = options_.max_batch_tokens;
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    Sequence& seq = *running_[i];
    const int64_t n =
        std::min<int64_t>(static_cast<int64_t>(seq.tokens.size()) - seq.num_cached, budget);
    if (cache_->Reserve(seq.blocks, seq.num_cached + n).ok()) {
      plan.push_back({&seq, n});
      budget -= n;
      ++i;
      continue;
    }
    // The pool ran dry: the newest running sequence is recomputed later.
    std::unique_ptr<Sequence> victim = std::move(running_.back());
    running_.pop_back();
    for (auto p = plan.begin(); p != plan.end(); ++p) {
      if (p->seq == victim.get()) {
        budget += p->tokens;
        plan.erase(p);
        break;
      }
    }
    Preempt(std::move(victim));
  }
  while (!waiting_.empty() && budget > 0 &&
         static_cast<int32_t>(running_.size()) < options_.max_running_requests) {
    Sequence* seq = NextToAdmit();
    const bool fresh = seq->blocks.empty();
    if (fresh) ReusePrefix(*seq);
    const int64_t n =
        std::min<int64_t>(static_cast<int64_t>(seq->tokens.size()) - seq->num_cached, budget);
    const absl::Status room = cache_->Reserve(seq->blocks, seq->num_cached + n);
    const absl::Status adapter = room.ok() ? AcquireAdapter(*seq) : room;
    if (!adapter.ok()) {
      cache_->Release(seq->blocks);
      seq->num_cached = 0;
      if (absl::IsResourceExhausted(adapter)) break;  // no room now: it waits its turn
      // Waiting cannot mend a failed upload: this request fails with it.
      Finish(*seq, FinishReason::kError, adapter);
      TakeWaiting(seq);
      continue;
    }
    seq->preempted = false;
    if (fresh) stats_.prefix_cached_tokens += seq->num_cached;
    plan.push_back({seq, n});
    budget -= n;
    running_.push_back(TakeWaiting(seq));
  }
  if (plan.empty() && running_.empty() && !waiting_.empty()) {
    return absl::ResourceExhaustedError(
        "no room (KV blocks or adapter memory) for the oldest waiting request");
  }
  return plan;
}

model::ForwardInput Engine::BuildForwardInput(std::vector<Planned>& plan,
                                              std::vector<Sequence*>* sampled) {
  // Sequences of one adapter side by side: each adapter is one LoRA segment.
  std::stable_sort(plan.begin(), plan.end(), [](const Planned& a, const Planned& b) {
    return a.seq->adapter_key() < b.seq->adapter_key();
  });
  model::ForwardInput in;
  in.merged = ChooseMerged(plan);
  ++stats_.steps;
  if (in.merged != nullptr) ++stats_.merged_steps;
  int32_t max_blocks = 0;
  for (const Planned& p : plan) max_blocks = std::max<int32_t>(max_blocks, p.seq->blocks.size());
  in.max_blocks_per_seq = max_blocks;
  in.query_start.push_back(0);
  const int32_t block_size = cache_->block_size();
  for (const Planned& p : plan) {
    Sequence& seq = *p.seq;
    const int64_t end = seq.num_cached + p.tokens;
    for (int64_t pos = seq.num_cached; pos < end; ++pos) {
      in.tokens.push_back(seq.tokens[pos]);
      in.positions.push_back(static_cast<int32_t>(pos));
      in.slot_mapping.push_back(seq.blocks[pos / block_size] * block_size + pos % block_size);
    }
    if (end == static_cast<int64_t>(seq.tokens.size())) {
      in.logit_rows.push_back(static_cast<int32_t>(in.tokens.size()) - 1);
      sampled->push_back(&seq);
    }
    in.query_start.push_back(static_cast<int32_t>(in.tokens.size()));
    in.context_lens.push_back(static_cast<int32_t>(end));
    in.adapters.push_back({seq.device_adapter, seq.request.adapter_scale});
    std::vector<int32_t> table = seq.blocks;
    table.resize(max_blocks, 0);
    in.block_tables.insert(in.block_tables.end(), table.begin(), table.end());
    ChargeTenant(seq.request.tenant, p.tokens);
  }
  return in;
}

void Engine::Commit(const std::vector<Planned>& plan, const std::vector<Sequence*>& sampled,
                    const std::vector<SampledToken>& tokens) {
  for (const Planned& p : plan) {
    Sequence& seq = *p.seq;
    const int64_t full_before = seq.num_cached / cache_->block_size();
    seq.num_cached += p.tokens;
    if (options_.enable_prefix_cache && seq.num_cached / cache_->block_size() > full_before) {
      const std::vector<int32_t> cached(seq.tokens.begin(), seq.tokens.begin() + seq.num_cached);
      cache_->Register(seq.blocks, cache_->BlockHashes(seq.adapter_key(), cached));
    }
  }
  for (size_t i = 0; i < sampled.size(); ++i) Emit(*sampled[i], tokens[i]);
  RemoveFinished();
}

absl::Status Engine::ForwardAndSample(const model::ForwardInput& in,
                                      const std::vector<Sequence*>& sampled,
                                      std::vector<SampledToken>* tokens) {
  ASSIGN_OR_RETURN(const float* logits, model_->ForwardOnDevice(in, cache_->View()));
  if (sampled.empty()) return absl::OkStatus();
  std::vector<kernels::SamplingRow> rows;
  rows.reserve(sampled.size());
  for (const Sequence* seq : sampled) {
    rows.push_back(
        ToSamplingRow(seq->request.sampling, seq->generated(), seq->request.top_logprobs));
  }
  return model_->backend()->Sample(logits,  // [rows, vocab] on the backend
                                   static_cast<int64_t>(rows.size()), model_->config().vocab_size,
                                   rows.data(), tokens->data());
}

void Engine::Cancel(RequestId id) { cancel_requests_.insert(id); }

void Engine::AbortAll(absl::Status why) { abort_all_ = std::move(why); }

void Engine::DropCancelled() {
  if (cancel_requests_.empty() && abort_all_.ok()) return;
  for (auto* queue : {&running_, &waiting_}) {
    for (auto& seq : *queue) {
      if (!abort_all_.ok()) {
        Finish(*seq, FinishReason::kError, abort_all_);
      } else if (cancel_requests_.count(seq->id)) {
        Finish(*seq, FinishReason::kCancelled, {});
      }
    }
  }
  cancel_requests_.clear();
  abort_all_ = absl::OkStatus();
  RemoveFinished();
}

void Engine::Finish(Sequence& seq, FinishReason reason, const absl::Status& error) {
  if (seq.finished) return;
  TokenEvent event;
  event.token_id = -1;
  event.finish = reason;
  event.error = error;
  seq.finished = true;
  seq.callback(event);
}

void Engine::RemoveFinished() {
  // Finished sequences give their blocks and adapters back at once.
  for (auto* queue : {&running_, &waiting_}) {
    for (auto it = queue->begin(); it != queue->end();) {
      if ((*it)->finished) {
        cache_->Release((*it)->blocks);
        ReleaseAdapter(**it);
        it = queue->erase(it);
      } else {
        ++it;
      }
    }
  }
}

const model::MergedWeights* Engine::ChooseMerged(const std::vector<Planned>& plan) {
  // Tokens per mergeable adapter in this step, for the policy's window.
  std::map<std::string, int64_t> tokens;
  std::map<std::string, Sequence*> representative;
  int64_t total = 0;
  for (const auto& [seq, n] : plan) {
    total += n;
    if (!seq->mergeable()) continue;
    tokens[seq->request.adapter->content_hash()] += n;
    representative[seq->request.adapter->content_hash()] = seq;
  }
  const std::optional<std::string> hash = merge_policy_.Choose(tokens, total);
  if (!hash.has_value()) return nullptr;
  // A DoRA adapter's merged rows are scaled: no low-rank correction undoes
  // them for other rows, so its merged set serves steps of its own rows only.
  if (representative.at(*hash)->device_adapter->has_dora() && tokens.at(*hash) != total) {
    return nullptr;
  }
  if (auto it = merged_.find(*hash); it != merged_.end()) return it->second->weights.get();
  return Merge(*representative.at(*hash));
}

const model::MergedWeights* Engine::Merge(Sequence& rep) {
  const int64_t needed = model_->MergeBytes(*rep.device_adapter);
  const adapters::MergePolicy::Room room = merge_policy_.MakeRoom(needed);
  for (const std::string& hash : room.evict) {
    auto it = merged_.find(hash);
    device_adapters_->Release(it->second->adapter->adapter);
    merged_.erase(it);
    ++stats_.merge_evictions;
  }
  stats_.merged_bytes = merge_policy_.cached_bytes();
  if (!room.fits) return nullptr;
  absl::StatusOr<std::unique_ptr<model::MergedWeights>> weights =
      model_->Merge({rep.device_adapter, 1.0f});
  if (!weights.ok() || !device_adapters_->Acquire(rep.request.adapter->adapter).ok()) {
    ++stats_.merge_failures;  // out of memory for a merged set: the unmerged path serves
    return nullptr;
  }
  auto entry = std::make_unique<MergedEntry>();
  entry->weights = std::move(*weights);
  entry->adapter = rep.request.adapter;
  const std::string& hash = rep.request.adapter->content_hash();
  merge_policy_.Insert(hash, static_cast<int64_t>(entry->weights->bytes()));
  stats_.merged_bytes = merge_policy_.cached_bytes();
  ++stats_.merges;
  return merged_.emplace(hash, std::move(entry)).first->second->weights.get();
}

void Engine::Emit(Sequence& seq, const SampledToken& sampled) {
  TokenEvent event;
  event.token_id = sampled.id;
  event.logprob = sampled.logprob;
  event.top_logprobs = sampled.top_logprobs;
  seq.tokens.push_back(sampled.id);

  const std::vector<int64_t>& eos = model_->config().eos_token_ids;
  const bool is_eos =
      !seq.request.ignore_eos && std::find(eos.begin(), eos.end(), sampled.id) != eos.end();
  const auto& stop_ids = seq.request.stop_token_ids;
  if (is_eos || std::find(stop_ids.begin(), stop_ids.end(), sampled.id) != stop_ids.end()) {
    // The stop token ends the request; its text is not part of the output.
    event.text = seq.stop_filter.Flush();
    event.finish = FinishReason::kStop;
  } else {
    StopStringFilter::Result filtered =
        seq.stop_filter.Feed(seq.decoder ? seq.decoder->Append(sampled.id) : std::string());
    event.text = std::move(filtered.text);
    if (filtered.stopped) {
      event.finish = FinishReason::kStop;
    } else if (seq.generated() >= seq.request.max_tokens) {
      // The end: text held back for an incomplete character or a possible
      // stop string is final now.
      filtered = seq.stop_filter.Feed(seq.decoder ? seq.decoder->Flush() : std::string());
      event.text += filtered.text;
      if (!filtered.stopped) event.text += seq.stop_filter.Flush();
      event.finish = filtered.stopped ? FinishReason::kStop : FinishReason::kLength;
    }
  }
  seq.finished = event.finish != FinishReason::kNone;
  seq.callback(event);
}

}  // namespace loraserve::engine
