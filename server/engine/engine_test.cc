#include "server/engine/engine.h"

#include <map>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::engine {
namespace {

using ::testing::HasSubstr;

// A model with its cache and tokenizer; requests run to completion.
class EngineFixture {
 public:
  explicit EngineFixture(const std::string& model_dir, int64_t kv_bytes = 64 << 20,
                         EngineOptions options = {}) {
    backend_ = std::move(*kernels::CreateCpuBackend({}));
    auto model = model::LlamaModel::Load(backend_.get(), model_dir, {});
    EXPECT_OK(model);
    model_ = std::move(*model);
    auto tokenizer = model::Tokenizer::Load(model_dir);
    if (tokenizer.ok()) tokenizer_ = std::move(*tokenizer);
    auto cache = KvCache::Create(backend_.get(), model_->kv_shape(), 16, kv_bytes);
    EXPECT_OK(cache);
    cache_ = std::move(*cache);
    engine_ = std::make_unique<Engine>(model_.get(), tokenizer_.get(), cache_.get(), nullptr,
                                       options);
  }

  struct Result {
    std::vector<int32_t> ids;
    std::string text;
    FinishReason finish = FinishReason::kNone;
    std::vector<TokenEvent> events;
  };

  // Adds every request, steps until all finish, returns results in order.
  std::vector<Result> Run(const std::vector<GenerationRequest>& requests) {
    std::vector<Result> results(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      auto id = engine_->Add(requests[i], [&results, i](const TokenEvent& e) {
        results[i].ids.push_back(e.token_id);
        results[i].text += e.text;
        results[i].finish = e.finish;
        results[i].events.push_back(e);
      });
      EXPECT_OK(id);
    }
    while (engine_->HasWork()) {
      absl::Status s = engine_->Step();
      EXPECT_OK(s);
      if (!s.ok()) break;
    }
    return results;
  }

  Engine& engine() { return *engine_; }
  KvCache& cache() { return *cache_; }
  const model::Tokenizer& tokenizer() { return *tokenizer_; }

 private:
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<model::LlamaModel> model_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<Engine> engine_;
};

GenerationRequest Greedy(std::vector<int32_t> prompt, int32_t max_tokens) {
  GenerationRequest r;
  r.prompt_ids = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  return r;
}

TEST(EngineGoldenTest, GreedyTokensMatchTransformersAloneAndBatched) {
  auto cases = test_support::LoadModelCases();
  ASSERT_OK(cases);
  for (const test_support::GoldenCase& c : *cases) {
    SCOPED_TRACE(c.name);
    EngineFixture fixture(c.model_dir);
    std::vector<GenerationRequest> requests;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      requests.push_back(Greedy(p.ids, static_cast<int32_t>(p.greedy.size())));
    }
    // Alone.
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(fixture.Run({requests[i]})[0].ids, c.prompts[i].greedy) << "prompt " << i;
    }
    // All together in one batch.
    std::vector<EngineFixture::Result> results = fixture.Run(requests);
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(results[i].ids, c.prompts[i].greedy) << "batched prompt " << i;
      EXPECT_EQ(results[i].finish, FinishReason::kLength);
    }
    EXPECT_EQ(fixture.cache().free_blocks(), fixture.cache().num_blocks());
  }
}

const std::string& SharedModel() {
  static const std::string dir = std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k";
  return dir;
}

// decode(prompt + generated) minus decode(prompt), vLLM's definition.
std::string Continuation(const model::Tokenizer& tokenizer, const std::vector<int32_t>& prompt,
                         const std::vector<int32_t>& generated) {
  std::vector<int32_t> all = prompt;
  all.insert(all.end(), generated.begin(), generated.end());
  return tokenizer.Decode(all, true).substr(tokenizer.Decode(prompt, true).size());
}

TEST(EngineTest, EmptyPromptContinuationReadsAsTheModelCard) {
  EngineFixture fixture(SharedModel());
  auto prompt = fixture.tokenizer().Encode("", true);
  ASSERT_OK(prompt);
  auto result = fixture.Run({Greedy(*prompt, 20)})[0];
  // The model card: `"Echoes of vectors unfold, a gentle hum of precision, ...`.
  EXPECT_TRUE(absl::StartsWith(result.text, "\"Echoes of vectors unfold")) << result.text;
}

TEST(EngineTest, TextIsDecodeOfAllMinusDecodeOfPrompt) {
  EngineFixture fixture(SharedModel());
  auto prompt = fixture.tokenizer().Encode("The robot", true);
  ASSERT_OK(prompt);
  auto result = fixture.Run({Greedy(*prompt, 40)})[0];
  EXPECT_EQ(result.text, Continuation(fixture.tokenizer(), *prompt, result.ids));
}

TEST(EngineTest, StopStringEndsAndIsExcluded) {
  EngineFixture fixture(SharedModel());
  auto prompt = fixture.tokenizer().Encode("", true);
  GenerationRequest r = Greedy(*prompt, 60);
  r.stop = {"vectors"};
  auto result = fixture.Run({r})[0];
  EXPECT_EQ(result.finish, FinishReason::kStop);
  EXPECT_EQ(result.text, "\"Echoes of ");
}

TEST(EngineTest, StopTokenIdEndsWithoutItsText) {
  EngineFixture fixture(SharedModel());
  auto prompt = fixture.tokenizer().Encode("", true);
  auto free_run = fixture.Run({Greedy(*prompt, 10)})[0];
  GenerationRequest r = Greedy(*prompt, 10);
  r.stop_token_ids = {free_run.ids[3]};
  auto result = fixture.Run({r})[0];
  EXPECT_EQ(result.finish, FinishReason::kStop);
  ASSERT_EQ(result.ids.size(), 4u);
  const std::vector<int32_t> before_stop(result.ids.begin(), result.ids.begin() + 3);
  EXPECT_EQ(result.text, Continuation(fixture.tokenizer(), *prompt, before_stop));
}

TEST(EngineTest, EosStopsUnlessIgnored) {
  // The shared model ends its dreams with EOS well inside its context.
  EngineFixture fixture(SharedModel());
  auto prompt = fixture.tokenizer().Encode("", true);
  GenerationRequest r = Greedy(*prompt, 120);
  r.ignore_eos = false;
  auto result = fixture.Run({r})[0];
  if (result.finish == FinishReason::kStop) {
    EXPECT_EQ(result.ids.back(), 2);
    EXPECT_LT(result.ids.size(), 120u);
  } else {
    EXPECT_EQ(result.ids.size(), 120u);
  }
}

TEST(EngineTest, SeededSamplingIsReproducibleAndBatchIndependent) {
  EngineFixture fixture(SharedModel());
  auto prompt = fixture.tokenizer().Encode("At low tide", true);
  GenerationRequest r = Greedy(*prompt, 30);
  r.sampling = {.temperature = 0.9f, .top_k = 40, .top_p = 0.95f, .seed = 1234};
  auto alone = fixture.Run({r})[0];
  GenerationRequest other = r;
  other.sampling.seed = 99;
  auto batched = fixture.Run({other, r, other});
  EXPECT_EQ(alone.ids, batched[1].ids);
  EXPECT_NE(alone.ids, batched[0].ids);
}

TEST(EngineTest, LogprobsAreReported) {
  EngineFixture fixture(SharedModel());
  GenerationRequest r = Greedy({1}, 3);
  r.top_logprobs = 4;
  auto result = fixture.Run({r})[0];
  for (const TokenEvent& e : result.events) {
    ASSERT_EQ(e.top_logprobs.size(), 4u);
    EXPECT_EQ(e.top_logprobs[0].id, e.token_id);  // greedy: the best one
    EXPECT_FLOAT_EQ(e.top_logprobs[0].logprob, e.logprob);
    EXPECT_LT(e.logprob, 0.0f);
  }
}

TEST(EngineTest, PreemptionUnderATinyCacheGivesTheSameTokens) {
  // 12 blocks of 16 tokens for 4 requests that each need up to 5 blocks:
  // some must be preempted and recomputed.
  const int64_t block_bytes = 2 * 4 * 16 * 4 * 16 * 4;
  EngineFixture small(SharedModel(), 12 * block_bytes);
  EngineFixture large(SharedModel());
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 4; ++i) {
    GenerationRequest r = Greedy({1, 300 + i, 50 + i}, 70);
    r.sampling = {.temperature = 0.8f, .seed = static_cast<uint64_t>(i)};
    requests.push_back(r);
  }
  auto expected = large.Run(requests);
  auto got = small.Run(requests);
  for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(got[i].ids, expected[i].ids) << i;
  EXPECT_EQ(small.cache().free_blocks(), small.cache().num_blocks());
}

TEST(EngineTest, InvalidRequestsNameTheField) {
  EngineFixture fixture(SharedModel());
  auto add = [&](GenerationRequest r) { return fixture.engine().Add(r, [](const TokenEvent&) {}); };
  EXPECT_THAT(std::string(add(Greedy({}, 4)).status().message()), HasSubstr("prompt"));
  EXPECT_THAT(std::string(add(Greedy({1}, 0)).status().message()), HasSubstr("max_tokens"));
  EXPECT_THAT(std::string(add(Greedy({1}, 500)).status().message()), HasSubstr("context"));
  EXPECT_THAT(std::string(add(Greedy({1, 9999}, 4)).status().message()), HasSubstr("vocabulary"));
  GenerationRequest bad_temperature = Greedy({1}, 4);
  bad_temperature.sampling.temperature = -1;
  EXPECT_THAT(std::string(add(bad_temperature).status().message()), HasSubstr("temperature"));
  EXPECT_FALSE(fixture.engine().HasWork());
}

}  // namespace
}  // namespace loraserve::engine
