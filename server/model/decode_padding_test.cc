// Padding decode steps for step graphs: the shapes chosen, the padded input,
// and (on the CPU backend) that a padded step computes exactly what the
// unpadded one does and writes nothing for its padding.
#include "server/model/decode_padding.h"

#include <map>

#include "adapters/device_adapter.h"
#include "gtest/gtest.h"
#include "tests/support/forward_harness.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

TEST(DecodePaddingTest, BatchSizes) {
  const std::map<int32_t, int32_t> expected = {{1, 1},   {2, 2},   {3, 4},    {5, 8},
                                               {8, 8},   {9, 16},  {16, 16},  {17, 24},
                                               {64, 64}, {65, 72}, {256, 256}};
  for (const auto& [n, batch] : expected) EXPECT_EQ(PaddedDecodeBatch(n), batch) << n;
}

ForwardInput Decode(int32_t num_seqs, int32_t max_blocks) {
  ForwardInput in;
  in.max_blocks_per_seq = max_blocks;
  in.query_start.push_back(0);
  for (int32_t s = 0; s < num_seqs; ++s) {
    in.tokens.push_back(10 + s);
    in.positions.push_back(3 + s);
    in.slot_mapping.push_back(100 + s);
    in.logit_rows.push_back(s);
    in.query_start.push_back(s + 1);
    in.context_lens.push_back(4 + s);
    for (int32_t b = 0; b < max_blocks; ++b) in.block_tables.push_back(7 * s + b + 1);
  }
  return in;
}

TEST(DecodePaddingTest, OnlyDecodeStepsArePadded) {
  std::optional<DecodeShape> shape = DecodeStepShape(Decode(3, 3));
  ASSERT_TRUE(shape.has_value());
  EXPECT_EQ(shape->batch, 4);
  EXPECT_EQ(shape->max_blocks, 4);

  ForwardInput prefill = Decode(2, 1);  // the second sequence brings two tokens
  prefill.tokens.push_back(1);
  prefill.positions.push_back(5);
  prefill.slot_mapping.push_back(9);
  prefill.query_start.back() = 3;
  prefill.logit_rows = {1, 2};
  EXPECT_FALSE(DecodeStepShape(prefill).has_value());

  ForwardInput some_rows = Decode(3, 1);
  some_rows.logit_rows = {0, 2};
  EXPECT_FALSE(DecodeStepShape(some_rows).has_value());

  EXPECT_FALSE(DecodeStepShape(Decode(kMaxPaddedDecodeBatch + 1, 1)).has_value());
  EXPECT_TRUE(DecodeStepShape(Decode(kMaxPaddedDecodeBatch, 1)).has_value());
}

TEST(DecodePaddingTest, PaddingTokensWriteNothingAndNeedNoSegment) {
  const ForwardInput in = Decode(3, 3);
  const ForwardInput padded = PadDecodeStep(in, {.batch = 4, .max_blocks = 4});
  EXPECT_EQ(padded.tokens, (std::vector<int32_t>{10, 11, 12, 0}));
  EXPECT_EQ(padded.positions, (std::vector<int32_t>{3, 4, 5, 0}));
  EXPECT_EQ(padded.slot_mapping, (std::vector<int32_t>{100, 101, 102, kernels::kPaddingSlot}));
  EXPECT_EQ(padded.query_start, (std::vector<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_EQ(padded.context_lens, (std::vector<int32_t>{4, 5, 6, 1}));
  EXPECT_EQ(padded.logit_rows, (std::vector<int32_t>{0, 1, 2, 3}));
  EXPECT_EQ(padded.max_blocks_per_seq, 4);
  EXPECT_EQ(padded.block_tables,
            (std::vector<int32_t>{1, 2, 3, 0, 8, 9, 10, 0, 15, 16, 17, 0, 0, 0, 0, 0}));
  EXPECT_TRUE(padded.adapters.empty());  // all on the base, padding too

  ForwardInput with_adapter = in;
  const auto* adapter = reinterpret_cast<const adapters::DeviceAdapter*>(&in);  // identity only
  with_adapter.adapters = {{adapter, 1.0f}, {}, {adapter, 0.5f}};
  const ForwardInput padded_adapter = PadDecodeStep(with_adapter, {.batch = 8, .max_blocks = 4});
  ASSERT_EQ(padded_adapter.adapters.size(), 8u);
  EXPECT_TRUE(padded_adapter.adapters[2] == (AdapterChoice{adapter, 0.5f}));
  for (size_t i = 3; i < 8; ++i) EXPECT_TRUE(padded_adapter.adapters[i] == AdapterChoice{});
}

TEST(PaddedForwardTest, PaddedDecodeStepEqualsUnpadded) {
  std::unique_ptr<kernels::Backend> backend = std::move(*kernels::CreateCpuBackend({}));
  absl::StatusOr<test_support::SharedModel> shared =
      test_support::LoadSharedModel(backend.get(), {"ocean", "attn-r8"});
  ASSERT_OK(shared);
  LlamaModel* model = shared->model.get();
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 72, 305, 41}, {1, 9, 18}, {1, 400, 2, 33, 87}};
  const std::vector<AdapterChoice> choices = {
      {shared->adapters[0].get(), 1.0f}, {}, {shared->adapters[1].get(), 0.5f}};
  const int64_t vocab = model->config().vocab_size;
  // Two caches with the same prompts: one runs padded decode steps, the other not.
  std::vector<std::unique_ptr<test_support::PagedTestCache>> caches;
  for (int i = 0; i < 2; ++i) {
    caches.push_back(
        std::make_unique<test_support::PagedTestCache>(backend.get(), model->kv_shape(), 3, 40));
    ForwardInput prefill = test_support::PrefillAll(prompts, *caches.back());
    prefill.adapters = choices;
    std::vector<float> logits;
    ASSERT_OK(model->Forward(prefill, caches.back()->view(), &logits));
  }
  std::vector<int32_t> positions = {4, 3, 5};
  for (int step = 0; step < 3; ++step) {
    ForwardInput in =
        test_support::DecodeOne({20 + step, 30 + step, 40 + step}, positions, *caches[0]);
    in.adapters = choices;
    std::optional<DecodeShape> shape = DecodeStepShape(in);
    ASSERT_TRUE(shape.has_value());
    const ForwardInput padded = PadDecodeStep(in, *shape);
    std::vector<float> plain, padded_logits;
    ASSERT_OK(model->Forward(in, caches[0]->view(), &plain));
    ASSERT_OK(model->Forward(padded, caches[1]->view(), &padded_logits));
    ASSERT_EQ(padded_logits.size(), static_cast<size_t>(shape->batch * vocab));
    // The CPU GEMMs are batch-invariant: the real rows match exactly, and
    // the next step (which reads the cache the padded step wrote) too.
    EXPECT_EQ(test_support::MaxAbsDiff(plain.data(), padded_logits.data(), plain.size()), 0.0f)
        << "step " << step;
    for (int32_t& p : positions) ++p;
  }
}

}  // namespace
}  // namespace loraserve::model
