#include "server/model/decode_padding.h"

#include <algorithm>

#include "kernels/backend.h"

namespace loraserve::model {

int32_t PaddedDecodeBatch(int32_t num_seqs) {
  if (num_seqs <= 8) {
    int32_t batch = 1;
    while (batch < num_seqs) batch *= 2;
    return batch;
  }
  return (num_seqs + 7) / 8 * 8;
}

std::optional<DecodeShape> DecodeStepShape(const ForwardInput& in) {
  const size_t n = in.context_lens.size();
  if (n == 0 || n > static_cast<size_t>(kMaxPaddedDecodeBatch) || in.tokens.size() != n ||
      in.logit_rows.size() != n || in.query_start.size() != n + 1) {
    return std::nullopt;
  }
  for (size_t i = 0; i < n; ++i) {
    if (in.query_start[i] != static_cast<int32_t>(i) ||
        in.logit_rows[i] != static_cast<int32_t>(i)) {
      return std::nullopt;
    }
  }
  DecodeShape shape;
  shape.batch = PaddedDecodeBatch(static_cast<int32_t>(n));
  shape.max_blocks = 1;
  while (shape.max_blocks < in.max_blocks_per_seq) shape.max_blocks *= 2;
  return shape;
}

ForwardInput PadDecodeStep(const ForwardInput& in, const DecodeShape& shape) {
  const int32_t n = static_cast<int32_t>(in.context_lens.size());
  ForwardInput out;
  out.tokens = in.tokens;
  out.tokens.resize(shape.batch, 0);
  out.positions = in.positions;
  out.positions.resize(shape.batch, 0);
  out.query_start.resize(shape.batch + 1);
  for (int32_t i = 0; i <= shape.batch; ++i) out.query_start[i] = i;
  out.context_lens = in.context_lens;
  out.context_lens.resize(shape.batch, 1);  // a padding token sees only itself
  out.max_blocks_per_seq = shape.max_blocks;
  out.block_tables.assign(static_cast<size_t>(shape.batch) * shape.max_blocks, 0);
  for (int32_t s = 0; s < n; ++s) {
    std::copy_n(in.block_tables.begin() + static_cast<size_t>(s) * in.max_blocks_per_seq,
                in.max_blocks_per_seq,
                out.block_tables.begin() + static_cast<size_t>(s) * shape.max_blocks);
  }
  out.slot_mapping = in.slot_mapping;
  out.slot_mapping.resize(shape.batch, kernels::kPaddingSlot);
  out.logit_rows.resize(shape.batch);
  for (int32_t i = 0; i < shape.batch; ++i) out.logit_rows[i] = i;
  out.merged = in.merged;
  // Padding runs on whatever the weights are, so it needs no LoRA segment.
  const AdapterChoice padding = in.merged != nullptr ? in.merged->choice() : AdapterChoice{};
  if (!in.adapters.empty() || !(padding == AdapterChoice{})) {
    out.adapters = in.adapters;
    out.adapters.resize(n);  // empty: every real sequence on the base
    out.adapters.resize(shape.batch, padding);
  }
  return out;
}

}  // namespace loraserve::model
