// Next-token sampling from rows of logits: the types Backend::Sample takes and
// gives, and the host reference that defines what every backend must return.
//
// One row is sampled as follows (vLLM's and Hugging Face's usual pipeline,
// without penalties):
//  - Greedy (temperature 0 or top_k 1): the first maximum, as torch.argmax.
//  - Otherwise token ids are ordered by (logit descending, id ascending); the
//    first top_k are kept (0 = all); probabilities are
//    exp(logit / T - max / T) in double; top_p keeps the smallest prefix
//    whose normalised mass reaches top_p (never empty); the draw walks the
//    kept prefix subtracting probabilities from uniform * total and takes the
//    first token that takes it below 0 (the last kept one if rounding leaves
//    it at or above 0).
//  - logprob is that of the chosen token under the raw distribution,
//    logit - logsumexp(logits) in double (before temperature and filtering).
//  - top_logprobs lists the min(num_top_logprobs, vocab) most likely ids of
//    the raw distribution, best first, ties by lower id.
//
// The uniform draw comes from the caller (the engine derives it from the
// request's seed and step), so results never depend on what else shares the
// batch.
//
// Non-finite logits: a NaN logit is read as -infinity everywhere (it is never
// chosen while any other logit is larger, and its logprob is -inf), so that a
// broken row gives a defined token instead of undefined ordering. +0 and -0
// are the same logit (ties by id). Rows whose logits are all -inf (or NaN), or
// that hold +inf, have no meaningful distribution: the token is still a valid
// id, logprobs may be NaN.
//
// Thread-safety: free functions over caller-owned data.
//
// Example:
//   SamplingRow row{.temperature = 0.7f, .top_p = 0.9f, .uniform = u};
//   SampledToken t = SampleRow(logits.data(), vocab, row);
#ifndef LORASERVE_KERNELS_SAMPLING_H_
#define LORASERVE_KERNELS_SAMPLING_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace loraserve::kernels {

// How one row is sampled.
struct SamplingRow {
  float temperature = 1.0f;      // 0 = greedy
  int32_t top_k = 0;             // 0 = off
  float top_p = 1.0f;            // 1 = off
  double uniform = 0.0;          // this row's draw, in [0, 1)
  int32_t num_top_logprobs = 0;  // alternatives to report (0 = none)
};

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0.0f;
};

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;                    // of the chosen token
  std::vector<TokenLogprob> top_logprobs;  // the most likely alternatives, best first
};

// Checks the ranges of `params` (row `index` of a batch): temperature finite
// and >= 0, top_k >= 0, top_p in (0, 1], uniform in [0, 1),
// num_top_logprobs >= 0. The message names the row and the field.
absl::Status ValidateSamplingRow(const SamplingRow& params, int64_t index);

// The reference sampler (see the header comment); `vocab` >= 1.
SampledToken SampleRow(const float* logits,  // [vocab] host memory
                       int64_t vocab, const SamplingRow& params);

// True when (logit_a, id_a) comes before (logit_b, id_b) in the sampling
// order: logit descending (NaN as -inf, -0 as +0), then id ascending. A
// strict total order over distinct ids.
bool SamplingOrderBefore(float logit_a, int32_t id_a, float logit_b, int32_t id_b);

}  // namespace loraserve::kernels

#endif  // LORASERVE_KERNELS_SAMPLING_H_
