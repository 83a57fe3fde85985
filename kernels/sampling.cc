#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"

namespace loraserve::kernels {
namespace {

// The logit as the sampler reads it: NaN is -inf, so that the order below is
// a strict total order and a NaN can never win.
float Canonical(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

// Uint32 whose unsigned order is the float order of Canonical(v), with -0 and
// +0 equal. kernels/cuda/sampling.cu computes the same key on the device.
uint32_t OrderBits(float v) {
  v = Canonical(v);
  if (v == 0.0f) v = 0.0f;  // -0 -> +0
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
}

int32_t ArgMax(const float* logits, int64_t vocab) {
  // First maximum, as torch.argmax picks it.
  int32_t best = 0;
  for (int64_t i = 1; i < vocab; ++i) {
    if (Canonical(logits[i]) > Canonical(logits[best])) best = static_cast<int32_t>(i);
  }
  return best;
}

// log_softmax's normaliser: max + log(sum(exp(x - max))), in double.
double LogSumExp(const float* logits, int64_t vocab) {
  const float max = Canonical(logits[ArgMax(logits, vocab)]);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    sum += std::exp(static_cast<double>(Canonical(logits[i])) - max);
  }
  return max + std::log(sum);
}

// Ids in sampling order, the first `n` of them sorted.
std::vector<int32_t> BestIds(const float* logits, int64_t vocab, int64_t n) {
  std::vector<int32_t> ids(vocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + n, ids.end(), [&](int32_t a, int32_t b) {
    return SamplingOrderBefore(logits[a], a, logits[b], b);
  });
  ids.resize(n);
  return ids;
}

std::vector<TokenLogprob> TopLogprobs(const float* logits, int64_t vocab, double log_z, int32_t n) {
  const std::vector<int32_t> ids = BestIds(logits, vocab, std::min<int64_t>(n, vocab));
  std::vector<TokenLogprob> top;
  top.reserve(ids.size());
  for (int32_t id : ids) top.push_back({id, static_cast<float>(Canonical(logits[id]) - log_z)});
  return top;
}

// Draws from softmax(logits / temperature) restricted by top-k and top-p.
int32_t DrawFiltered(const float* logits, int64_t vocab, const SamplingRow& params) {
  const bool use_top_k = params.top_k > 0 && params.top_k < vocab;
  const std::vector<int32_t> ids = BestIds(logits, vocab, use_top_k ? params.top_k : vocab);

  const double inv_t = 1.0 / params.temperature;
  const double max = Canonical(logits[ids[0]]) * inv_t;
  std::vector<double> probs(ids.size());
  double total = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) {
    probs[i] = std::exp(Canonical(logits[ids[i]]) * inv_t - max);
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
  double target = params.uniform * total;
  for (size_t i = 0; i < n; ++i) {
    target -= probs[i];
    if (target < 0.0) return ids[i];
  }
  return ids[n - 1];
}

}  // namespace

bool SamplingOrderBefore(float logit_a, int32_t id_a, float logit_b, int32_t id_b) {
  const uint32_t a = OrderBits(logit_a), b = OrderBits(logit_b);
  return a > b || (a == b && id_a < id_b);
}

absl::Status ValidateSamplingRow(const SamplingRow& params, int64_t index) {
  if (!(params.temperature >= 0.0f) || !std::isfinite(params.temperature)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling row ", index, ": temperature must be a finite number >= 0, got ",
                     params.temperature));
  }
  if (params.top_k < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling row ", index, ": top_k must be >= 0 (0 disables it), got ", params.top_k));
  }
  if (!(params.top_p > 0.0f && params.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling row ", index, ": top_p must be in (0, 1], got ", params.top_p));
  }
  if (!(params.uniform >= 0.0 && params.uniform < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling row ", index, ": uniform must be in [0, 1), got ", params.uniform));
  }
  if (params.num_top_logprobs < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling row ", index, ": num_top_logprobs must be >= 0, got ", params.num_top_logprobs));
  }
  return absl::OkStatus();
}

SampledToken SampleRow(const float* logits, int64_t vocab, const SamplingRow& params) {
  SampledToken out;
  out.id = (params.temperature == 0.0f || params.top_k == 1) ? ArgMax(logits, vocab)
                                                             : DrawFiltered(logits, vocab, params);
  const double log_z = LogSumExp(logits, vocab);
  out.logprob = static_cast<float>(Canonical(logits[out.id]) - log_z);
  if (params.num_top_logprobs > 0) {
    out.top_logprobs = TopLogprobs(logits, vocab, log_z, params.num_top_logprobs);
  }
  return out;
}

}  // namespace loraserve::kernels
