// The model's side of the step-graph contract (Backend::BeginStep), checked
// on the CPU: a backend that says it records step graphs, with the CUDA
// backend's rules, wraps the CPU backend. Inside a step only operations may be
// called, and a later step with the same key must make exactly the calls the
// first one made (LoRA segment tables aside), or the CUDA backend would throw
// the recording away and run the step operation by operation. As a graph's
// kernels do, a step's operations run (on the CPU) only when EndStep
// succeeds; a failed EndStep runs none of them, and the model must then run
// the step operation by operation. The logits are compared with a plain CPU
// model.
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "adapters/device_adapter.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"
#include "tests/support/forward_harness.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using kernels::Backend;
using kernels::DeviceBuffer;
using kernels::LoraSegment;

uintptr_t Address(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// Runs every operation on `inner` (a step's at EndStep) and checks the step
// rules; see the file comment. A replay is a step whose calls equal its
// key's first step.
class StepCheckingBackend : public Backend {
 public:
  explicit StepCheckingBackend(std::unique_ptr<Backend> inner) : inner_(std::move(inner)) {}

  int64_t captures() const { return captures_; }
  int64_t replays() const { return replays_; }
  int64_t mismatches() const { return mismatches_; }
  int64_t refusals() const { return refusals_; }
  // The next `count` EndSteps fail without running their steps, as a graph
  // that cannot be instantiated or launched does.
  void FailNextEndSteps(int count) { failing_end_steps_ = count; }

  std::string name() const override { return "step-checking " + inner_->name(); }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    if (absl::Status s = Refuse("Allocate"); !s.ok()) return s;
    absl::StatusOr<DeviceBuffer> buffer = inner_->Allocate(bytes);
    if (!buffer.ok()) return buffer.status();
    void* data = buffer->data();
    buffers_[data] = std::move(*buffer);
    return DeviceBuffer(this, data, bytes);
  }
  void Free(void* data, size_t bytes) override { buffers_.erase(data); }
  absl::Status DoCopyToDevice(void* dst, const void* src, size_t bytes) override {
    if (absl::Status s = Refuse("CopyToDevice"); !s.ok()) return s;
    return inner_->CopyToDevice(dst, src, bytes);
  }
  absl::Status DoCopyToDeviceAsync(void* dst, const void* src, size_t bytes) override {
    if (absl::Status s = Refuse("CopyToDeviceAsync"); !s.ok()) return s;
    return inner_->CopyToDeviceAsync(dst, src, bytes);
  }
  absl::Status DoCopyToHost(void* dst, const void* src, size_t bytes) override {
    if (absl::Status s = Refuse("CopyToHost"); !s.ok()) return s;
    return inner_->CopyToHost(dst, src, bytes);
  }
  absl::Status DoCopyOnDevice(void* dst, const void* src, size_t bytes) override {
    if (absl::Status s = Refuse("CopyOnDevice"); !s.ok()) return s;
    return inner_->CopyOnDevice(dst, src, bytes);
  }
  absl::Status DoUploadWeight(void* dst, const void* src, kernels::DType src_dtype, int64_t rows,
                              int64_t cols) override {
    if (absl::Status s = Refuse("UploadWeight"); !s.ok()) return s;
    return inner_->UploadWeight(dst, src, src_dtype, rows, cols);
  }
  kernels::DType WeightDType(kernels::DType source) const override {
    return inner_->WeightDType(source);
  }
  kernels::DType KvCacheDType() const override { return inner_->KvCacheDType(); }
  kernels::DType LoraDType() const override { return inner_->LoraDType(); }
  absl::Status Synchronize() override {
    if (absl::Status s = Refuse("Synchronize"); !s.ok()) return s;
    return inner_->Synchronize();
  }
  absl::Status DoSample(const float* logits, int64_t rows, int64_t vocab,
                        const kernels::SamplingRow* params, kernels::SampledToken* out) override {
    if (absl::Status s = Refuse("Sample"); !s.ok()) return s;
    return inner_->Sample(logits, rows, vocab, params, out);
  }

  absl::Status DoLinear(const float* x, const kernels::WeightView& w, int64_t m, float* y,
                        bool accumulate) override {
    return Run(Signature("Linear", Address(x), Address(w.data), w.rows, w.cols, m, Address(y),
                         accumulate ? 1 : 0),
               [=] { return inner_->Linear(x, w, m, y, accumulate); });
  }
  absl::Status DoEmbedding(const int32_t* ids, int64_t n, const kernels::WeightView& table,
                           float* y) override {
    return Run(Signature("Embedding", Address(ids), n, Address(table.data), table.rows, Address(y)),
               [=] { return inner_->Embedding(ids, n, table, y); });
  }
  absl::Status DoRmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                         float* y) override {
    return Run(Signature("RmsNorm", Address(x), Address(weight), n, dim, eps, Address(y)),
               [=] { return inner_->RmsNorm(x, weight, n, dim, eps, y); });
  }
  absl::Status DoAdd(float* x, const float* y, int64_t count) override {
    return Run(Signature("Add", Address(x), Address(y), count),
               [=] { return inner_->Add(x, y, count); });
  }
  absl::Status DoAddBias(float* x, const float* bias, int64_t n, int64_t dim) override {
    return Run(Signature("AddBias", Address(x), Address(bias), n, dim),
               [=] { return inner_->AddBias(x, bias, n, dim); });
  }
  absl::Status DoSiluMul(const float* gate_up, int64_t n, int64_t dim, float* out) override {
    return Run(Signature("SiluMul", Address(gate_up), n, dim, Address(out)),
               [=] { return inner_->SiluMul(gate_up, n, dim, out); });
  }
  // The segments are the per-step input of a LoRA call: only their number
  // is bounded, by BeginStep's max_segments. They are copied at the call,
  // as the CUDA backend stages them.
  absl::Status DoLoraShrink(const float* x, int64_t in, const LoraSegment* segments,
                            int32_t num_segments, float* t) override {
    CheckSegments(num_segments);
    return Run(Signature("LoraShrink", Address(x), in, Address(t)),
               [=, this, table = Table(segments, num_segments)] {
                 return inner_->LoraShrink(x, in, table.data(), num_segments, t);
               });
  }
  absl::Status DoLoraExpand(const float* t, const LoraSegment* segments, int32_t num_segments,
                            int64_t out, float* y, int64_t ldy) override {
    CheckSegments(num_segments);
    return Run(Signature("LoraExpand", Address(t), out, Address(y), ldy),
               [=, this, table = Table(segments, num_segments)] {
                 return inner_->LoraExpand(t, table.data(), num_segments, out, y, ldy);
               });
  }
  absl::Status DoMergeLora(const kernels::WeightView& base, const void* a, const void* bt,
                           int32_t rank, float scale, void* out, const float* row_scale) override {
    return Run(Signature("MergeLora", Address(base.data), Address(a), Address(bt), rank, scale,
                         Address(out), Address(row_scale)),
               [=] { return inner_->MergeLora(base, a, bt, rank, scale, out, row_scale); });
  }
  absl::Status DoScaleColumns(float* y, int64_t ldy, int64_t cols,
                              const kernels::ColumnScaleSegment* segments,
                              int32_t num_segments) override {
    return Run(Signature("ScaleColumns", Address(y), ldy, cols, num_segments),
               [=, this, table = std::vector<kernels::ColumnScaleSegment>(
                         segments, segments + num_segments)] {
                 return inner_->ScaleColumns(y, ldy, cols, table.data(), num_segments);
               });
  }
  absl::Status DoRope(float* q, int64_t q_ld, float* k, int64_t k_ld, const int32_t* positions,
                      int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                      const kernels::RopeParams& rope) override {
    return Run(
        Signature("Rope", Address(q), q_ld, Address(k), k_ld, Address(positions), tokens, num_heads,
                  num_kv_heads, Address(rope.inv_freq), rope.head_dim, rope.attention_scaling),
        [=] {
          return inner_->Rope(q, q_ld, k, k_ld, positions, tokens, num_heads, num_kv_heads, rope);
        });
  }
  absl::Status DoWriteKv(const float* k, const float* v, int64_t kv_ld,
                         const kernels::AttentionBatch& batch, const kernels::KvLayout& layout,
                         void* k_cache, void* v_cache) override {
    return Run(Signature("WriteKv", Address(k), Address(v), kv_ld, Address(batch.slot_mapping),
                         batch.num_tokens, layout.num_blocks, Address(k_cache), Address(v_cache)),
               [=] { return inner_->WriteKv(k, v, kv_ld, batch, layout, k_cache, v_cache); });
  }
  absl::Status DoPagedAttention(const float* q, int64_t q_ld, const kernels::AttentionBatch& batch,
                                const kernels::KvLayout& layout, int32_t num_heads,
                                const void* k_cache, const void* v_cache, float* out) override {
    return Run(
        Signature("PagedAttention", Address(q), q_ld, batch.num_tokens, batch.num_seqs,
                  Address(batch.query_start), Address(batch.context_lens),
                  Address(batch.block_tables), batch.max_blocks_per_seq, Address(batch.positions),
                  num_heads, Address(k_cache), Address(v_cache), Address(out)),
        [=] {
          return inner_->PagedAttention(q, q_ld, batch, layout, num_heads, k_cache, v_cache, out);
        });
  }

  bool SupportsStepGraphs() const override { return true; }
  absl::Status BeginStep(uint64_t key, int32_t max_segments) override {
    EXPECT_FALSE(in_step_) << "BeginStep inside a step";
    in_step_ = true;
    key_ = key;
    max_segments_ = max_segments;
    calls_.clear();
    return absl::OkStatus();
  }
  absl::Status EndStep() override {
    EXPECT_TRUE(in_step_) << "EndStep without BeginStep";
    in_step_ = false;
    std::vector<std::function<absl::Status()>> pending = std::move(pending_);
    pending_.clear();
    if (failing_end_steps_ > 0) {
      --failing_end_steps_;
      return absl::InternalError("StepCheckingBackend: this EndStep fails (test)");
    }
    auto [it, first] = recorded_.emplace(key_, calls_);
    if (first) {
      ++captures_;
    } else if (it->second == calls_) {
      ++replays_;
    } else {
      ++mismatches_;
      ADD_FAILURE() << "a step with key " << key_ << " made other calls than its recording: "
                    << FirstDifference(it->second, calls_);
      it->second = calls_;
    }
    for (const auto& op : pending) {
      if (absl::Status s = op(); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  void AbortStep() override {
    in_step_ = false;
    pending_.clear();
  }

 private:
  absl::Status Refuse(const char* what) {
    if (!in_step_) return absl::OkStatus();
    ++refusals_;
    ADD_FAILURE() << what << " inside a step";
    return absl::FailedPreconditionError(absl::StrCat(what, " inside a step"));
  }
  void CheckSegments(int32_t num_segments) const {
    if (in_step_) {
      EXPECT_LE(num_segments, max_segments_);
    }
  }
  template <typename... Args>
  static std::string Signature(const char* op, const Args&... args) {
    return absl::StrCat(op, "(", absl::StrJoin({absl::StrCat(args)...}, ","), ")");
  }
  static std::vector<LoraSegment> Table(const LoraSegment* segments, int32_t num_segments) {
    return std::vector<LoraSegment>(segments, segments + num_segments);
  }
  // Runs `op` now, or inside a step records its signature and keeps it for
  // EndStep.
  absl::Status Run(std::string signature, std::function<absl::Status()> op) {
    if (!in_step_) return op();
    calls_.push_back(std::move(signature));
    pending_.push_back(std::move(op));
    return absl::OkStatus();
  }
  static std::string FirstDifference(const std::vector<std::string>& a,
                                     const std::vector<std::string>& b) {
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      if (a[i] != b[i]) return absl::StrCat("call ", i, ": ", a[i], " then ", b[i]);
    }
    return absl::StrCat(a.size(), " calls then ", b.size());
  }

  std::unique_ptr<Backend> inner_;
  std::map<void*, DeviceBuffer> buffers_;  // inner allocations handed out as ours
  bool in_step_ = false;
  uint64_t key_ = 0;
  int32_t max_segments_ = 0;
  std::vector<std::string> calls_;
  std::vector<std::function<absl::Status()>> pending_;  // the step's operations
  int failing_end_steps_ = 0;
  std::map<uint64_t, std::vector<std::string>> recorded_;
  int64_t captures_ = 0;
  int64_t replays_ = 0;
  int64_t mismatches_ = 0;
  int64_t refusals_ = 0;
};

// Decode steps with another adapter mix each time (adapters that touch
// different modules, base requests, a half-scale one), then fewer requests,
// then merged weights with corrections for the other adapters:
// every step after the first of its shape replays its recording, no
// operation is refused, and the logits equal a plain CPU model's. Two
// EndSteps fail (a replay and the first step on merged weights): those steps
// run operation by operation, with the same logits.
TEST(StepGraphContractTest, DecodeStepsReplayTheirRecording) {
  auto checking = std::make_unique<StepCheckingBackend>(std::move(*kernels::CreateCpuBackend({})));
  StepCheckingBackend& backend = *checking;
  std::unique_ptr<Backend> plain_backend = std::move(*kernels::CreateCpuBackend({}));
  const std::vector<std::string> adapter_names = {"ocean", "robot", "qv-r4", "mlp-r16-rslora"};
  absl::StatusOr<test_support::SharedModel> graphed_model =
      test_support::LoadSharedModel(&backend, adapter_names);
  absl::StatusOr<test_support::SharedModel> plain_model =
      test_support::LoadSharedModel(plain_backend.get(), adapter_names);
  ASSERT_OK(graphed_model);
  ASSERT_OK(plain_model);
  test_support::SharedModel& graphed = *graphed_model;
  test_support::SharedModel& plain = *plain_model;
  plain.model->set_step_graphs(false);

  const std::vector<std::vector<int32_t>> prompts = {
      {1, 72, 305, 41}, {1, 9, 18}, {1, 400, 2, 33, 87}, {1, 5}, {1, 61, 62, 63, 64, 65}};
  const size_t n = prompts.size();
  // Choice i of step s: adapter (i + s) % 5, where 4 is the base; request 1
  // at half scale.
  const auto choices = [&](test_support::SharedModel& m, int step, size_t count) {
    std::vector<AdapterChoice> out;
    for (size_t i = 0; i < count; ++i) {
      const size_t a = (i + step) % 5;
      out.push_back(a == 4 ? AdapterChoice{}
                           : AdapterChoice{m.adapters[a].get(), i == 1 ? 0.5f : 1.0f});
    }
    return out;
  };
  constexpr int kSteps = 8;
  test_support::PagedTestCache graphed_cache(&backend, graphed.model->kv_shape(), n, 32);
  test_support::PagedTestCache plain_cache(plain_backend.get(), plain.model->kv_shape(), n, 32);
  for (auto [m, cache] : {std::pair{&graphed, &graphed_cache}, std::pair{&plain, &plain_cache}}) {
    ForwardInput prefill = test_support::PrefillAll(prompts, *cache);
    prefill.adapters = choices(*m, 0, n);
    std::vector<float> logits;
    ASSERT_OK(m->model->Forward(prefill, cache->view(), &logits));
  }
  // The last steps run on merged weights of adapter 0: the others get
  // corrections.
  constexpr int kMergedSteps = 3;
  auto graphed_merged = graphed.model->Merge({graphed.adapters[0].get(), 1.0f});
  auto plain_merged = plain.model->Merge({plain.adapters[0].get(), 1.0f});
  ASSERT_TRUE(graphed_merged.ok() && plain_merged.ok());
  constexpr int kFailedSteps = 2;
  for (int step = 0; step < kSteps + kMergedSteps; ++step) {
    SCOPED_TRACE(step);
    if (step == 2 || step == kSteps) backend.FailNextEndSteps(1);
    const size_t active = step < 5 ? n : n - 1;  // 5 requests pad to 8, then 4 to 4
    const bool merged = step >= kSteps;
    std::vector<int32_t> tokens, positions;
    for (size_t s = 0; s < active; ++s) {
      tokens.push_back(10 + step * 7 + static_cast<int32_t>(s));
      positions.push_back(static_cast<int32_t>(prompts[s].size()) + step);
    }
    std::vector<float> graphed_logits, plain_logits;
    ForwardInput in = test_support::DecodeOne(tokens, positions, graphed_cache);
    in.adapters = choices(graphed, step, active);
    in.merged = merged ? graphed_merged->get() : nullptr;
    ASSERT_OK(graphed.model->Forward(in, graphed_cache.view(), &graphed_logits));
    in = test_support::DecodeOne(tokens, positions, plain_cache);
    in.adapters = choices(plain, step, active);
    in.merged = merged ? plain_merged->get() : nullptr;
    ASSERT_OK(plain.model->Forward(in, plain_cache.view(), &plain_logits));
    EXPECT_EQ(
        test_support::MaxAbsDiff(graphed_logits.data(), plain_logits.data(), plain_logits.size()),
        0.0f);
  }
  EXPECT_EQ(graphed.model->step_graph_stats().graph_steps, kSteps + kMergedSteps - kFailedSteps);
  EXPECT_EQ(graphed.model->step_graph_stats().eager_fallbacks, kFailedSteps);
  EXPECT_EQ(backend.captures(), 3);  // two padded shapes, and the merged weights
  EXPECT_EQ(backend.replays(), kSteps + kMergedSteps - 3 - kFailedSteps);
  EXPECT_EQ(backend.mismatches(), 0);
  EXPECT_EQ(backend.refusals(), 0);
}

}  // namespace
}  // namespace loraserve::model
