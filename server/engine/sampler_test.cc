#include "server/engine/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::engine {
namespace {

std::vector<float> Logits() { return {0.5f, 2.0f, -1.0f, 2.0f, 1.5f}; }

TEST(SamplerTest, GreedyPicksFirstMaximum) {
  SampledToken t = SampleToken(Logits(), {.temperature = 0.0f}, 0, 0);
  EXPECT_EQ(t.id, 1);
}

TEST(SamplerTest, LogprobsAreRawLogSoftmax) {
  const std::vector<float> logits = Logits();
  double z = 0;
  for (float v : logits) z += std::exp(v);
  SampledToken t = SampleToken(logits, {.temperature = 0.0f}, 0, 3);
  EXPECT_NEAR(t.logprob, 2.0 - std::log(z), 1e-6);
  ASSERT_EQ(t.top_logprobs.size(), 3u);
  EXPECT_EQ(t.top_logprobs[0].id, 1);
  EXPECT_EQ(t.top_logprobs[1].id, 3);
  EXPECT_EQ(t.top_logprobs[2].id, 4);
  EXPECT_NEAR(t.top_logprobs[2].logprob, 1.5 - std::log(z), 1e-6);
}

TEST(SamplerTest, SameSeedSameTokens) {
  const SamplingParams params{.temperature = 1.0f, .seed = 1234};
  for (int step = 0; step < 50; ++step) {
    EXPECT_EQ(SampleToken(Logits(), params, step, 0).id, SampleToken(Logits(), params, step, 0).id);
  }
}

TEST(SamplerTest, TopKRestrictsChoices) {
  const SamplingParams params{.temperature = 5.0f, .top_k = 2, .seed = 7};
  for (int step = 0; step < 200; ++step) {
    const int32_t id = SampleToken(Logits(), params, step, 0).id;
    EXPECT_TRUE(id == 1 || id == 3) << id;
  }
}

TEST(SamplerTest, TopPKeepsSmallestNucleus) {
  // probabilities ~ [0.9, 0.05, 0.05]: top_p 0.5 keeps only the first.
  const std::vector<float> logits = {std::log(0.9f), std::log(0.05f), std::log(0.05f)};
  const SamplingParams params{.temperature = 1.0f, .top_p = 0.5f, .seed = 3};
  for (int step = 0; step < 100; ++step) EXPECT_EQ(SampleToken(logits, params, step, 0).id, 0);
}

TEST(SamplerTest, FrequenciesFollowTheDistribution) {
  const std::vector<float> logits = {std::log(0.7f), std::log(0.2f), std::log(0.1f)};
  std::map<int32_t, int> counts;
  const int n = 20000;
  for (int step = 0; step < n; ++step) {
    ++counts[SampleToken(logits, {.temperature = 1.0f, .seed = 99}, step, 0).id];
  }
  EXPECT_NEAR(counts[0] / double(n), 0.7, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.2, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.1, 0.02);
}

TEST(SamplerTest, ValidationNamesTheField) {
  EXPECT_NE(ValidateSamplingParams({.temperature = -1.0f}).message().find("temperature"),
            std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.top_k = -2}).message().find("top_k"), std::string::npos);
  EXPECT_NE(ValidateSamplingParams({.top_p = 0.0f}).message().find("top_p"), std::string::npos);
  EXPECT_OK(ValidateSamplingParams({}));
}

TEST(SamplerTest, CounterUniformInUnitInterval) {
  for (int step = 0; step < 1000; ++step) {
    const double u = CounterUniform(42, step);
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
  }
  EXPECT_NE(CounterUniform(1, 0), CounterUniform(2, 0));
}

}  // namespace
}  // namespace loraserve::engine
