// Decode steps padded to a few batch shapes, so that a backend that records
// step graphs (CUDA graphs) can launch one recording for many steps.
//
// A recorded graph replays fixed launches: the number of tokens, the width of
// the block table and every buffer address must be those it was captured
// with. A decode step (each sequence one new token, logits for each) is
// therefore padded to the next batch size of a short list and its block table
// to the next power of two. Padding tokens are sequences of one token at
// position 0 whose K and V are never written (kernels::kPaddingSlot) and
// whose logits are never read; they run on the base model, or on the merged
// adapter when the step uses merged weights, so they add no LoRA segment.
//
// Thread-safety: free functions over caller-owned data.
//
// Example:
//   if (std::optional<DecodeShape> shape = DecodeStepShape(in)) {
//     ForwardInput padded = PadDecodeStep(in, *shape);  // logits rows 0..n-1 are in's
//   }
#ifndef LORASERVE_SERVER_MODEL_DECODE_PADDING_H_
#define LORASERVE_SERVER_MODEL_DECODE_PADDING_H_

#include <cstdint>
#include <optional>

#include "server/model/llama_model.h"

namespace loraserve::model {

// Largest decode batch that is padded for a step graph; larger ones run
// without.
inline constexpr int32_t kMaxPaddedDecodeBatch = 256;

struct DecodeShape {
  int32_t batch = 0;       // sequences (= tokens) after padding
  int32_t max_blocks = 0;  // block table width after padding
};

// Batch sizes steps are padded to: 1, 2, 4, 8, then multiples of 8 (at most
// 12% padding past 64 requests, few distinct graphs).
int32_t PaddedDecodeBatch(int32_t num_seqs);

// The padded shape of `in`, or nullopt when `in` is not a decode step (a
// sequence with more than one token, logit rows other than every token in
// order) or has more than kMaxPaddedDecodeBatch sequences.
std::optional<DecodeShape> DecodeStepShape(const ForwardInput& in);

// `in` padded to `shape` (which must hold it): the real sequences first,
// unchanged but for their block-table rows widened with zeros.
ForwardInput PadDecodeStep(const ForwardInput& in, const DecodeShape& shape);

}  // namespace loraserve::model

#endif  // LORASERVE_SERVER_MODEL_DECODE_PADDING_H_
