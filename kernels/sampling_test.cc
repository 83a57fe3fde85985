// The reference sampler (kernels/sampling.h) on hand-made rows whose answers
// can be worked out on paper, and CpuBackend::Sample against it.
#include "kernels/sampling.h"

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

SampledToken Sample(const std::vector<float>& logits, const SamplingRow& row) {
  return SampleRow(logits.data(), static_cast<int64_t>(logits.size()), row);
}

double LogZ(const std::vector<float>& logits) {
  double z = 0.0;
  for (float v : logits) z += std::exp(static_cast<double>(v));
  return std::log(z);
}

// Logits whose softmax is `probs` (which sum to 1).
std::vector<float> FromProbs(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(static_cast<float>(std::log(p)));
  return logits;
}

TEST(SamplingTest, GreedyPicksFirstMaximum) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f};
  EXPECT_EQ(Sample(logits, {.temperature = 0.0f}).id, 1);
  // top_k 1 is greedy whatever the temperature and draw.
  EXPECT_EQ(Sample(logits, {.temperature = 3.0f, .top_k = 1, .uniform = 0.99}).id, 1);
}

TEST(SamplingTest, SignedZerosTieByLowerId) {
  EXPECT_EQ(Sample({-1.0f, -0.0f, 0.0f}, {.temperature = 0.0f}).id, 1);
  EXPECT_EQ(Sample({-1.0f, 0.0f, -0.0f}, {.temperature = 0.0f}).id, 1);
  EXPECT_TRUE(SamplingOrderBefore(-0.0f, 1, 0.0f, 2));
  EXPECT_TRUE(SamplingOrderBefore(0.0f, 1, -0.0f, 2));
}

TEST(SamplingTest, DrawWalksTheSortedDistribution) {
  // Sorted: id 2 (0.5), id 0 (0.3), id 1 (0.2).
  const std::vector<float> logits = FromProbs({0.3, 0.2, 0.5});
  EXPECT_EQ(Sample(logits, {.uniform = 0.0}).id, 2);
  EXPECT_EQ(Sample(logits, {.uniform = 0.49}).id, 2);
  EXPECT_EQ(Sample(logits, {.uniform = 0.51}).id, 0);
  EXPECT_EQ(Sample(logits, {.uniform = 0.79}).id, 0);
  EXPECT_EQ(Sample(logits, {.uniform = 0.81}).id, 1);
  EXPECT_EQ(Sample(logits, {.uniform = std::nextafter(1.0, 0.0)}).id, 1);
}

TEST(SamplingTest, TiesInTheDrawGoToTheLowerIdFirst) {
  // Two equal logits split the mass; the lower id comes first in the walk.
  const std::vector<float> logits = {0.0f, 1.0f, 1.0f};
  EXPECT_EQ(Sample(logits, {.uniform = 0.01}).id, 1);
  const std::vector<float> swapped = {1.0f, 1.0f, 0.0f};
  EXPECT_EQ(Sample(swapped, {.uniform = 0.01}).id, 0);
}

TEST(SamplingTest, TopKKeepsTheBest) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f};
  for (double u = 0.0; u < 1.0; u += 0.01) {
    const int32_t id = Sample(logits, {.temperature = 5.0f, .top_k = 2, .uniform = u}).id;
    EXPECT_TRUE(id == 1 || id == 3) << "u=" << u << " id=" << id;
  }
  // The highest draw takes the last kept token (the tie at 2.0 goes to id 3).
  EXPECT_EQ(Sample(logits, {.top_k = 2, .uniform = 0.999}).id, 3);
  // top_k >= vocab keeps everything.
  EXPECT_EQ(Sample(logits, {.top_k = 5, .uniform = 0.9999}).id, 2);
  EXPECT_EQ(Sample(logits, {.top_k = 100, .uniform = 0.9999}).id, 2);
}

TEST(SamplingTest, TopPKeepsSmallestNucleus) {
  // Sorted: 0.5 (id 2), 0.3 (id 0), 0.15 (id 3), 0.05 (id 1).
  const std::vector<float> logits = FromProbs({0.3, 0.05, 0.5, 0.15});
  // 0.5 alone reaches 0.4: only id 2 is left.
  for (double u : {0.0, 0.5, 0.999}) EXPECT_EQ(Sample(logits, {.top_p = 0.4f, .uniform = u}).id, 2);
  // 0.7 needs two: the draw renormalises over 0.8.
  EXPECT_EQ(Sample(logits, {.top_p = 0.7f, .uniform = 0.6}).id, 2);   // 0.48 < 0.5
  EXPECT_EQ(Sample(logits, {.top_p = 0.7f, .uniform = 0.65}).id, 0);  // 0.52 > 0.5
  EXPECT_EQ(Sample(logits, {.top_p = 0.7f, .uniform = 0.999}).id, 0);
  // 0.9 needs three.
  EXPECT_EQ(Sample(logits, {.top_p = 0.9f, .uniform = 0.999}).id, 3);
}

TEST(SamplingTest, TopKThenTopPThenTemperature) {
  // top_k 3 keeps 0.5, 0.3, 0.15 (mass 0.95); top_p 0.8 of that needs
  // 0.76: two tokens. Temperature 1 keeps the probabilities.
  const std::vector<float> logits = FromProbs({0.3, 0.05, 0.5, 0.15});
  EXPECT_EQ(Sample(logits, {.top_k = 3, .top_p = 0.8f, .uniform = 0.999}).id, 0);
  EXPECT_EQ(Sample(logits, {.top_k = 3, .top_p = 0.9f, .uniform = 0.999}).id, 3);
  // A high temperature flattens: (0.5, 0.3) at T = 1000 are nearly even, so
  // u = 0.55 falls on the second.
  EXPECT_EQ(Sample(logits, {.temperature = 1000.0f, .top_k = 2, .uniform = 0.55}).id, 0);
  // A low one sharpens: almost all mass on the best.
  EXPECT_EQ(Sample(logits, {.temperature = 0.01f, .uniform = 0.999}).id, 2);
}

TEST(SamplingTest, LogprobsAreRawLogSoftmax) {
  const std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f};
  const double z = LogZ(logits);
  // Temperature and filters change the draw, never the reported logprobs.
  const SampledToken t =
      Sample(logits, {.temperature = 0.3f, .top_k = 3, .top_p = 0.5f, .num_top_logprobs = 3});
  EXPECT_NEAR(t.logprob, logits[t.id] - z, 1e-6);
  ASSERT_EQ(t.top_logprobs.size(), 3u);
  EXPECT_EQ(t.top_logprobs[0].id, 1);
  EXPECT_EQ(t.top_logprobs[1].id, 3);
  EXPECT_EQ(t.top_logprobs[2].id, 4);
  EXPECT_NEAR(t.top_logprobs[0].logprob, 2.0 - z, 1e-6);
  EXPECT_NEAR(t.top_logprobs[2].logprob, 1.5 - z, 1e-6);
}

TEST(SamplingTest, TopLogprobsAreOrderedBestFirstTiesByLowerId) {
  const std::vector<float> logits = {1.0f, 3.0f, 1.0f, 3.0f, 2.0f, 1.0f};
  const SampledToken t = Sample(logits, {.temperature = 0.0f, .num_top_logprobs = 5});
  const std::vector<int32_t> expected = {1, 3, 4, 0, 2};
  ASSERT_EQ(t.top_logprobs.size(), expected.size());
  for (size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(t.top_logprobs[i].id, expected[i]) << i;
  // More than the vocabulary: all of it.
  EXPECT_EQ(Sample(logits, {.temperature = 0.0f, .num_top_logprobs = 50}).top_logprobs.size(), 6u);
  EXPECT_TRUE(Sample(logits, {.temperature = 0.0f}).top_logprobs.empty());
}

TEST(SamplingTest, VocabularyOfOne) {
  const std::vector<float> logits = {-3.0f};
  for (const SamplingRow& row :
       {SamplingRow{.temperature = 0.0f, .num_top_logprobs = 2},
        SamplingRow{.top_k = 5, .top_p = 0.1f, .uniform = 0.999, .num_top_logprobs = 2}}) {
    const SampledToken t = Sample(logits, row);
    EXPECT_EQ(t.id, 0);
    EXPECT_EQ(t.logprob, 0.0f);
    ASSERT_EQ(t.top_logprobs.size(), 1u);
    EXPECT_EQ(t.top_logprobs[0].id, 0);
  }
}

TEST(SamplingTest, NaNReadsAsMinusInfinity) {
  const std::vector<float> logits = {kNaN, 1.0f, kNaN, 0.0f};
  EXPECT_EQ(Sample(logits, {.temperature = 0.0f}).id, 1);
  for (double u : {0.0, 0.5, 0.999999}) {
    const SampledToken t = Sample(logits, {.uniform = u, .num_top_logprobs = 4});
    EXPECT_TRUE(t.id == 1 || t.id == 3) << t.id;
    EXPECT_TRUE(std::isfinite(t.logprob));
    ASSERT_EQ(t.top_logprobs.size(), 4u);
    EXPECT_EQ(t.top_logprobs[2].id, 0);
    EXPECT_EQ(t.top_logprobs[3].id, 2);
    EXPECT_EQ(t.top_logprobs[3].logprob, -kInf);
  }
  // Nothing but NaN: a valid id, no crash.
  const SampledToken t = Sample({kNaN, kNaN}, {.uniform = 0.3, .num_top_logprobs = 1});
  EXPECT_TRUE(t.id == 0 || t.id == 1);
}

TEST(SamplingTest, ValidationNamesRowAndField) {
  const auto message = [](const SamplingRow& row) {
    return std::string(ValidateSamplingRow(row, 7).message());
  };
  EXPECT_OK(ValidateSamplingRow({}, 0));
  EXPECT_NE(message({.temperature = -1.0f}).find("temperature"), std::string::npos);
  EXPECT_NE(message({.temperature = kInf}).find("temperature"), std::string::npos);
  EXPECT_NE(message({.top_k = -1}).find("top_k"), std::string::npos);
  EXPECT_NE(message({.top_p = 0.0f}).find("top_p"), std::string::npos);
  EXPECT_NE(message({.top_p = kNaN}).find("top_p"), std::string::npos);
  EXPECT_NE(message({.uniform = 1.0}).find("uniform"), std::string::npos);
  EXPECT_NE(message({.num_top_logprobs = -1}).find("num_top_logprobs"), std::string::npos);
  EXPECT_NE(message({.top_k = -1}).find("row 7"), std::string::npos);
}

TEST(CpuSampleTest, MatchesTheReferenceRowByRow) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = 2});
  ASSERT_OK(backend);
  const int64_t rows = 6, vocab = 1000;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> host(rows * vocab);
  for (float& v : host) v = normal(rng);
  const std::vector<SamplingRow> params = {
      {.temperature = 0.0f, .num_top_logprobs = 5},
      {.temperature = 0.8f, .uniform = 0.3},
      {.temperature = 1.0f, .top_k = 40, .uniform = 0.999, .num_top_logprobs = 3},
      {.temperature = 1.2f, .top_p = 0.9f, .uniform = 0.0},
      {.temperature = 0.7f, .top_k = 50, .top_p = 0.95f, .uniform = 0.5, .num_top_logprobs = 20},
      {.temperature = 1.0f, .top_k = 1, .uniform = 0.7}};
  absl::StatusOr<DeviceBuffer> logits = (*backend)->Allocate(host.size() * sizeof(float));
  ASSERT_OK(logits);
  ASSERT_OK((*backend)->CopyToDevice(logits->data(), host.data(), host.size() * 4));
  std::vector<SampledToken> out(rows);
  ASSERT_OK((*backend)->Sample(logits->as<float>(), rows, vocab, params.data(), out.data()));
  for (int64_t r = 0; r < rows; ++r) {
    SCOPED_TRACE(r);
    const SampledToken want = SampleRow(host.data() + r * vocab, vocab, params[r]);
    EXPECT_EQ(out[r].id, want.id);
    EXPECT_EQ(out[r].logprob, want.logprob);
    ASSERT_EQ(out[r].top_logprobs.size(), want.top_logprobs.size());
    for (size_t i = 0; i < want.top_logprobs.size(); ++i) {
      EXPECT_EQ(out[r].top_logprobs[i].id, want.top_logprobs[i].id);
    }
  }
}

TEST(CpuSampleTest, BadArgumentsAreNamed) {
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateCpuBackend({.num_threads = 1});
  ASSERT_OK(backend);
  const std::vector<float> logits = {1.0f, 2.0f};
  std::vector<SamplingRow> params = {{}, {.top_p = 2.0f}};
  std::vector<SampledToken> out(2);
  absl::Status status = (*backend)->Sample(logits.data(), 1, 0, params.data(), out.data());
  EXPECT_NE(status.message().find("vocab"), std::string::npos) << status;
  status = (*backend)->Sample(logits.data(), 2, 1, params.data(), out.data());
  EXPECT_NE(status.message().find("row 1: top_p"), std::string::npos) << status;
  status = (*backend)->Sample(logits.data(), 1, 2, nullptr, out.data());
  EXPECT_NE(status.message().find("params"), std::string::npos) << status;
  EXPECT_OK((*backend)->Sample(nullptr, 0, 2, nullptr, nullptr));
}

}  // namespace
}  // namespace loraserve::kernels
