// Rank compaction on the shared model's adapters (the trained ocean and
// robot, and the seeded random ones), per energy target: ranks and bytes
// before and after, and against the uncompacted adapter the share of equal
// greedy tokens (64 free-running from each golden prompt) and the largest
// logit difference along the uncompacted adapter's greedy sequences. It prints
// the table README's "Rank compaction" cites, and pins what must hold: a
// near-lossless target serves the same tokens, and a looser target never
// keeps more bytes than a stricter one.
#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "adapters/device_adapter.h"
#include "adapters/lora_adapter.h"
#include "adapters/rank_compaction.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"
#include "tests/support/forward_harness.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using test_support::GoldenCase;

constexpr int kGreedyTokens = 64;
constexpr double kNearLossless = 1 - 1e-9;

struct Served {
  std::unique_ptr<adapters::DeviceAdapter> device;
  size_t bytes = 0;
  std::vector<int> ranks;
};

class RankCompactionAccuracyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = std::move(*kernels::CreateCpuBackend({}));
    ASSERT_OK_AND_ASSIGN(std::vector<GoldenCase> models, test_support::LoadModelCases());
    for (GoldenCase& c : models) {
      if (c.name == "aidreams-260k") shared_ = std::move(c);
    }
    ASSERT_FALSE(shared_.prompts.empty());
    ASSERT_OK_AND_ASSIGN(model_, LlamaModel::Load(backend_.get(), shared_.model_dir, {}));
    ASSERT_OK_AND_ASSIGN(std::vector<GoldenCase> cases, test_support::LoadAdapterCases());
    for (const GoldenCase& c : cases) {
      if (c.base == "aidreams-260k") adapter_dirs_[c.name] = c.adapter_dir;
    }
    ASSERT_GE(adapter_dirs_.size(), 6u);
  }

  // The adapter in `dir`, compacted to `min_energy` unless it is 1.
  Served Serve(const std::string& dir, double min_energy) {
    absl::StatusOr<adapters::LoraAdapter> host =
        adapters::LoadLoraAdapter(dir, model_->adapter_shape(), {.max_rank = 64});
    EXPECT_OK(host);
    if (min_energy < 1) EXPECT_OK(adapters::CompactRanks({min_energy}, &*host).status());
    const adapters::BaseWeights base = model_->base_weights();
    absl::StatusOr<std::unique_ptr<adapters::DeviceAdapter>> device =
        adapters::DeviceAdapter::Upload(backend_.get(), *host, &base);
    EXPECT_OK(device);
    return {std::move(*device), host->bytes(), host->ranks()};
  }

  std::vector<float> Logits(const std::vector<int32_t>& seq, const adapters::DeviceAdapter& a) {
    test_support::PagedTestCache cache(backend_.get(), model_->kv_shape(), 1,
                                       static_cast<int32_t>(seq.size()));
    ForwardInput in = test_support::PrefillAll({seq}, cache);
    in.adapters = {{&a, 1.0f}};
    std::vector<float> logits;
    EXPECT_OK(model_->Forward(in, cache.view(), &logits));
    return logits;
  }

  // kGreedyTokens argmax tokens after `prompt`, each from a full forward.
  std::vector<int32_t> Greedy(std::vector<int32_t> seq, const adapters::DeviceAdapter& a) {
    const size_t prompt = seq.size();
    while (seq.size() < prompt + kGreedyTokens) {
      const std::vector<float> logits = Logits(seq, a);
      const size_t vocab = logits.size() / seq.size();
      const auto last = logits.end() - static_cast<std::ptrdiff_t>(vocab);
      seq.push_back(static_cast<int32_t>(std::max_element(last, logits.end()) - last));
    }
    return {seq.begin() + static_cast<std::ptrdiff_t>(prompt), seq.end()};
  }

  std::unique_ptr<kernels::Backend> backend_;
  GoldenCase shared_;
  std::unique_ptr<LlamaModel> model_;
  std::map<std::string, std::string> adapter_dirs_;
};

TEST_F(RankCompactionAccuracyTest, ReportOnTheSharedAdapters) {
  std::printf(
      "| adapter | min_energy | ranks before → after | bytes before → after (saved) | "
      "equal greedy tokens | max abs logit diff |\n|---|---|---|---|---|---|\n");
  for (const auto& [name, dir] : adapter_dirs_) {
    SCOPED_TRACE(name);
    const Served full = Serve(dir, 1);
    std::vector<std::vector<int32_t>> sequences, greedy;
    std::vector<std::vector<float>> full_logits;
    for (const test_support::GoldenPrompt& p : shared_.prompts) {
      greedy.push_back(Greedy(p.ids, *full.device));
      sequences.push_back(p.ids);
      sequences.back().insert(sequences.back().end(), greedy.back().begin(), greedy.back().end());
      full_logits.push_back(Logits(sequences.back(), *full.device));
    }
    size_t looser_bytes = 0;
    for (double energy : {0.9, 0.99, 0.999, kNearLossless}) {
      const Served compacted = Serve(dir, energy);
      int equal = 0, total = 0;
      float worst = 0;
      for (size_t i = 0; i < sequences.size(); ++i) {
        const std::vector<int32_t> tokens = Greedy(shared_.prompts[i].ids, *compacted.device);
        for (size_t t = 0; t < tokens.size(); ++t) equal += tokens[t] == greedy[i][t];
        total += static_cast<int>(tokens.size());
        const std::vector<float> logits = Logits(sequences[i], *compacted.device);
        const size_t vocab = logits.size() / sequences[i].size();
        // The rows that predict the greedy tokens: from the prompt's last on.
        const size_t from = (shared_.prompts[i].ids.size() - 1) * vocab;
        worst = std::max(
            worst, test_support::MaxAbsDiff(logits.data() + from, full_logits[i].data() + from,
                                            logits.size() - from));
      }
      std::printf("| %s | %s | %s → %s | %zu → %zu (%.0f%%) | %d/%d | %.2g |\n", name.c_str(),
                  energy == kNearLossless ? "1−1e-9" : absl::StrFormat("%g", energy).c_str(),
                  absl::StrJoin(full.ranks, ",").c_str(),
                  absl::StrJoin(compacted.ranks, ",").c_str(), full.bytes, compacted.bytes,
                  100.0 * (1 - static_cast<double>(compacted.bytes) / full.bytes), equal, total,
                  worst);
      EXPECT_LE(compacted.bytes, full.bytes);
      EXPECT_GE(compacted.bytes, looser_bytes) << "min_energy " << energy;
      looser_bytes = compacted.bytes;
      if (energy == kNearLossless) {
        EXPECT_EQ(equal, total);
        EXPECT_LE(worst, 1e-3f);
      }
    }
  }
}

}  // namespace
}  // namespace loraserve::model
