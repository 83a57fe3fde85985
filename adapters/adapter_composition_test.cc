#include "adapters/adapter_composition.h"

#include <cmath>
#include <limits>
#include <vector>

#include "adapters/testing.h"
#include "gtest/gtest.h"

namespace loraserve::adapters {
namespace {

using test_support::FreshDir;
using test_support::LoraConfigJson;
using test_support::LoraTensors;
using test_support::SharedModelShape;
using test_support::WriteAdapter;

LoraAdapter Load(const std::string& tag, int r, double alpha,
                 const std::vector<std::string>& targets, int seed, bool rslora = false) {
  nlohmann::json config = LoraConfigJson(r, alpha, targets);
  if (rslora) config["use_rslora"] = true;
  const std::string dir =
      WriteAdapter(FreshDir(tag), config, LoraTensors(SharedModelShape(), r, targets, seed));
  absl::StatusOr<LoraAdapter> adapter = LoadLoraAdapter(dir, SharedModelShape(), {.max_rank = 64});
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  return *std::move(adapter);
}

// scale · B · A as a dense [out, in] matrix.
std::vector<double> Delta(const LoraWeights& w, int64_t in, int64_t out) {
  std::vector<double> delta(in * out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      double sum = 0;
      for (int k = 0; k < w.rank; ++k) sum += double{w.b[o * w.rank + k]} * w.a[k * in + i];
      delta[o * in + i] = w.scale * sum;
    }
  }
  return delta;
}

TEST(AdapterCompositionTest, EveryModuleIsTheWeightedSumOfItsComponentsTerms) {
  const LoraAdapter qv = Load("qv", 4, 8, {"q_proj", "v_proj"}, 1);
  const LoraAdapter qk = Load("qk", 2, 2, {"q_proj", "k_proj"}, 2, /*rslora=*/true);
  absl::StatusOr<LoraAdapter> mix =
      ComposeLoraAdapters({{"qv", &qv, 0.5f}, {"qk", &qk, -2.0f}}, {.max_rank = 64}, "hash");
  ASSERT_TRUE(mix.ok()) << mix.status();
  EXPECT_EQ(mix->content_hash(), "hash");
  EXPECT_EQ(mix->ranks(), (std::vector<int>{2, 4, 6}));
  EXPECT_EQ(mix->target_modules(), (std::vector<std::string>{"q_proj", "k_proj", "v_proj"}));
  EXPECT_FALSE(mix->config().use_dora());
  size_t bytes = 0;
  for (int64_t layer = 0; layer < mix->num_layers(); ++layer) {
    for (LoraModule module : kAllLoraModules) {
      const LoraWeights& w = mix->weights(layer, module);
      const LoraWeights& a = qv.weights(layer, module);
      const LoraWeights& b = qk.weights(layer, module);
      ASSERT_EQ(w.rank, a.rank + b.rank) << LoraModulePath(layer, module);
      if (w.empty()) continue;
      const int64_t in = w.in_features, out = w.out_features;
      bytes += (w.a.size() + w.b.size()) * sizeof(float);
      std::vector<double> expected(in * out, 0.0);
      if (!a.empty()) {
        const std::vector<double> d = Delta(a, in, out);
        for (size_t i = 0; i < d.size(); ++i) expected[i] += 0.5 * d[i];
      }
      if (!b.empty()) {
        const std::vector<double> d = Delta(b, in, out);
        for (size_t i = 0; i < d.size(); ++i) expected[i] += -2.0 * d[i];
      }
      const std::vector<double> got = Delta(w, in, out);
      for (size_t i = 0; i < got.size(); ++i) {
        ASSERT_NEAR(got[i], expected[i], 1e-5) << LoraModulePath(layer, module) << " " << i;
      }
    }
  }
  EXPECT_EQ(mix->bytes(), bytes);
}

TEST(AdapterCompositionTest, RefusesWhatCannotBeComposed) {
  const LoraAdapter qv = Load("qv", 4, 8, {"q_proj", "v_proj"}, 1);
  const LoraAdapter big = Load("big", 40, 40, {"q_proj"}, 3);
  const AdapterLimits limits{.max_rank = 64};
  EXPECT_EQ(ComposeLoraAdapters({}, limits, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<CompositionPart> many(kMaxComposedAdapters + 1, {"qv", &qv, 1.0f});
  EXPECT_EQ(ComposeLoraAdapters(many, limits, "").status().code(),
            absl::StatusCode::kInvalidArgument);
  for (float weight : {std::numeric_limits<float>::quiet_NaN(),
                       std::numeric_limits<float>::infinity(), kMaxCompositionWeight * 2}) {
    const absl::Status status = ComposeLoraAdapters({{"qv", &qv, weight}}, limits, "").status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << weight;
    EXPECT_NE(status.message().find("\"qv\": weight"), std::string::npos) << status;
  }
  // 40 + 40 on q_proj is above the limit of 64.
  const absl::Status rank =
      ComposeLoraAdapters({{"a", &big, 1.0f}, {"b", &big, 1.0f}}, limits, "").status();
  EXPECT_EQ(rank.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rank.message().find("rank 80"), std::string::npos) << rank;
  EXPECT_NE(rank.message().find("--max-lora-rank"), std::string::npos) << rank;
  EXPECT_TRUE(ComposeLoraAdapters({{"a", &big, 1.0f}, {"b", &qv, 1.0f}}, limits, "").ok());
}

}  // namespace
}  // namespace loraserve::adapters
