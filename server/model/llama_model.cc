#include "server/model/llama_model.h"

#include <algorithm>
#include <array>
#include <optional>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "server/model/decode_padding.h"
#include "server/model/llama_layer.h"

namespace loraserve::model {

using kernels::AttentionBatch;
using kernels::DeviceBuffer;
using kernels::DType;
using kernels::WeightView;

// Activations of one step, grown to the largest batch seen.
struct LlamaModel::Scratch {
  int64_t token_capacity = 0;
  int64_t row_capacity = 0;
  DeviceBuffer x, h, qkv, attn, gate_up, act;       // per token
  DeviceBuffer rows, rows_h, logits;                // per logit row
  DeviceBuffer ints;                                // step metadata
  DeviceBuffer lora_t;                              // packed LoRA intermediate
  std::vector<kernels::LoraSegment> lora_segments;  // host, rebuilt per projection
};

// Which token rows run which adapter, at which multiplier of its scale.
struct LlamaModel::LoraPlan {
  struct Segment {
    int32_t start = 0;
    int32_t end = 0;
    const adapters::DeviceAdapter* adapter = nullptr;
    float scale = 1.0f;       // negative for corrections against merged weights
    bool correction = false;  // undoes the merged adapter: no DoRA scale of its own
  };
  // The decoder projections' LoRA terms: each sequence's own adapter, then
  // the corrections against merged weights.
  std::vector<Segment> segments;
  // Every sequence whose adapter extends the forward pass (DoRA, head LoRA,
  // saved modules), merged or not: the merged set holds only projections.
  std::vector<Segment> heads;

  // Adds rows [start, end), extending the last segment when it continues it.
  static void Add(std::vector<Segment>& list, int32_t start, int32_t end,
                  const adapters::DeviceAdapter* adapter, float scale, bool correction = false) {
    if (!list.empty() && list.back().end == start && list.back().adapter == adapter &&
        list.back().scale == scale && list.back().correction == correction) {
      list.back().end = end;
    } else {
      list.push_back({start, end, adapter, scale, correction});
    }
  }

  // The segments of `heads` in another row space: `rows[i]` is the token of
  // row i (logit rows); consecutive rows of one segment form one run.
  static std::vector<Segment> RowSegments(const std::vector<Segment>& heads,
                                          const std::vector<int32_t>& rows) {
    std::vector<Segment> out;
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto seg = std::find_if(heads.begin(), heads.end(), [&](const Segment& h) {
        return rows[i] >= h.start && rows[i] < h.end;
      });
      if (seg == heads.end()) continue;
      const int32_t row = static_cast<int32_t>(i);
      Add(out, row, row + 1, seg->adapter, seg->scale);
    }
    return out;
  }

  static LoraPlan Build(const ForwardInput& in) {
    LoraPlan plan;
    std::vector<Segment> corrections;
    const AdapterChoice base;
    const AdapterChoice merged = in.merged != nullptr ? in.merged->choice() : base;
    for (size_t s = 0; s + 1 < in.query_start.size(); ++s) {
      const AdapterChoice& choice = in.adapters.empty() ? base : in.adapters[s];
      const int32_t start = in.query_start[s];
      const int32_t end = in.query_start[s + 1];
      if (choice.adapter != nullptr && choice.adapter->extends_forward()) {
        Add(plan.heads, start, end, choice.adapter, choice.scale);
      }
      if (choice == merged) continue;  // the weights already are this sequence's
      if (choice.adapter != nullptr) {
        Add(plan.segments, start, end, choice.adapter, choice.scale);
      }
      if (merged.adapter != nullptr) {
        Add(corrections, start, end, merged.adapter, -merged.scale, /*correction=*/true);
      }
    }
    plan.segments.insert(plan.segments.end(), corrections.begin(), corrections.end());
    return plan;
  }
};

LlamaModel::LlamaModel(kernels::Backend* backend, formats::ModelConfig config)
    : backend_(backend), config_(std::move(config)), scratch_(std::make_unique<Scratch>()) {}

LlamaModel::~LlamaModel() = default;

KvShape LlamaModel::kv_shape() const {
  return {config_.num_hidden_layers, config_.num_key_value_heads, config_.head_dim};
}

adapters::BaseModelShape LlamaModel::adapter_shape() const {
  return adapters::LlamaBaseShape(config_.num_hidden_layers, config_.hidden_size,
                                  config_.intermediate_size, config_.num_attention_heads,
                                  config_.num_key_value_heads, config_.head_dim,
                                  config_.vocab_size);
}

adapters::BaseWeights LlamaModel::base_weights() const {
  using adapters::LoraModule;
  adapters::BaseWeights base;
  base.lm_head = lm_head_;
  base.projection = [this](int64_t layer, LoraModule module) {
    const Layer& l = layers_[static_cast<size_t>(layer)];
    const int64_t q_dim = config_.num_attention_heads * config_.head_dim;
    const int64_t kv_dim = config_.num_key_value_heads * config_.head_dim;
    const int64_t inter = config_.intermediate_size;
    // (matrix, first row, rows) of the module in its fused matrix.
    auto rows = [](const WeightView& w, int64_t first, int64_t n) {
      const int64_t row_bytes = kernels::WeightRowBytes(w.dtype, w.cols);
      return WeightView{static_cast<const char*>(w.data) + first * row_bytes, w.dtype, n, w.cols};
    };
    switch (module) {
      case LoraModule::kQProj:
        return rows(l.qkv, 0, q_dim);
      case LoraModule::kKProj:
        return rows(l.qkv, q_dim, kv_dim);
      case LoraModule::kVProj:
        return rows(l.qkv, q_dim + kv_dim, kv_dim);
      case LoraModule::kOProj:
        return l.o;
      case LoraModule::kGateProj:
        return rows(l.gate_up, 0, inter);
      case LoraModule::kUpProj:
        return rows(l.gate_up, inter, inter);
      case LoraModule::kDownProj:
        return l.down;
    }
    return WeightView{};
  };
  return base;
}

int64_t LlamaModel::MergeBytes(const adapters::DeviceAdapter& adapter) const {
  using adapters::LoraModule;
  int64_t bytes = 0;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    auto add_if = [&](const WeightView& w, std::initializer_list<LoraModule> modules) {
      for (LoraModule m : modules) {
        if (adapter.weights(static_cast<int64_t>(l), m).rank > 0) {
          bytes += kernels::WeightBytes(w.dtype, w.rows, w.cols);
          return;
        }
      }
    };
    add_if(layer.qkv, {LoraModule::kQProj, LoraModule::kKProj, LoraModule::kVProj});
    add_if(layer.o, {LoraModule::kOProj});
    add_if(layer.gate_up, {LoraModule::kGateProj, LoraModule::kUpProj});
    add_if(layer.down, {LoraModule::kDownProj});
  }
  return bytes;
}

absl::StatusOr<std::unique_ptr<MergedWeights>> LlamaModel::Merge(
    const AdapterChoice& choice) const {
  using adapters::LoraModule;
  if (choice.adapter == nullptr || choice.adapter->num_layers() != config_.num_hidden_layers) {
    return absl::InvalidArgumentError("Merge: adapter missing or for another layer count");
  }
  auto merged = std::make_unique<MergedWeights>();
  merged->choice_ = choice;
  auto allocate = [&](const WeightView& like) -> absl::StatusOr<WeightView> {
    const auto bytes = static_cast<size_t>(kernels::WeightBytes(like.dtype, like.rows, like.cols));
    ASSIGN_OR_RETURN(DeviceBuffer buffer, backend_->Allocate(bytes));
    WeightView view = like;
    view.data = buffer.data();
    merged->bytes_ += static_cast<int64_t>(bytes);
    merged->buffers_.push_back(std::move(buffer));
    return view;
  };
  // Rows [row_offset, row_offset + rows) of `base` into the same rows of
  // `out`, with the module's LoRA folded in when it has one.
  auto fold = [&](const WeightView& base, int64_t row_offset, int64_t rows, int64_t layer,
                  LoraModule module, const WeightView& out) -> absl::Status {
    const int64_t row_bytes = kernels::WeightRowBytes(base.dtype, base.cols);
    const auto offset = static_cast<size_t>(row_offset * row_bytes);
    const WeightView part{static_cast<const char*>(base.data) + offset, base.dtype, rows,
                          base.cols};
    void* dst = static_cast<char*>(const_cast<void*>(out.data)) + offset;
    const adapters::DeviceLoraWeights& w = choice.adapter->weights(layer, module);
    if (w.rank == 0) {
      return backend_->CopyOnDevice(dst, part.data, static_cast<size_t>(rows * row_bytes));
    }
    // DoRA's merged rows: m / ‖W + s·B·A‖ ⊙ (W + s·B·A), the norm taken at
    // the adapter's own scale.
    if (w.dora_scale != nullptr && choice.scale != 1.0f) {
      return absl::InvalidArgumentError("Merge: a DoRA adapter merges at scale 1 only");
    }
    return backend_->MergeLora(part, w.a, w.bt, w.rank, w.scale * choice.scale, dst,
                               w.dora_scale);
  };
  auto adapted = [&](int64_t layer, LoraModule module) {
    return choice.adapter->weights(layer, module).rank > 0;
  };
  // One matrix, or modules' matrices stacked by rows (q/k/v, gate/up), each
  // part (module, rows) in turn: merged when any part is adapted.
  using Part = std::pair<LoraModule, int64_t>;
  auto matrix = [&](const WeightView& base, int64_t layer,
                    std::initializer_list<Part> parts) -> absl::StatusOr<WeightView> {
    bool any = false;
    for (const auto& [module, rows] : parts) any = any || adapted(layer, module);
    if (!any) return base;
    ASSIGN_OR_RETURN(WeightView out, allocate(base));
    int64_t row = 0;
    for (const auto& [module, rows] : parts) {
      RETURN_IF_ERROR(fold(base, row, rows, layer, module, out));
      row += rows;
    }
    return out;
  };
  const int64_t q_dim = config_.num_attention_heads * config_.head_dim;
  const int64_t kv_dim = config_.num_key_value_heads * config_.head_dim;
  const int64_t inter = config_.intermediate_size;
  merged->layers_.resize(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& base = layers_[l];
    MergedWeights::Layer& out = merged->layers_[l];
    const int64_t layer = static_cast<int64_t>(l);
    ASSIGN_OR_RETURN(out.qkv, matrix(base.qkv, layer,
                                     {{LoraModule::kQProj, q_dim},
                                      {LoraModule::kKProj, kv_dim},
                                      {LoraModule::kVProj, kv_dim}}));
    ASSIGN_OR_RETURN(out.o, matrix(base.o, layer, {{LoraModule::kOProj, base.o.rows}}));
    ASSIGN_OR_RETURN(out.gate_up,
                     matrix(base.gate_up, layer,
                            {{LoraModule::kGateProj, inter}, {LoraModule::kUpProj, inter}}));
    ASSIGN_OR_RETURN(out.down, matrix(base.down, layer, {{LoraModule::kDownProj, base.down.rows}}));
  }
  return merged;
}

absl::Status LlamaModel::EnsureScratch(int64_t num_tokens, int64_t num_logit_rows) {
  Scratch& s = *scratch_;
  const formats::ModelConfig& c = config_;
  auto grow = [&](DeviceBuffer& buffer, int64_t floats) -> absl::Status {
    ASSIGN_OR_RETURN(buffer, backend_->Allocate(static_cast<size_t>(floats) * sizeof(float)));
    return absl::OkStatus();
  };
  if (num_tokens > s.token_capacity) {
    const int64_t n = std::max(num_tokens, 2 * s.token_capacity);
    const int64_t q_dim = c.num_attention_heads * c.head_dim;
    const int64_t kv_dim = c.num_key_value_heads * c.head_dim;
    RETURN_IF_ERROR(grow(s.x, n * c.hidden_size));
    RETURN_IF_ERROR(grow(s.h, n * c.hidden_size));
    RETURN_IF_ERROR(grow(s.qkv, n * (q_dim + 2 * kv_dim)));
    RETURN_IF_ERROR(grow(s.attn, n * q_dim));
    RETURN_IF_ERROR(grow(s.gate_up, n * 2 * c.intermediate_size));
    RETURN_IF_ERROR(grow(s.act, n * c.intermediate_size));
    s.token_capacity = n;
  }
  if (num_logit_rows > s.row_capacity) {
    const int64_t n = std::max(num_logit_rows, 2 * s.row_capacity);
    RETURN_IF_ERROR(grow(s.rows, n * c.hidden_size));
    RETURN_IF_ERROR(grow(s.rows_h, n * c.hidden_size));
    RETURN_IF_ERROR(grow(s.logits, n * c.vocab_size));
    s.row_capacity = n;
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Forward(const ForwardInput& in, const KvCacheView& kv,
                                 std::vector<float>* logits) {
  ASSIGN_OR_RETURN(const float* device_logits, ForwardOnDevice(in, kv));
  logits->resize(in.logit_rows.size() * static_cast<size_t>(config_.vocab_size));
  if (logits->empty()) return absl::OkStatus();
  return backend_->CopyToHost(logits->data(), device_logits, logits->size() * sizeof(float));
}

absl::StatusOr<const float*> LlamaModel::ForwardOnDevice(const ForwardInput& in,
                                                         const KvCacheView& kv) {
  const int64_t num_tokens = static_cast<int64_t>(in.tokens.size());
  const int64_t num_seqs = static_cast<int64_t>(in.context_lens.size());
  if (num_tokens == 0 || num_seqs == 0 || in.positions.size() != in.tokens.size() ||
      in.slot_mapping.size() != in.tokens.size() ||
      in.query_start.size() != in.context_lens.size() + 1 ||
      in.block_tables.size() != static_cast<size_t>(num_seqs * in.max_blocks_per_seq) ||
      kv.k.size() != layers_.size() || kv.v.size() != layers_.size() ||
      (!in.adapters.empty() && in.adapters.size() != static_cast<size_t>(num_seqs))) {
    return absl::InvalidArgumentError("forward batch: inconsistent sizes");
  }
  // DoRA scales, head LoRA and saved modules run per adapter segment with
  // the adapter's own pointers, which a recorded step cannot vary: such
  // steps run operation by operation.
  const bool extended = std::any_of(in.adapters.begin(), in.adapters.end(), [](const auto& c) {
    return c.adapter != nullptr && c.adapter->extends_forward();
  });
  if (step_graphs_ && !extended && backend_->SupportsStepGraphs()) {
    if (std::optional<DecodeShape> shape = DecodeStepShape(in)) {
      return RunStep(PadDecodeStep(in, *shape), kv, /*as_graph=*/true);
    }
  }
  return RunStep(in, kv, /*as_graph=*/false);
}

absl::StatusOr<const float*> LlamaModel::RunStep(const ForwardInput& in, const KvCacheView& kv,
                                                 bool as_graph) {
  const int64_t num_tokens = static_cast<int64_t>(in.tokens.size());
  const int64_t num_seqs = static_cast<int64_t>(in.context_lens.size());
  const int64_t num_rows = static_cast<int64_t>(in.logit_rows.size());
  const LoraPlan lora = LoraPlan::Build(in);
  RETURN_IF_ERROR(EnsureScratch(num_tokens, num_rows));
  Scratch& s = *scratch_;

  // All integer metadata goes to the device in one copy.
  std::vector<int32_t> ints;
  auto append = [&ints](const std::vector<int32_t>& v) {
    const size_t offset = ints.size();
    ints.insert(ints.end(), v.begin(), v.end());
    return offset;
  };
  const size_t tokens_at = append(in.tokens);
  const size_t positions_at = append(in.positions);
  const size_t query_start_at = append(in.query_start);
  const size_t context_lens_at = append(in.context_lens);
  const size_t block_tables_at = append(in.block_tables);
  const size_t slots_at = append(in.slot_mapping);
  const size_t rows_at = append(in.logit_rows);
  if (s.ints.bytes() < ints.size() * sizeof(int32_t)) {
    ASSIGN_OR_RETURN(s.ints, backend_->Allocate(2 * ints.size() * sizeof(int32_t)));
  }
  RETURN_IF_ERROR(backend_->CopyToDevice(s.ints.data(), ints.data(), ints.size() * 4));
  const int32_t* dev = s.ints.as<int32_t>();

  AttentionBatch batch;
  batch.num_seqs = static_cast<int32_t>(num_seqs);
  batch.num_tokens = static_cast<int32_t>(num_tokens);
  batch.query_start = dev + query_start_at;
  batch.context_lens = dev + context_lens_at;
  batch.block_tables = dev + block_tables_at;
  batch.max_blocks_per_seq = in.max_blocks_per_seq;
  batch.slot_mapping = dev + slots_at;
  batch.positions = dev + positions_at;
  const StepOperands step{&in, &kv, &lora, batch, dev + tokens_at, dev + rows_at};

  if (as_graph) {
    // Everything the step's operations use is allocated before the step.
    RETURN_IF_ERROR(ReserveLoraIntermediate(lora, num_tokens));
    // One graph per padded shape, adapter use and weight set; the backend
    // checks every call against the recording, so a key that collides or a
    // buffer that moved only costs a new capture.
    const uint64_t shape = static_cast<uint64_t>(num_tokens) |
                           (static_cast<uint64_t>(in.max_blocks_per_seq) << 20) |
                           (static_cast<uint64_t>(!lora.segments.empty()) << 40);
    const uint64_t key = shape ^ (reinterpret_cast<uintptr_t>(in.merged) * 0x9E3779B97F4A7C15ull);
    // Each sequence may bring its own segment and a correction.
    absl::Status status = backend_->BeginStep(key, static_cast<int32_t>(2 * num_seqs));
    in_step_graph_ = status.ok();
    if (status.ok()) status = Encode(step);
    if (status.ok()) status = backend_->EndStep();
    in_step_graph_ = false;
    if (status.ok()) {
      ++step_graph_stats_.graph_steps;
      return s.logits.as<float>();
    }
    // Nothing of the step has run: run it operation by operation.
    backend_->AbortStep();
    ++step_graph_stats_.eager_fallbacks;
  }
  RETURN_IF_ERROR(Encode(step));
  return s.logits.as<float>();
}

absl::Status LlamaModel::ReserveLoraIntermediate(const LoraPlan& lora, int64_t num_tokens) {
  // A region per fused target (see ApplyLora). Sized for every token twice
  // (own adapter and a correction) at rank 64 or the step's largest, so
  // that the buffer, whose address the step's recording holds, rarely moves.
  int32_t max_rank = kReservedLoraRank;
  for (const LoraPlan::Segment& seg : lora.segments) {
    max_rank = std::max(max_rank, seg.adapter->max_rank());
  }
  const int64_t region = std::max<int64_t>(1, 2 * num_tokens * max_rank);
  const int64_t floats = region * static_cast<int64_t>(kMaxFusedLoraTargets);
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  if (scratch_->lora_t.bytes() < bytes) {
    ASSIGN_OR_RETURN(scratch_->lora_t, backend_->Allocate(2 * bytes));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::Encode(const StepOperands& step) {
  const formats::ModelConfig& c = config_;
  const ForwardInput& in = *step.input;
  const int64_t num_tokens = static_cast<int64_t>(in.tokens.size());
  const int64_t num_rows = static_cast<int64_t>(in.logit_rows.size());
  Scratch& s = *scratch_;
  RETURN_IF_ERROR(backend_->Embedding(step.tokens, num_tokens, embed_tokens_, s.x.as<float>()));
  if (!step.lora->heads.empty()) RETURN_IF_ERROR(EmbedHeads(step, *step.lora));
  for (size_t l = 0; l < layers_.size(); ++l) {
    RETURN_IF_ERROR(RunLayer(static_cast<int64_t>(l), layers_[l], num_tokens, step.batch,
                             step.kv->layout, in.merged, *step.lora, step.kv->k[l], step.kv->v[l]));
  }
  if (num_rows == 0) return absl::OkStatus();
  // Only the rows whose logits are wanted go through the final norm and lm_head.
  const WeightView hidden_states{s.x.data(), DType::kF32, num_tokens, c.hidden_size};
  RETURN_IF_ERROR(
      backend_->Embedding(step.logit_rows, num_rows, hidden_states, s.rows.as<float>()));
  if (step.lora->heads.empty()) {
    return backend_->RmsNormLinear(s.rows.as<float>(), final_norm_, num_rows, c.hidden_size,
                                   static_cast<float>(c.rms_norm_eps), s.rows.as<float>(),
                                   lm_head_, s.logits.as<float>());
  }
  // The normed rows go apart from the hidden states, which rows of adapters
  // with their own final norm are normed from again.
  RETURN_IF_ERROR(backend_->RmsNormLinear(s.rows.as<float>(), final_norm_, num_rows,
                                          c.hidden_size, static_cast<float>(c.rms_norm_eps),
                                          s.rows_h.as<float>(), lm_head_, s.logits.as<float>()));
  return LmHeadHeads(in, *step.lora);
}

absl::Status LlamaModel::EmbedHeads(const StepOperands& step, const LoraPlan& lora) {
  using adapters::HeadModule;
  const int64_t hidden = config_.hidden_size;
  float* x = scratch_->x.as<float>();
  std::vector<kernels::LoraSegment>& segments = scratch_->lora_segments;
  segments.clear();
  int64_t t_floats = 0;
  for (const LoraPlan::Segment& seg : lora.heads) {
    const kernels::WeightView& own = seg.adapter->saved().embed_tokens;
    if (own.data != nullptr) {
      RETURN_IF_ERROR(backend_->Embedding(step.tokens + seg.start, seg.end - seg.start, own,
                                          x + seg.start * hidden));
    }
    const adapters::DeviceLoraWeights& w = seg.adapter->head_weights(HeadModule::kEmbedTokens);
    if (w.rank == 0) continue;
    segments.push_back({seg.start, seg.end, w.a, w.bt, w.rank, w.scale * seg.scale});
    t_floats += int64_t{seg.end - seg.start} * w.rank;
  }
  if (segments.empty()) return absl::OkStatus();
  RETURN_IF_ERROR(EnsureLoraIntermediate(t_floats));
  // The shrink of a one-hot row is a gather: Aᵀ's row of each token.
  float* t = scratch_->lora_t.as<float>();
  for (const kernels::LoraSegment& seg : segments) {
    const WeightView table{seg.a, backend_->LoraDType(), config_.vocab_size, seg.rank};
    RETURN_IF_ERROR(backend_->Embedding(step.tokens + seg.start, seg.end - seg.start, table, t));
    t += int64_t{seg.end - seg.start} * seg.rank;
  }
  return backend_->LoraExpand(scratch_->lora_t.as<float>(), segments.data(),
                              static_cast<int32_t>(segments.size()), hidden, x, hidden);
}

absl::Status LlamaModel::LmHeadHeads(const ForwardInput& in, const LoraPlan& lora) {
  using adapters::HeadModule;
  const formats::ModelConfig& c = config_;
  Scratch& s = *scratch_;
  const int64_t hidden = c.hidden_size;
  const int64_t vocab = c.vocab_size;
  const std::vector<LoraPlan::Segment> rows = LoraPlan::RowSegments(lora.heads, in.logit_rows);
  // Rows of adapters with their own final norm or lm_head, again with those.
  for (const LoraPlan::Segment& seg : rows) {
    const adapters::DeviceSavedModules& saved = seg.adapter->saved();
    if (saved.norm == nullptr && saved.lm_head.data == nullptr) continue;
    RETURN_IF_ERROR(backend_->RmsNormLinear(
        s.rows.as<float>() + seg.start * hidden, saved.norm ? saved.norm : final_norm_,
        seg.end - seg.start, hidden, static_cast<float>(c.rms_norm_eps),
        s.rows_h.as<float>() + seg.start * hidden,
        saved.lm_head.data != nullptr ? saved.lm_head : lm_head_,
        s.logits.as<float>() + seg.start * vocab));
  }
  std::vector<kernels::LoraSegment>& segments = s.lora_segments;
  segments.clear();
  std::vector<kernels::ColumnScaleSegment> dora;
  for (const LoraPlan::Segment& seg : rows) {
    const adapters::DeviceLoraWeights& w = seg.adapter->head_weights(HeadModule::kLmHead);
    if (w.rank == 0) continue;
    segments.push_back({seg.start, seg.end, w.a, w.bt, w.rank, w.scale * seg.scale});
    if (w.dora_scale != nullptr) dora.push_back({seg.start, seg.end, w.dora_scale});
  }
  if (segments.empty()) return absl::OkStatus();
  const int32_t count = static_cast<int32_t>(segments.size());
  RETURN_IF_ERROR(EnsureLoraIntermediate(kernels::LoraIntermediateSize(segments.data(), count)));
  float* t = s.lora_t.as<float>();
  RETURN_IF_ERROR(backend_->LoraShrink(s.rows_h.as<float>(), hidden, segments.data(), count, t));
  RETURN_IF_ERROR(
      backend_->LoraExpand(t, segments.data(), count, vocab, s.logits.as<float>(), vocab));
  return backend_->ScaleColumns(s.logits.as<float>(), vocab, vocab, dora.data(),
                                static_cast<int32_t>(dora.size()));
}

absl::Status LlamaModel::EnsureLoraIntermediate(int64_t floats) {
  const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
  if (scratch_->lora_t.bytes() < bytes) {
    ASSIGN_OR_RETURN(scratch_->lora_t, backend_->Allocate(2 * bytes));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ScaleDora(int64_t layer_index, std::initializer_list<LoraTarget> targets,
                                   const LoraPlan& lora) {
  std::vector<kernels::ColumnScaleSegment> dora;
  for (const LoraTarget& target : targets) {
    dora.clear();
    for (const LoraPlan::Segment& seg : lora.segments) {
      const float* scale = seg.adapter->weights(layer_index, target.module).dora_scale;
      if (!seg.correction && scale != nullptr) dora.push_back({seg.start, seg.end, scale});
    }
    RETURN_IF_ERROR(backend_->ScaleColumns(target.y, target.ldy, target.out, dora.data(),
                                           static_cast<int32_t>(dora.size())));
  }
  return absl::OkStatus();
}

bool LlamaModel::HasDora(int64_t layer_index, adapters::LoraModule module, const LoraPlan& lora) {
  return std::any_of(lora.segments.begin(), lora.segments.end(), [&](const LoraPlan::Segment& s) {
    return !s.correction && s.adapter->weights(layer_index, module).dora_scale != nullptr;
  });
}

absl::Status LlamaModel::NormHeads(const std::vector<const float*> adapters::DeviceSavedModules::*
                                       norms,
                                   int64_t layer_index, const float* x, float* h,
                                   const WeightView& w, float* y, const LoraPlan& lora) {
  const int64_t hidden = config_.hidden_size;
  for (const LoraPlan::Segment& seg : lora.heads) {
    const std::vector<const float*>& own = seg.adapter->saved().*norms;
    if (own.empty() || own[static_cast<size_t>(layer_index)] == nullptr) continue;
    RETURN_IF_ERROR(backend_->RmsNormLinear(
        x + seg.start * hidden, own[static_cast<size_t>(layer_index)], seg.end - seg.start,
        hidden, static_cast<float>(config_.rms_norm_eps), h + seg.start * hidden, w,
        y + seg.start * w.rows));
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::ApplyLora(int64_t layer_index, std::initializer_list<LoraTarget> targets,
                                   const float* x, int64_t in, const LoraPlan& lora) {
  if (lora.segments.empty()) return absl::OkStatus();
  // The segments of every target, target after target: one shrink launch
  // reads x once for all of them, and each target's part of the packed
  // intermediate then expands into its own output.
  std::vector<kernels::LoraSegment>& segments = scratch_->lora_segments;
  segments.clear();
  std::array<int32_t, kMaxFusedLoraTargets> counts{};
  size_t i = 0;
  for (const LoraTarget& target : targets) {
    for (const LoraPlan::Segment& seg : lora.segments) {
      const adapters::DeviceLoraWeights& w = seg.adapter->weights(layer_index, target.module);
      if (w.rank == 0) continue;
      segments.push_back({seg.start, seg.end, w.a, w.bt, w.rank, w.scale * seg.scale});
      ++counts[i];
    }
    ++i;
  }
  if (in_step_graph_) {
    // A recorded graph's pointers must not depend on this step's adapters:
    // each target gets its own shrink into a fixed region of the
    // intermediate (ReserveLoraIntermediate sized it), and a target no
    // segment adapts is still a call, since a replay may adapt it.
    const size_t region = scratch_->lora_t.bytes() / sizeof(float) / kMaxFusedLoraTargets;
    const kernels::LoraSegment* first = segments.data();
    i = 0;
    for (const LoraTarget& target : targets) {
      const int32_t n = counts[i];
      float* t = scratch_->lora_t.as<float>() + i++ * region;
      RETURN_IF_ERROR(backend_->LoraShrink(x, in, first, n, t));
      RETURN_IF_ERROR(backend_->LoraExpand(t, first, n, target.out, target.y, target.ldy));
      first += n;
    }
    return absl::OkStatus();
  }
  if (segments.empty()) return absl::OkStatus();
  const int32_t count = static_cast<int32_t>(segments.size());
  RETURN_IF_ERROR(EnsureLoraIntermediate(kernels::LoraIntermediateSize(segments.data(), count)));
  float* t = scratch_->lora_t.as<float>();
  RETURN_IF_ERROR(backend_->LoraShrink(x, in, segments.data(), count, t));
  const kernels::LoraSegment* first = segments.data();
  i = 0;
  for (const LoraTarget& target : targets) {
    const int32_t n = counts[i++];
    if (n > 0) RETURN_IF_ERROR(backend_->LoraExpand(t, first, n, target.out, target.y, target.ldy));
    t += kernels::LoraIntermediateSize(first, n);
    first += n;
  }
  return ScaleDora(layer_index, targets, lora);
}

absl::Status LlamaModel::RunLayer(int64_t layer_index, const Layer& layer, int64_t num_tokens,
                                  const AttentionBatch& batch, const kernels::KvLayout& layout,
                                  const MergedWeights* merged, const LoraPlan& lora, void* k_cache,
                                  void* v_cache) {
  using adapters::LoraModule;
  const formats::ModelConfig& c = config_;
  Scratch& s = *scratch_;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int32_t heads = static_cast<int32_t>(c.num_attention_heads);
  const int32_t kv_heads = static_cast<int32_t>(c.num_key_value_heads);
  const int64_t hidden = c.hidden_size;
  const int64_t inter = c.intermediate_size;
  const int64_t q_dim = int64_t{heads} * c.head_dim;
  const int64_t kv_dim = int64_t{kv_heads} * c.head_dim;
  const int64_t qkv_dim = q_dim + 2 * kv_dim;
  const MergedWeights::Layer* m = merged != nullptr ? &merged->layers_[layer_index] : nullptr;
  const WeightView& w_qkv = m ? m->qkv : layer.qkv;
  const WeightView& wo = m ? m->o : layer.o;
  const WeightView& w_gate_up = m ? m->gate_up : layer.gate_up;
  const WeightView& w_down = m ? m->down : layer.down;
  float* x = s.x.as<float>();
  float* h = s.h.as<float>();
  // Each token's q, k and v side by side in one row of the fused projection.
  float* q = s.qkv.as<float>();
  float* k = q + q_dim;
  float* v = k + kv_dim;
  // Attention block; the residual add is the GEMM's accumulation into x.
  // q, k and v are one GEMM, and one LoRA shrink serves all three.
  RETURN_IF_ERROR(
      backend_->RmsNormLinear(x, layer.input_norm, num_tokens, hidden, eps, h, w_qkv, q));
  using Saved = adapters::DeviceSavedModules;
  if (!lora.heads.empty()) {
    RETURN_IF_ERROR(NormHeads(&Saved::input_norms, layer_index, x, h, w_qkv, q, lora));
  }
  RETURN_IF_ERROR(ApplyLora(layer_index,
                            {{LoraModule::kQProj, q_dim, q, qkv_dim},
                             {LoraModule::kKProj, kv_dim, k, qkv_dim},
                             {LoraModule::kVProj, kv_dim, v, qkv_dim}},
                            h, hidden, lora));
  if (layer.qkv_bias != nullptr) {
    RETURN_IF_ERROR(backend_->AddBias(q, layer.qkv_bias, num_tokens, qkv_dim));
  }
  const kernels::RopeParams rope{inv_freq_.as<float>(), static_cast<int32_t>(c.head_dim), 1.0f};
  RETURN_IF_ERROR(
      backend_->Rope(q, qkv_dim, k, qkv_dim, batch.positions, num_tokens, heads, kv_heads, rope));
  RETURN_IF_ERROR(backend_->WriteKv(k, v, qkv_dim, batch, layout, k_cache, v_cache));
  float* attn = s.attn.as<float>();
  RETURN_IF_ERROR(
      backend_->PagedAttention(q, qkv_dim, batch, layout, heads, k_cache, v_cache, attn));
  // DoRA scales the whole projection, not the residual it is added to: such
  // a projection goes through h (free by now) before the add.
  const bool o_dora = HasDora(layer_index, LoraModule::kOProj, lora);
  float* o_out = o_dora ? h : x;
  RETURN_IF_ERROR(backend_->Linear(attn, wo, num_tokens, o_out, /*accumulate=*/!o_dora));
  RETURN_IF_ERROR(ApplyLora(layer_index, {{LoraModule::kOProj, wo.rows, o_out, wo.rows}}, attn,
                            wo.cols, lora));
  if (o_dora) RETURN_IF_ERROR(backend_->Add(x, h, num_tokens * hidden));

  // MLP block: gate and up share one GEMM; their LoRA terms land in their
  // halves of the stacked activation.
  float* gate_up = s.gate_up.as<float>();
  RETURN_IF_ERROR(backend_->RmsNormLinear(x, layer.post_attention_norm, num_tokens, hidden, eps, h,
                                          w_gate_up, gate_up));
  if (!lora.heads.empty()) {
    RETURN_IF_ERROR(
        NormHeads(&Saved::post_attention_norms, layer_index, x, h, w_gate_up, gate_up, lora));
  }
  RETURN_IF_ERROR(ApplyLora(layer_index,
                            {{LoraModule::kGateProj, inter, gate_up, 2 * inter},
                             {LoraModule::kUpProj, inter, gate_up + inter, 2 * inter}},
                            h, hidden, lora));
  float* act = s.act.as<float>();
  const bool down_dora = HasDora(layer_index, LoraModule::kDownProj, lora);
  float* down_out = down_dora ? h : x;
  RETURN_IF_ERROR(backend_->SiluMulLinear(gate_up, num_tokens, inter, act, w_down, down_out,
                                          /*accumulate=*/!down_dora));
  RETURN_IF_ERROR(ApplyLora(layer_index,
                            {{LoraModule::kDownProj, w_down.rows, down_out, w_down.rows}}, act,
                            inter, lora));
  if (down_dora) RETURN_IF_ERROR(backend_->Add(x, h, num_tokens * hidden));
  return absl::OkStatus();
}

}  // namespace loraserve::model
