#include "adapters/rank_compaction.h"

#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/testing.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::adapters {
namespace {

using test_support::FreshDir;
using test_support::LoraConfigJson;
using test_support::LoraTensors;
using test_support::SharedModelShape;
using test_support::TestTensor;
using test_support::WriteAdapter;
using ::testing::HasSubstr;

const std::vector<std::string> kQv = {"q_proj", "v_proj"};

// s·B·A of a module as [out, in].
std::vector<double> Delta(const LoraWeights& w) {
  std::vector<double> delta(static_cast<size_t>(w.out_features * w.in_features), 0.0);
  for (int64_t o = 0; o < w.out_features; ++o) {
    for (int64_t i = 0; i < w.in_features; ++i) {
      double sum = 0;
      for (int k = 0; k < w.rank; ++k) {
        sum += static_cast<double>(w.b[o * w.rank + k]) * w.a[k * w.in_features + i];
      }
      delta[o * w.in_features + i] = w.scale * sum;
    }
  }
  return delta;
}

// ‖x − y‖ / ‖y‖.
double RelativeError(const std::vector<double>& x, const std::vector<double>& y) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    diff += (x[i] - y[i]) * (x[i] - y[i]);
    norm += y[i] * y[i];
  }
  return std::sqrt(diff / norm);
}

// q_proj and v_proj at rank 8 where layer 0's q_proj has true rank 2 (its A's
// rows 2..7 mix rows 0 and 1), plus LoRA on embed_tokens and a DoRA-free
// lm_head pair of rank 8.
std::vector<TestTensor> LowRankTensors() {
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 8, kQv, 3);
  for (TestTensor& t : tensors) {
    if (t.name != "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") continue;
    const int64_t in = t.shape[1];
    for (int64_t row = 2; row < 8; ++row) {
      for (int64_t i = 0; i < in; ++i) {
        t.values[row * in + i] = 0.5f * row * t.values[i] - 0.25f * t.values[in + i];
      }
    }
  }
  std::vector<float> embed_a(8 * 512), embed_b(64 * 8);
  // Full rank: sin(c·i²) is no sum of a few separable terms, as sin(c·i) would be.
  for (size_t i = 0; i < embed_a.size(); ++i) embed_a[i] = std::sin(0.37 * i * i);
  for (size_t i = 0; i < embed_b.size(); ++i) embed_b[i] = std::cos(0.11 * i * i);
  tensors.push_back({"base_model.model.model.embed_tokens.lora_embedding_A", {8, 512}, embed_a});
  tensors.push_back({"base_model.model.model.embed_tokens.lora_embedding_B", {64, 8}, embed_b});
  return tensors;
}

LoraAdapter Load(const nlohmann::json& config, const std::vector<TestTensor>& tensors,
                 AdapterRead read = AdapterRead::kWeights) {
  absl::StatusOr<LoraAdapter> adapter =
      LoadLoraAdapter(WriteAdapter(FreshDir("a"), config, tensors), SharedModelShape(), {}, read);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  return *std::move(adapter);
}

nlohmann::json LowRankConfig() {
  return LoraConfigJson(8, 16, {"q_proj", "v_proj", "embed_tokens"});
}

TEST(RankCompactionTest, FindsATrueLowerRankAndKeepsTheUpdate) {
  LoraAdapter adapter = Load(LowRankConfig(), LowRankTensors());
  const LoraAdapter original = Load(LowRankConfig(), LowRankTensors());
  ASSERT_OK_AND_ASSIGN(const CompactionTarget target, CompactionTargetFrom(1 - 1e-9, {}));
  ASSERT_OK_AND_ASSIGN(const CompactionReport report, CompactRanks(target, &adapter));

  const LoraWeights& q0 = adapter.weights(0, LoraModule::kQProj);
  EXPECT_EQ(q0.rank, 2);
  EXPECT_EQ(q0.scale, 1.0f);  // s folded into the new pair
  EXPECT_EQ(q0.a.size(), 2u * q0.in_features);
  EXPECT_EQ(q0.b.size(), 2u * q0.out_features);
  EXPECT_LT(RelativeError(Delta(q0), Delta(original.weights(0, LoraModule::kQProj))), 1e-6);
  // Full-rank modules keep their weights bit for bit.
  const LoraWeights& v0 = adapter.weights(0, LoraModule::kVProj);
  EXPECT_EQ(v0.rank, 8);
  EXPECT_EQ(v0.a, original.weights(0, LoraModule::kVProj).a);
  EXPECT_EQ(v0.scale, original.weights(0, LoraModule::kVProj).scale);

  ASSERT_EQ(report.modules.size(), 4u * 2 + 1);
  EXPECT_EQ(report.modules[0].module, "layers.0.q_proj");
  EXPECT_EQ(report.modules[0].rank_before, 8);
  EXPECT_EQ(report.modules[0].rank, 2);
  EXPECT_NEAR(report.modules[0].energy[0] + report.modules[0].energy[1], 1.0, 1e-9);
  EXPECT_EQ(report.modules.back().module, "embed_tokens");
  for (const ModuleSpectrum& m : report.modules) {
    SCOPED_TRACE(m.module);
    EXPECT_NEAR(std::accumulate(m.energy.begin(), m.energy.end(), 0.0), 1.0, 1e-9);
    EXPECT_TRUE(std::is_sorted(m.energy.rbegin(), m.energy.rend()));
  }
  EXPECT_EQ(report.ranks_before, std::vector<int>{8});
  EXPECT_EQ(adapter.ranks(), (std::vector<int>{2, 8}));
  EXPECT_EQ(report.bytes_before, original.bytes());
  EXPECT_EQ(adapter.bytes(), original.bytes() - 6u * (q0.in_features + q0.out_features) * 4);
  // Another adapter to every cache keyed by hash, and a function of the target.
  EXPECT_NE(adapter.content_hash(), original.content_hash());
  LoraAdapter again = Load(LowRankConfig(), LowRankTensors());
  ASSERT_OK(CompactRanks(target, &again).status());
  EXPECT_EQ(again.content_hash(), adapter.content_hash());
  LoraAdapter other = Load(LowRankConfig(), LowRankTensors());
  ASSERT_OK(CompactRanks(CompactionTarget{0.5}, &other).status());
  EXPECT_NE(other.content_hash(), adapter.content_hash());
}

TEST(RankCompactionTest, EnergyTargetPicksTheSmallestRankThatHoldsIt) {
  const LoraAdapter original = Load(LowRankConfig(), LowRankTensors());
  LoraAdapter probe = Load(LowRankConfig(), LowRankTensors());
  ASSERT_OK_AND_ASSIGN(const CompactionReport spectrum, CompactRanks(CompactionTarget{1}, &probe));
  const ModuleSpectrum& v1 = spectrum.modules[3];  // layers.1.v_proj, full rank 8
  ASSERT_EQ(v1.module, "layers.1.v_proj");
  ASSERT_EQ(v1.energy.size(), 8u);
  const double first_three = v1.energy[0] + v1.energy[1] + v1.energy[2];

  for (const auto& [energy, rank] : std::vector<std::pair<double, int>>{
           {first_three, 3}, {first_three + 1e-6, 4}, {v1.energy[0] / 2, 1}, {1.0, 8}}) {
    SCOPED_TRACE(energy);
    LoraAdapter adapter = Load(LowRankConfig(), LowRankTensors());
    ASSERT_OK_AND_ASSIGN(const CompactionReport report,
                         CompactRanks(CompactionTarget{energy}, &adapter));
    const LoraWeights& w = adapter.weights(1, LoraModule::kVProj);
    EXPECT_EQ(w.rank, rank);
    EXPECT_GE(report.modules[3].kept_energy, std::min(energy, 1.0) - 1e-12);
    // Eckart–Young: the error is exactly the energy left out.
    const double left = 1 - std::accumulate(v1.energy.begin(), v1.energy.begin() + rank, 0.0);
    EXPECT_NEAR(RelativeError(Delta(w), Delta(original.weights(1, LoraModule::kVProj))),
                std::sqrt(std::max(left, 0.0)), 1e-5);
  }
}

TEST(RankCompactionTest, ErrorBoundIsTheEnergyTarget) {
  ASSERT_OK_AND_ASSIGN(const CompactionTarget target, CompactionTargetFrom({}, 0.3));
  EXPECT_DOUBLE_EQ(target.min_energy, 1 - 0.09);
  const LoraAdapter original = Load(LowRankConfig(), LowRankTensors());
  LoraAdapter adapter = Load(LowRankConfig(), LowRankTensors());
  ASSERT_OK(CompactRanks(target, &adapter).status());
  for (int64_t layer = 0; layer < 4; ++layer) {
    for (LoraModule module : {LoraModule::kQProj, LoraModule::kVProj}) {
      EXPECT_LE(RelativeError(Delta(adapter.weights(layer, module)),
                              Delta(original.weights(layer, module))),
                0.3 + 1e-6);
    }
  }
  const LoraWeights& embed = adapter.head_weights(HeadModule::kEmbedTokens);
  EXPECT_LT(embed.rank, 8);
  EXPECT_LE(RelativeError(Delta(embed), Delta(original.head_weights(HeadModule::kEmbedTokens))),
            0.3 + 1e-6);
}

TEST(RankCompactionTest, DoraMagnitudesAndSavedModulesStay) {
  nlohmann::json config = LoraConfigJson(8, 16, {"q_proj", "v_proj", "lm_head"});
  config["use_dora"] = true;
  config["modules_to_save"] = {"model.norm"};
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 8, kQv, 5);
  for (int64_t layer = 0; layer < 4; ++layer) {
    for (const char* module : {"q_proj", "v_proj"}) {
      tensors.push_back({absl::StrCat("base_model.model.model.layers.", layer, ".self_attn.",
                                      module, ".lora_magnitude_vector"),
                         {64},
                         std::vector<float>(64, 1.5f)});
    }
  }
  std::vector<float> head_a(8 * 64, 0.0f), head_b(512 * 8, 0.0f);
  for (int64_t i = 0; i < 64; ++i) head_a[i] = 0.01f * i;  // rank 1 in truth
  for (int64_t o = 0; o < 512; ++o) head_b[o * 8] = 0.5f;
  tensors.push_back({"base_model.model.lm_head.lora_A.weight", {8, 64}, head_a});
  tensors.push_back({"base_model.model.lm_head.lora_B.weight", {512, 8}, head_b});
  tensors.push_back(
      {"base_model.model.lm_head.lora_magnitude_vector", {512}, std::vector<float>(512, 2.0f)});
  tensors.push_back({"base_model.model.model.norm.weight", {64}, std::vector<float>(64, 0.9f)});
  LoraAdapter adapter = Load(config, tensors);
  ASSERT_OK(CompactRanks(CompactionTarget{0.999}, &adapter).status());
  const LoraWeights& lm_head = adapter.head_weights(HeadModule::kLmHead);
  EXPECT_EQ(lm_head.rank, 1);
  EXPECT_TRUE(lm_head.dora);
  EXPECT_EQ(lm_head.magnitude, std::vector<float>(512, 2.0f));
  EXPECT_EQ(adapter.weights(2, LoraModule::kQProj).magnitude, std::vector<float>(64, 1.5f));
  EXPECT_EQ(adapter.saved().norm, std::vector<float>(64, 0.9f));
}

TEST(RankCompactionTest, AZeroUpdateKeepsRankOne) {
  std::vector<TestTensor> tensors = LoraTensors(SharedModelShape(), 4, kQv, 1);
  for (TestTensor& t : tensors) {
    if (t.name.find("lora_B") != std::string::npos) std::fill(t.values.begin(), t.values.end(), 0);
  }
  LoraAdapter adapter = Load(LoraConfigJson(4, 8, kQv), tensors);
  ASSERT_OK_AND_ASSIGN(const CompactionReport report,
                       CompactRanks(CompactionTarget{0.99}, &adapter));
  EXPECT_EQ(adapter.ranks(), std::vector<int>{1});
  EXPECT_EQ(report.modules[0].energy, std::vector<double>(4, 0.0));
  EXPECT_EQ(Delta(adapter.weights(0, LoraModule::kQProj)), std::vector<double>(64 * 64, 0.0));
}

TEST(RankCompactionTest, BadTargetsAndMetadataOnlyAdaptersAreRefused) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (const auto& [energy, error] :
       std::vector<std::pair<std::optional<double>, std::optional<double>>>{{{}, {}},
                                                                            {0.9, 0.1},
                                                                            {0.0, {}},
                                                                            {1.5, {}},
                                                                            {nan, {}},
                                                                            {{}, 1.0},
                                                                            {{}, -0.1},
                                                                            {{}, nan}}) {
    const absl::StatusOr<CompactionTarget> target = CompactionTargetFrom(energy, error);
    EXPECT_EQ(target.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(target.status().message()), HasSubstr("rank compaction"));
  }
  LoraAdapter metadata = Load(LowRankConfig(), LowRankTensors(), AdapterRead::kMetadata);
  EXPECT_EQ(CompactRanks(CompactionTarget{0.9}, &metadata).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace loraserve::adapters
