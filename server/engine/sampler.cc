#include "server/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"

namespace loraserve::engine {
namespace {

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

int32_t ArgMax(absl::Span<const float> logits) {
  // First maximum, as torch.argmax picks it.
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// log_softmax's normaliser: max + log(sum(exp(x - max))), in double.
double LogSumExp(absl::Span<const float> logits) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  return max + std::log(sum);
}

std::vector<TokenLogprob> TopLogprobs(absl::Span<const float> logits, double log_z, int32_t n) {
  n = std::min<int32_t>(n, static_cast<int32_t>(logits.size()));
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<TokenLogprob> top;
  top.reserve(n);
  for (int32_t i = 0; i < n; ++i) {
    top.push_back({ids[i], static_cast<float>(logits[ids[i]] - log_z)});
  }
  return top;
}

// Draws from softmax(logits / temperature) restricted by top-k and top-p.
int32_t DrawFiltered(absl::Span<const float> logits, const SamplingParams& params, double u) {
  std::vector<int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  const bool use_top_k = params.top_k > 0 && params.top_k < static_cast<int32_t>(ids.size());
  const size_t keep = use_top_k ? params.top_k : ids.size();
  auto better = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), better);
  ids.resize(keep);

  const double inv_t = 1.0 / params.temperature;
  const double max = logits[ids[0]] * inv_t;
  std::vector<double> probs(ids.size());
  double total = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) {
    probs[i] = std::exp(logits[ids[i]] * inv_t - max);
    total += probs[i];
  }
  size_t n = ids.size();
  if (params.top_p < 1.0f) {
    // Smallest prefix (by probability) whose mass reaches top_p; never empty.
    double mass = 0.0;
    for (size_t i = 0; i < ids.size(); ++i) {
      mass += probs[i] / total;
      if (mass >= params.top_p) {
        n = i + 1;
        break;
      }
    }
    total = std::accumulate(probs.begin(), probs.begin() + n, 0.0);
  }
  double target = u * total;
  for (size_t i = 0; i < n; ++i) {
    target -= probs[i];
    if (target < 0.0) return ids[i];
  }
  return ids[n - 1];
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
    return absl::InvalidArgumentError(
        absl::StrCat("top_p must be in (0, 1], got ", params.top_p));
  }
  return absl::OkStatus();
}

SampledToken SampleToken(absl::Span<const float> logits, const SamplingParams& params,
                         int64_t step, int32_t num_top_logprobs) {
  SampledToken out;
  out.id = (params.temperature == 0.0f || params.top_k == 1)
               ? ArgMax(logits)
               : DrawFiltered(logits, params, CounterUniform(params.seed, step));
  const double log_z = LogSumExp(logits);
  out.logprob = static_cast<float>(logits[out.id] - log_z);
  if (num_top_logprobs > 0) out.top_logprobs = TopLogprobs(logits, log_z, num_top_logprobs);
  return out;
}

}  // namespace loraserve::engine
