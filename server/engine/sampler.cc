#include "server/engine/sampler.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace loraserve::engine {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

double CounterUniform(uint64_t seed, int64_t step) {
  const uint64_t bits = SplitMix64(SplitMix64(seed) ^ static_cast<uint64_t>(step));
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

absl::Status ValidateSamplingParams(const SamplingParams& params) {
  if (!(params.temperature >= 0.0f) || !std::isfinite(params.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", params.temperature));
  }
  if (params.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 disables it), got ", params.top_k));
  }
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", params.top_p));
  }
  return absl::OkStatus();
}

kernels::SamplingRow ToSamplingRow(const SamplingParams& params, int64_t step,
                                   int32_t num_top_logprobs) {
  return {.temperature = params.temperature,
          .top_k = params.top_k,
          .top_p = params.top_p,
          .uniform = CounterUniform(params.seed, step),
          .num_top_logprobs = num_top_logprobs};
}

SampledToken SampleToken(absl::Span<const float> logits, const SamplingParams& params, int64_t step,
                         int32_t num_top_logprobs) {
  return kernels::SampleRow(logits.data(), static_cast<int64_t>(logits.size()),
                            ToSamplingRow(params, step, num_top_logprobs));
}

}  // namespace loraserve::engine
