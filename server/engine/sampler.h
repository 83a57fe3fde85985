// Turns one row of logits into the next token, as a request's sampling
// parameters say: greedy, temperature, top-k, top-p, with a per-request seed.
//
// Randomness is counter-based: the uniform draw for the n-th generated token
// of a request is a hash of (seed, n). The same seed therefore gives the same
// tokens whatever else shares the batch, and a preempted request that is
// recomputed continues exactly where it was.
//
// Log-probabilities are those of the model's raw distribution
// (log_softmax(logits), before temperature and filtering), as vLLM reports
// them by default.
//
// The sampling rules themselves live in kernels/sampling.h (SampleRow, the
// reference every backend's Sample matches); this file adds the request-level
// parameters, their validation and the counter-based draw.
//
// Thread-safety: free functions over caller-owned data.
//
// Example:
//   SamplingParams params{.temperature = 0.7f, .top_p = 0.9f, .seed = 42};
//   SampledToken t = SampleToken(logits, params, step, 5);
#ifndef LORASERVE_SERVER_ENGINE_SAMPLER_H_
#define LORASERVE_SERVER_ENGINE_SAMPLER_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/sampling.h"

namespace loraserve::engine {

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
};

// Checks ranges; the message names the field and the accepted range.
absl::Status ValidateSamplingParams(const SamplingParams& params);

// The kernels layer defines what a sampled token is (kernels/sampling.h).
using TokenLogprob = kernels::TokenLogprob;
using SampledToken = kernels::SampledToken;

// The backend's parameters for one row: `params` with the uniform draw of
// (params.seed, step).
kernels::SamplingRow ToSamplingRow(const SamplingParams& params, int64_t step,
                                   int32_t num_top_logprobs);

// `step` is the index of the token being generated within its request.
// `num_top_logprobs` alternatives are reported (0 for none). Runs the host
// reference (kernels::SampleRow); the engine samples on its backend instead.
SampledToken SampleToken(absl::Span<const float> logits,  // [vocab]
                         const SamplingParams& params, int64_t step, int32_t num_top_logprobs);

// Uniform double in [0, 1) for (seed, step); exposed for tests.
double CounterUniform(uint64_t seed, int64_t step);

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_SAMPLER_H_
