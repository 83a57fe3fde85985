// The argument checks every backend shares (kernels/backend.cc): a bad
// argument is refused before the backend's implementation runs, with a
// message that names the backend and the op; a call with nothing to do
// returns at once, except the LoRA ops, which a step graph records even
// when empty; a good call reaches the implementation once.

#include "kernels/backend.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::IsOk;
using ::loraserve::test_support::StatusIs;
using ::testing::HasSubstr;

// Counts the calls that reach the implementation; each succeeds and does
// nothing.
class CountingBackend final : public Backend {
 public:
  int calls() const { return calls_; }

  std::string name() const override { return "counting"; }
  absl::StatusOr<DeviceBuffer> Allocate(size_t) override {
    return absl::UnimplementedError("not used");
  }
  DType WeightDType(DType source) const override { return source; }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  void Free(void*, size_t) override {}

 protected:
  absl::Status DoCopyToDevice(void*, const void*, size_t) override { return Count(); }
  absl::Status DoCopyToHost(void*, const void*, size_t) override { return Count(); }
  absl::Status DoCopyOnDevice(void*, const void*, size_t) override { return Count(); }
  absl::Status DoUploadWeight(void*, const void*, DType, int64_t, int64_t) override {
    return Count();
  }
  absl::Status DoLinear(const float*, const WeightView&, int64_t, float*, bool) override {
    return Count();
  }
  absl::Status DoEmbedding(const int32_t*, int64_t, const WeightView&, float*) override {
    return Count();
  }
  absl::Status DoRmsNorm(const float*, const float*, int64_t, int64_t, float, float*) override {
    return Count();
  }
  absl::Status DoRmsNormLinear(const float*, const float*, int64_t, int64_t, float, float*,
                               const WeightView&, float*) override {
    return Count();
  }
  absl::Status DoSiluMulLinear(const float*, int64_t, int64_t, float*, const WeightView&, float*,
                               bool) override {
    return Count();
  }
  absl::Status DoAdd(float*, const float*, int64_t) override { return Count(); }
  absl::Status DoAddBias(float*, const float*, int64_t, int64_t) override { return Count(); }
  absl::Status DoSiluMul(const float*, int64_t, int64_t, float*) override { return Count(); }
  absl::Status DoLoraShrink(const float*, int64_t, const LoraSegment*, int32_t, float*) override {
    return Count();
  }
  absl::Status DoLoraExpand(const float*, const LoraSegment*, int32_t, int64_t, float*,
                            int64_t) override {
    return Count();
  }
  absl::Status DoMergeLora(const WeightView&, const void*, const void*, int32_t, float, void*,
                           const float*) override {
    return Count();
  }
  absl::Status DoScaleColumns(float*, int64_t, int64_t, const ColumnScaleSegment*,
                              int32_t) override {
    return Count();
  }
  absl::Status DoRope(float*, int64_t, float*, int64_t, const int32_t*, int64_t, int32_t, int32_t,
                      const RopeParams&) override {
    return Count();
  }
  absl::Status DoWriteKv(const float*, const float*, int64_t, const AttentionBatch&,
                         const KvLayout&, void*, void*) override {
    return Count();
  }
  absl::Status DoPagedAttention(const float*, int64_t, const AttentionBatch&, const KvLayout&,
                                int32_t, const void*, const void*, float*) override {
    return Count();
  }
  absl::Status DoSample(const float*, int64_t, int64_t, const SamplingRow*,
                        SampledToken*) override {
    return Count();
  }

 private:
  absl::Status Count() {
    ++calls_;
    return absl::OkStatus();
  }
  int calls_ = 0;
};

// Arguments that pass every check: shapes of one small layer, pointers into
// a buffer that is never read (the counting backend reads nothing).
struct GoodArguments {
  float data[64] = {};
  int32_t ids[4] = {};
  WeightView w{data, DType::kF32, 8, 4};
  LoraSegment segment{0, 2, data, data, 2, 0.5f};
  KvLayout layout{4, 16, 2, 8, DType::kF32};
  AttentionBatch batch{1, 2, ids, ids, ids, 1, ids, ids};
  RopeParams rope{data, 8, 1.0f};
  SamplingRow sampling{};
  SampledToken sampled;
};

// One call of an op and the part of its message a bad argument must give.
struct BadCall {
  std::string what;
  std::function<absl::Status(Backend&, GoodArguments&)> call;
  std::string message;
};

std::vector<BadCall> BadCalls() {
  using G = GoodArguments;
  return {
      {"copy to a null dst", [](Backend& b, G& g) { return b.CopyToDevice(nullptr, g.data, 4); },
       "counting: CopyToDevice: dst is null"},
      {"upload a Q8 source",
       [](Backend& b, G& g) { return b.UploadWeight(g.data, g.data, DType::kQ8, 2, 2); },
       "UploadWeight: src_dtype must be F32, F16 or BF16, got Q8"},
      {"linear with a null weight",
       [](Backend& b, G& g) {
         WeightView w = g.w;
         w.data = nullptr;
         return b.Linear(g.data, w, 1, g.data, false);
       },
       "counting: Linear: w is null"},
      {"linear with an unknown dtype",
       [](Backend& b, G& g) {
         WeightView w = g.w;
         w.dtype = static_cast<DType>(99);
         return b.Linear(g.data, w, 1, g.data, false);
       },
       "w has unknown dtype 99"},
      {"linear with negative rows",
       [](Backend& b, G& g) { return b.Linear(g.data, g.w, -1, g.data, false); },
       "Linear: m must not be negative, got -1"},
      {"embedding into null", [](Backend& b, G& g) { return b.Embedding(g.ids, 2, g.w, nullptr); },
       "Embedding: y is null"},
      {"norm of zero width",
       [](Backend& b, G& g) { return b.RmsNorm(g.data, g.data, 1, 0, 1e-5f, g.data); },
       "RmsNorm: dim must be positive, got 0"},
      {"fused norm into a weight of another width",
       [](Backend& b, G& g) {
         return b.RmsNormLinear(g.data, g.data, 1, 5, 1e-5f, g.data, g.w, g.data);
       },
       "RmsNormLinear: w has 4 columns for rows of 5"},
      {"fused gate into a weight of another width",
       [](Backend& b, G& g) { return b.SiluMulLinear(g.data, 1, 3, g.data, g.w, g.data, true); },
       "SiluMulLinear: w has 4 columns for rows of 3"},
      {"add from null", [](Backend& b, G& g) { return b.Add(g.data, nullptr, 4); },
       "Add: y is null"},
      {"bias of negative rows", [](Backend& b, G& g) { return b.AddBias(g.data, g.data, -2, 4); },
       "AddBias: n must not be negative, got -2"},
      {"gate into null", [](Backend& b, G& g) { return b.SiluMul(g.data, 1, 4, nullptr); },
       "SiluMul: out is null"},
      {"shrink of a segment that ends before it starts",
       [](Backend& b, G& g) {
         LoraSegment s = g.segment;
         s.end = -1;
         return b.LoraShrink(g.data, 4, &s, 1, g.data);
       },
       "LoraShrink: segment 0 has rows [0, -1)"},
      {"shrink of rank 0",
       [](Backend& b, G& g) {
         LoraSegment s = g.segment;
         s.rank = 0;
         return b.LoraShrink(g.data, 4, &s, 1, g.data);
       },
       "segment 0 needs rank > 0 (got 0)"},
      {"expand into a row stride below its width",
       [](Backend& b, G& g) { return b.LoraExpand(g.data, &g.segment, 1, 8, g.data, 4); },
       "LoraExpand: ldy (4) must be >= out (8)"},
      {"merge of rank 0",
       [](Backend& b, G& g) { return b.MergeLora(g.w, g.data, g.data, 0, 1.0f, g.data); },
       "MergeLora: rank must be positive, got 0"},
      {"column scale of a row stride below its width",
       [](Backend& b, G& g) {
         const ColumnScaleSegment seg{0, 1, g.data};
         return b.ScaleColumns(g.data, 2, 4, &seg, 1);
       },
       "ScaleColumns: ldy (2) must be >= cols (4)"},
      {"column scale without a scale",
       [](Backend& b, G& g) {
         const ColumnScaleSegment seg{0, 1, nullptr};
         return b.ScaleColumns(g.data, 4, 4, &seg, 1);
       },
       "ScaleColumns: segment scale is null"},
      {"rope of an odd head_dim",
       [](Backend& b, G& g) {
         RopeParams rope = g.rope;
         rope.head_dim = 7;
         return b.Rope(g.data, 14, g.data, 7, g.ids, 1, 2, 1, rope);
       },
       "Rope: rope.head_dim must be positive and even, got 7"},
      {"rope without inverse frequencies",
       [](Backend& b, G& g) {
         RopeParams rope = g.rope;
         rope.inv_freq = nullptr;
         return b.Rope(g.data, 16, g.data, 8, g.ids, 1, 2, 1, rope);
       },
       "Rope: rope.inv_freq is null"},
      {"write kv with a row stride below a token",
       [](Backend& b, G& g) {
         return b.WriteKv(g.data, g.data, 15, g.batch, g.layout, g.data, g.data);
       },
       "WriteKv: kv_ld is 15, less than a row of 16 floats"},
      {"write kv into a Q8 cache",
       [](Backend& b, G& g) {
         KvLayout layout = g.layout;
         layout.dtype = DType::kQ8;
         return b.WriteKv(g.data, g.data, 16, g.batch, layout, g.data, g.data);
       },
       "WriteKv: layout.dtype 3 is not an element type"},
      {"attention with heads that do not group",
       [](Backend& b, G& g) {
         return b.PagedAttention(g.data, 24, g.batch, g.layout, 3, g.data, g.data, g.data);
       },
       "PagedAttention: num_heads (3) must be a multiple of layout.num_kv_heads (2)"},
      {"attention of tokens without sequences",
       [](Backend& b, G& g) {
         AttentionBatch batch = g.batch;
         batch.num_seqs = 0;
         return b.PagedAttention(g.data, 32, batch, g.layout, 4, g.data, g.data, g.data);
       },
       "PagedAttention: batch has 2 tokens but no sequences"},
      {"sampling over a vocabulary beyond int32",
       [](Backend& b, G& g) {
         return b.Sample(g.data, 1, int64_t{1} << 32, &g.sampling, &g.sampled);
       },
       "Sample: vocab must fit token ids (int32)"},
      {"sampling at a negative temperature",
       [](Backend& b, G& g) {
         SamplingRow row = g.sampling;
         row.temperature = -1.0f;
         return b.Sample(g.data, 1, 16, &row, &g.sampled);
       },
       "counting: Sample: "},
  };
}

TEST(BackendArgumentsTest, BadArgumentsAreRefusedBeforeTheImplementation) {
  for (const BadCall& bad : BadCalls()) {
    SCOPED_TRACE(bad.what);
    CountingBackend backend;
    GoodArguments args;
    const absl::Status status = bad.call(backend, args);
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(status.message(), HasSubstr(bad.message));
    EXPECT_EQ(backend.calls(), 0);
  }
}

TEST(BackendArgumentsTest, GoodCallsReachTheImplementationOnce) {
  CountingBackend backend;
  GoodArguments g;
  const std::vector<std::function<absl::Status()>> calls = {
      [&] { return backend.CopyToDevice(g.data, g.data, 4); },
      [&] { return backend.CopyToDeviceAsync(g.data, g.data, 4); },
      [&] { return backend.CopyToHost(g.data, g.data, 4); },
      [&] { return backend.CopyOnDevice(g.data, g.data, 4); },
      [&] { return backend.UploadWeight(g.data, g.data, DType::kBF16, 2, 2); },
      [&] { return backend.Linear(g.data, g.w, 2, g.data, true); },
      [&] { return backend.Embedding(g.ids, 2, g.w, g.data); },
      [&] { return backend.RmsNorm(g.data, g.data, 2, 4, 1e-5f, g.data); },
      [&] { return backend.RmsNormLinear(g.data, g.data, 2, 4, 1e-5f, g.data, g.w, g.data); },
      [&] { return backend.SiluMulLinear(g.data, 2, 4, g.data, g.w, g.data, false); },
      [&] { return backend.Add(g.data, g.data, 4); },
      [&] { return backend.AddBias(g.data, g.data, 2, 4); },
      [&] { return backend.SiluMul(g.data, 2, 4, g.data); },
      [&] { return backend.LoraShrink(g.data, 4, &g.segment, 1, g.data); },
      [&] { return backend.LoraExpand(g.data, &g.segment, 1, 8, g.data, 8); },
      [&] { return backend.MergeLora(g.w, g.data, g.data, 2, 1.0f, g.data); },
      [&] {
        const ColumnScaleSegment seg{0, 2, g.data};
        return backend.ScaleColumns(g.data, 4, 4, &seg, 1);
      },
      [&] { return backend.Rope(g.data, 16, g.data, 8, g.ids, 2, 2, 1, g.rope); },
      [&] { return backend.WriteKv(g.data, g.data, 16, g.batch, g.layout, g.data, g.data); },
      [&] {
        return backend.PagedAttention(g.data, 32, g.batch, g.layout, 4, g.data, g.data, g.data);
      },
      [&] { return backend.Sample(g.data, 1, 16, &g.sampling, &g.sampled); },
  };
  int expected = 0;
  for (const auto& call : calls) {
    EXPECT_THAT(call(), IsOk());
    EXPECT_EQ(backend.calls(), ++expected);
  }
}

// Nothing to do: null pointers are fine and the backend is not called.
TEST(BackendArgumentsTest, EmptyCallsReturnWithoutTheImplementation) {
  CountingBackend backend;
  GoodArguments g;
  AttentionBatch empty = g.batch;
  empty.num_tokens = 0;
  EXPECT_THAT(backend.CopyToDevice(nullptr, nullptr, 0), IsOk());
  EXPECT_THAT(backend.CopyToHost(nullptr, nullptr, 0), IsOk());
  EXPECT_THAT(backend.UploadWeight(nullptr, nullptr, DType::kF32, 0, 8), IsOk());
  EXPECT_THAT(backend.Linear(nullptr, g.w, 0, nullptr, false), IsOk());
  EXPECT_THAT(backend.Embedding(nullptr, 0, g.w, nullptr), IsOk());
  EXPECT_THAT(backend.RmsNormLinear(nullptr, nullptr, 0, 4, 1e-5f, nullptr, g.w, nullptr), IsOk());
  EXPECT_THAT(backend.Add(nullptr, nullptr, 0), IsOk());
  EXPECT_THAT(backend.Rope(nullptr, 16, nullptr, 8, nullptr, 0, 2, 1, g.rope), IsOk());
  EXPECT_THAT(backend.WriteKv(nullptr, nullptr, 16, empty, g.layout, nullptr, nullptr), IsOk());
  EXPECT_THAT(backend.Sample(nullptr, 0, 16, nullptr, nullptr), IsOk());
  EXPECT_EQ(backend.calls(), 0);
}

// A step graph records a LoRA call whose table is empty (the same step with
// segments replays it), so those reach the backend, with nothing else
// checked.
TEST(BackendArgumentsTest, EmptyLoraTablesReachTheImplementation) {
  CountingBackend backend;
  EXPECT_THAT(backend.LoraShrink(nullptr, 0, nullptr, 0, nullptr), IsOk());
  EXPECT_THAT(backend.LoraExpand(nullptr, nullptr, 0, 0, nullptr, 0), IsOk());
  EXPECT_EQ(backend.calls(), 2);
  EXPECT_THAT(backend.LoraShrink(nullptr, 0, nullptr, -1, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_EQ(backend.calls(), 2);
}

}  // namespace
}  // namespace loraserve::kernels
