// The forward pass with LoRA adapters: unmerged segments, merged weights and
// mixed batches, against peft goldens and against each other.
#include <cmath>
#include <map>

#include "adapters/adapter_composition.h"
#include "adapters/device_adapter.h"
#include "adapters/lora_adapter.h"
#include "gtest/gtest.h"
#include "server/model/llama_model.h"
#include "tests/support/forward_harness.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using test_support::MaxAbsDiff;
using test_support::PagedTestCache;

// Prefills `seqs` in one batch (logits for every token), each with its adapter.
std::vector<float> Prefill(kernels::Backend* backend, LlamaModel& model,
                           const std::vector<std::vector<int32_t>>& seqs,
                           const std::vector<AdapterChoice>& adapters,
                           const MergedWeights* merged = nullptr) {
  size_t longest = 0;
  for (const auto& s : seqs) longest = std::max(longest, s.size());
  PagedTestCache cache(backend, model.kv_shape(), seqs.size(), longest);
  ForwardInput in = test_support::PrefillAll(seqs, cache);
  in.adapters = adapters;
  in.merged = merged;
  std::vector<float> logits;
  absl::Status status = model.Forward(in, cache.view(), &logits);
  EXPECT_OK(status);
  return logits;
}

class LoraForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = std::move(*kernels::CreateCpuBackend({}));
    auto models = test_support::LoadModelCases();
    ASSERT_OK(models);
    for (auto& c : *models) model_dirs_[c.name] = c.model_dir;
    auto adapters = test_support::LoadAdapterCases();
    ASSERT_OK(adapters);
    cases_ = std::move(*adapters);
    ASSERT_GE(cases_.size(), 10u);
    auto compositions = test_support::LoadCompositionCases();
    ASSERT_OK(compositions);
    compositions_ = std::move(*compositions);
    ASSERT_GE(compositions_.size(), 2u);
  }

  LlamaModel& Model(const std::string& name) {
    auto it = models_.find(name);
    if (it == models_.end()) {
      auto model = LlamaModel::Load(backend_.get(), model_dirs_.at(name), {});
      EXPECT_OK(model);
      it = models_.emplace(name, std::move(*model)).first;
    }
    return *it->second;
  }

  const adapters::DeviceAdapter& Adapter(const test_support::GoldenCase& c) {
    auto it = device_.find(c.name);
    if (it == device_.end()) {
      auto host =
          adapters::LoadLoraAdapter(c.adapter_dir, Model(c.base).adapter_shape(), {.max_rank = 64});
      EXPECT_TRUE(host.ok()) << c.name << ": " << host.status();
      const adapters::BaseWeights base = Model(c.base).base_weights();
      auto device = adapters::DeviceAdapter::Upload(backend_.get(), *host, &base);
      EXPECT_OK(device);
      it = device_.emplace(c.name, std::move(*device)).first;
    }
    return *it->second;
  }

  // The composition of a composition case's parts (peft's cat), on the device.
  const adapters::DeviceAdapter& Composed(const test_support::GoldenCase& c) {
    auto it = device_.find(c.name);
    if (it == device_.end()) {
      const adapters::BaseModelShape shape = Model(c.base).adapter_shape();
      std::vector<adapters::LoraAdapter> hosts;
      for (const test_support::GoldenPart& part : c.parts) {
        auto host = adapters::LoadLoraAdapter(part.adapter_dir, shape, {.max_rank = 64});
        EXPECT_TRUE(host.ok()) << part.adapter << ": " << host.status();
        hosts.push_back(std::move(*host));
      }
      std::vector<adapters::CompositionPart> parts;
      for (size_t i = 0; i < hosts.size(); ++i) {
        parts.push_back({c.parts[i].adapter, &hosts[i], c.parts[i].weight});
      }
      auto composed = adapters::ComposeLoraAdapters(parts, {.max_rank = 64}, c.name);
      EXPECT_TRUE(composed.ok()) << c.name << ": " << composed.status();
      auto device = adapters::DeviceAdapter::Upload(backend_.get(), *composed);
      EXPECT_OK(device);
      it = device_.emplace(c.name, std::move(*device)).first;
    }
    return *it->second;
  }

  std::vector<float> Prefill(LlamaModel& model, const std::vector<std::vector<int32_t>>& seqs,
                             const std::vector<AdapterChoice>& adapters,
                             const MergedWeights* merged = nullptr) {
    return model::Prefill(backend_.get(), model, seqs, adapters, merged);
  }

  // Each request's rows of `batched` (logits of `seqs` prefilled in one
  // batch) equal that request prefilled alone.
  void ExpectEachRequestAsAlone(LlamaModel& model, const std::vector<std::vector<int32_t>>& seqs,
                                const std::vector<AdapterChoice>& choices,
                                const std::vector<float>& batched) {
    const int64_t vocab = model.config().vocab_size;
    size_t offset = 0;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const std::vector<float> alone = Prefill(model, {seqs[i]}, {choices[i]});
      EXPECT_LE(MaxAbsDiff(batched.data() + offset, alone.data(), alone.size()), 1e-5f)
          << "request " << i;
      offset += seqs[i].size() * vocab;
    }
  }

  const test_support::GoldenCase& Case(const std::string& name) {
    for (const auto& c : cases_) {
      if (c.name == name) return c;
    }
    ADD_FAILURE() << "no adapter case " << name;
    return cases_[0];
  }

  std::unique_ptr<kernels::Backend> backend_;
  std::map<std::string, std::string> model_dirs_;
  std::map<std::string, std::unique_ptr<LlamaModel>> models_;
  std::map<std::string, std::unique_ptr<adapters::DeviceAdapter>> device_;
  std::vector<test_support::GoldenCase> cases_;
  std::vector<test_support::GoldenCase> compositions_;
};

TEST_F(LoraForwardTest, UnmergedLogitsMatchPeft) {
  for (const test_support::GoldenCase& c : cases_) {
    SCOPED_TRACE(c.name);
    LlamaModel& model = Model(c.base);
    const AdapterChoice choice{&Adapter(c), 1.0f};
    for (const test_support::GoldenPrompt& p : c.prompts) {
      const std::vector<float> logits = Prefill(model, {p.ids}, {choice});
      ASSERT_EQ(logits.size(), p.logits.size());
      EXPECT_LE(MaxAbsDiff(logits.data(), p.logits.data(), logits.size()), 1e-4f);
    }
  }
}

TEST_F(LoraForwardTest, MergedLogitsMatchPeftAndUnmerged) {
  for (const test_support::GoldenCase& c : cases_) {
    SCOPED_TRACE(c.name);
    LlamaModel& model = Model(c.base);
    const AdapterChoice choice{&Adapter(c), 1.0f};
    auto merged = model.Merge(choice);
    ASSERT_OK(merged);
    for (const test_support::GoldenPrompt& p : c.prompts) {
      const std::vector<float> on_merged = Prefill(model, {p.ids}, {choice}, merged->get());
      const std::vector<float> unmerged = Prefill(model, {p.ids}, {choice});
      EXPECT_LE(MaxAbsDiff(on_merged.data(), p.logits.data(), p.logits.size()), 1e-4f);
      EXPECT_LE(MaxAbsDiff(on_merged.data(), unmerged.data(), unmerged.size()), 1e-4f);
    }
  }
}

// Four adapters, base-only requests and a scaled request in one batch: each
// gets the logits it gets alone.
TEST_F(LoraForwardTest, MixedBatchEqualsEachRequestAlone) {
  LlamaModel& model = Model("aidreams-260k");
  const std::vector<std::string> names = {"ocean", "robot", "qv-r4", "mlp-r16-rslora"};
  std::vector<std::vector<int32_t>> seqs;
  std::vector<AdapterChoice> choices;
  for (size_t i = 0; i < names.size(); ++i) {
    const test_support::GoldenCase& c = Case(names[i]);
    seqs.push_back(c.prompts[(i + 1) % c.prompts.size()].ids);
    choices.push_back({&Adapter(c), 1.0f});
  }
  seqs.push_back(Case("ocean").prompts[2].ids);  // base only
  choices.push_back({});
  seqs.push_back(Case("robot").prompts[3].ids);  // robot at half strength
  choices.push_back({&Adapter(Case("robot")), 0.5f});
  seqs.push_back(Case("ocean").prompts[4].ids);  // same adapter again: shares a segment
  choices.push_back(choices[0]);
  seqs.push_back(Case("ocean").prompts[1].ids);  // base again
  choices.push_back({});

  const std::vector<float> batched = Prefill(model, seqs, choices);
  ExpectEachRequestAsAlone(model, seqs, choices, batched);
  // The scaled request differs from both the base and the full adapter.
  const std::vector<float> full = Prefill(model, {seqs[5]}, {choices[1]});
  const std::vector<float> half = Prefill(model, {seqs[5]}, {choices[5]});
  EXPECT_GT(MaxAbsDiff(full.data(), half.data(), full.size()), 1e-2f);
}

// A mixed batch on merged weights (others corrected by low-rank terms)
// equals the same batch unmerged.
TEST_F(LoraForwardTest, MixedBatchOnMergedWeightsEqualsUnmerged) {
  LlamaModel& model = Model("aidreams-260k");
  const AdapterChoice ocean{&Adapter(Case("ocean")), 1.0f};
  const AdapterChoice robot{&Adapter(Case("robot")), 1.0f};
  const AdapterChoice attn{&Adapter(Case("attn-r8")), 1.0f};
  const AdapterChoice ocean_scaled{ocean.adapter, 0.25f};
  std::vector<std::vector<int32_t>> seqs;
  for (int i = 0; i < 5; ++i) seqs.push_back(Case("ocean").prompts[i].ids);
  const std::vector<AdapterChoice> choices = {ocean, robot, {}, attn, ocean_scaled};
  auto merged = model.Merge(ocean);
  ASSERT_OK(merged);
  const std::vector<float> unmerged = Prefill(model, seqs, choices);
  const std::vector<float> on_merged = Prefill(model, seqs, choices, merged->get());
  EXPECT_LE(MaxAbsDiff(unmerged.data(), on_merged.data(), unmerged.size()), 1e-4f);
}

// DoRA, embedding and lm_head LoRA, plain LoRA and the base in one batch,
// unmerged and on the plain adapter's merged weights: each request gets the
// logits it gets alone (all on the untied Mistral).
TEST_F(LoraForwardTest, DoraAndHeadAdaptersMixInOneBatch) {
  LlamaModel& model = Model("untied");
  const AdapterChoice dora{&Adapter(Case("dora")), 1.0f};
  const AdapterChoice heads{&Adapter(Case("embed-lm-head")), 1.0f};
  const AdapterChoice plain{&Adapter(Case("layers-to-transform")), 1.0f};
  EXPECT_TRUE(dora.adapter->has_dora());
  EXPECT_TRUE(heads.adapter->extends_forward());
  EXPECT_FALSE(plain.adapter->extends_forward());
  std::vector<std::vector<int32_t>> seqs;
  for (int i = 0; i < 4; ++i) seqs.push_back(Case("dora").prompts[i].ids);
  seqs.push_back(Case("dora").prompts[2].ids);
  const std::vector<AdapterChoice> choices = {dora, heads, plain, {}, dora};
  const std::vector<float> batched = Prefill(model, seqs, choices);
  auto merged = model.Merge(plain);
  ASSERT_OK(merged);
  const std::vector<float> on_merged = Prefill(model, seqs, choices, merged->get());
  EXPECT_LE(MaxAbsDiff(batched.data(), on_merged.data(), batched.size()), 1e-4f);
  ExpectEachRequestAsAlone(model, seqs, choices, batched);
}

// Saved modules (own embedding, lm_head and norms) beside a plain adapter.
TEST_F(LoraForwardTest, SavedModulesServeOnlyTheirAdaptersRows) {
  LlamaModel& model = Model("sharded");
  const AdapterChoice saved{&Adapter(Case("modules-to-save")), 1.0f};
  const AdapterChoice plain{&Adapter(Case("bf16-tensors")), 1.0f};
  const test_support::GoldenCase& c = Case("modules-to-save");
  std::vector<std::vector<int32_t>> seqs = {c.prompts[1].ids, c.prompts[3].ids, c.prompts[2].ids};
  const std::vector<AdapterChoice> choices = {plain, saved, {}};
  const std::vector<float> batched = Prefill(model, seqs, choices);
  const int64_t vocab = model.config().vocab_size;
  const size_t at = seqs[0].size() * vocab;
  EXPECT_LE(MaxAbsDiff(batched.data() + at, c.prompts[3].logits.data(), c.prompts[3].logits.size()),
            1e-4f);
  const std::vector<float> base_alone = Prefill(model, {seqs[2]}, {{}});
  EXPECT_LE(MaxAbsDiff(batched.data() + at + seqs[1].size() * vocab, base_alone.data(),
                       base_alone.size()),
            1e-5f);
}

// A composition of adapters (each at its own rank, weights negative too)
// gives peft's add_weighted_adapter(..., "cat") logits unmerged and merged.
TEST_F(LoraForwardTest, CompositionsMatchPeftCatUnmergedAndMerged) {
  for (const test_support::GoldenCase& c : compositions_) {
    SCOPED_TRACE(c.name);
    LlamaModel& model = Model(c.base);
    const AdapterChoice choice{&Composed(c), 1.0f};
    auto merged = model.Merge(choice);
    ASSERT_OK(merged);
    for (const test_support::GoldenPrompt& p : c.prompts) {
      const std::vector<float> unmerged = Prefill(model, {p.ids}, {choice});
      const std::vector<float> on_merged = Prefill(model, {p.ids}, {choice}, merged->get());
      ASSERT_EQ(unmerged.size(), p.logits.size());
      EXPECT_LE(MaxAbsDiff(unmerged.data(), p.logits.data(), unmerged.size()), 1e-4f);
      EXPECT_LE(MaxAbsDiff(on_merged.data(), p.logits.data(), on_merged.size()), 1e-4f);
    }
  }
}

// Compositions beside one of their own components, the base and a scaled
// composition in one batch, unmerged and on one composition's merged
// weights: each request gets the logits it gets alone.
TEST_F(LoraForwardTest, CompositionsMixWithTheirComponentsInOneBatch) {
  LlamaModel& model = Model("aidreams-260k");
  const AdapterChoice blend{&Composed(compositions_[0]), 1.0f};
  const AdapterChoice mixed{&Composed(compositions_[1]), 1.0f};
  const AdapterChoice ocean{&Adapter(Case("ocean")), 1.0f};
  const test_support::GoldenCase& c = compositions_[0];
  std::vector<std::vector<int32_t>> seqs;
  for (int i = 0; i < 5; ++i) seqs.push_back(c.prompts[i].ids);
  const std::vector<AdapterChoice> choices = {blend, ocean, {}, mixed, {blend.adapter, 0.5f}};
  const std::vector<float> batched = Prefill(model, seqs, choices);
  auto merged = model.Merge(blend);
  ASSERT_OK(merged);
  const std::vector<float> on_merged = Prefill(model, seqs, choices, merged->get());
  EXPECT_LE(MaxAbsDiff(batched.data(), on_merged.data(), batched.size()), 1e-4f);
  ExpectEachRequestAsAlone(model, seqs, choices, batched);
  EXPECT_LE(MaxAbsDiff(batched.data(), c.prompts[0].logits.data(), c.prompts[0].logits.size()),
            1e-4f);
}

// A DoRA adapter merges at its own scale only: its norms are of that scale.
TEST_F(LoraForwardTest, DoraMergesAtScaleOne) {
  LlamaModel& model = Model("untied");
  auto merged = model.Merge({&Adapter(Case("dora")), 0.5f});
  EXPECT_EQ(merged.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LoraForwardTest, MergeLeavesTheBaseWeightsUntouched) {
  LlamaModel& model = Model("aidreams-260k");
  const std::vector<int32_t> prompt = Case("ocean").prompts[1].ids;
  const std::vector<float> before = Prefill(model, {prompt}, {{}});
  auto merged = model.Merge({&Adapter(Case("ocean")), 1.0f});
  ASSERT_OK(merged);
  EXPECT_GT((*merged)->bytes(), 0);
  const std::vector<float> after = Prefill(model, {prompt}, {{}});
  EXPECT_EQ(before, after);
}

}  // namespace
}  // namespace loraserve::model
