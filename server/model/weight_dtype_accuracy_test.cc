// Accuracy of the forward pass with weights stored as bf16, f16 or int8
// (CpuBackendOptions::weight_dtype) against the float32 references of
// transformers + peft (tests/golden): logits of every golden model (the
// shared trained model and the seeded random ones) and adapter, unmerged and
// merged, within bounds stated per dtype, and the share of reference greedy
// tokens the model picks.
//
// Logit errors are measured relative to the largest reference logit of the
// prompt: the scale of the logits a weight's rounding moves.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/device_adapter.h"
#include "adapters/lora_adapter.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"
#include "tests/support/forward_harness.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using kernels::DType;

// What each dtype is held to: about twice what the goldens measured (the
// test prints its measurements).
struct DTypeBounds {
  DType dtype;
  double model_logits;    // max |Δ logit| / max |reference logit|, every model
  double adapter_logits;  // the same with an adapter, unmerged or merged
  double merged_vs_unmerged;
  double greedy_agreement;  // least share of reference greedy tokens picked
};

// The shared trained model is held to more: it must keep (almost) every
// reference greedy token in every dtype.
constexpr char kSharedModel[] = "aidreams-260k";
constexpr double kSharedModelGreedyAgreement = 0.99;

class WeightDTypeAccuracyTest : public ::testing::TestWithParam<DTypeBounds> {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<kernels::Backend>> backend =
        kernels::CreateCpuBackend({.weight_dtype = GetParam().dtype});
    ASSERT_OK(backend);
    backend_ = *std::move(backend);
    absl::StatusOr<std::vector<test_support::GoldenCase>> models = test_support::LoadModelCases();
    ASSERT_OK(models);
    models_ = *std::move(models);
    absl::StatusOr<std::vector<test_support::GoldenCase>> adapters =
        test_support::LoadAdapterCases();
    ASSERT_OK(adapters);
    adapters_ = *std::move(adapters);
  }

  LlamaModel& Model(const std::string& name) {
    auto it = loaded_.find(name);
    if (it == loaded_.end()) {
      std::string dir;
      for (const test_support::GoldenCase& c : models_) {
        if (c.name == name) dir = c.model_dir;
      }
      absl::StatusOr<std::unique_ptr<LlamaModel>> model = LlamaModel::Load(backend_.get(), dir, {});
      EXPECT_TRUE(model.ok()) << name << ": " << model.status();
      it = loaded_.emplace(name, *std::move(model)).first;
    }
    return *it->second;
  }

  std::unique_ptr<adapters::DeviceAdapter> Adapter(const test_support::GoldenCase& c) {
    absl::StatusOr<adapters::LoraAdapter> host =
        adapters::LoadLoraAdapter(c.adapter_dir, Model(c.base).adapter_shape(), {.max_rank = 64});
    EXPECT_TRUE(host.ok()) << c.name << ": " << host.status();
    const adapters::BaseWeights base = Model(c.base).base_weights();
    absl::StatusOr<std::unique_ptr<adapters::DeviceAdapter>> device =
        adapters::DeviceAdapter::Upload(backend_.get(), *host, &base);
    EXPECT_OK(device);
    return *std::move(device);
  }

  std::vector<float> Prefill(LlamaModel& model, const std::vector<int32_t>& ids,
                             const AdapterChoice& choice, const MergedWeights* merged = nullptr) {
    test_support::PagedTestCache cache(backend_.get(), model.kv_shape(), 1, ids.size());
    ForwardInput in = test_support::PrefillAll({ids}, cache);
    in.adapters = {choice};
    in.merged = merged;
    std::vector<float> logits;
    const absl::Status status = model.Forward(in, cache.view(), &logits);
    EXPECT_OK(status);
    return logits;
  }

  std::unique_ptr<kernels::Backend> backend_;
  std::vector<test_support::GoldenCase> models_;
  std::vector<test_support::GoldenCase> adapters_;
  std::map<std::string, std::unique_ptr<LlamaModel>> loaded_;
};

// max |a - b| / max |reference|.
double RelativeError(const std::vector<float>& got, const std::vector<float>& reference) {
  double scale = 0;
  for (float v : reference) scale = std::max(scale, std::abs(double(v)));
  return test_support::MaxAbsDiff(got.data(), reference.data(), got.size()) / scale;
}

TEST_P(WeightDTypeAccuracyTest, ModelLogitsStayNearTheFloat32Reference) {
  const DTypeBounds& bounds = GetParam();
  for (const test_support::GoldenCase& c : models_) {
    LlamaModel& model = Model(c.name);
    double worst = 0;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      const std::vector<float> logits = Prefill(model, p.ids, {});
      ASSERT_EQ(logits.size(), p.logits.size()) << c.name;
      worst = std::max(worst, RelativeError(logits, p.logits));
    }
    std::printf("%s %s: logits within %.3g of the reference\n", kernels::DTypeName(bounds.dtype),
                c.name.c_str(), worst);
    EXPECT_LE(worst, bounds.model_logits) << c.name;
  }
}

// Teacher-forced: at every position of prompt + reference greedy
// continuation, whether the model's top token is the reference's next one.
TEST_P(WeightDTypeAccuracyTest, GreedyTokensAgreeWithTheReference) {
  const DTypeBounds& bounds = GetParam();
  for (const test_support::GoldenCase& c : models_) {
    LlamaModel& model = Model(c.name);
    const int64_t vocab = model.config().vocab_size;
    int64_t agree = 0, total = 0;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      std::vector<int32_t> ids = p.ids;
      ids.insert(ids.end(), p.greedy.begin(), p.greedy.end() - 1);
      if (static_cast<int64_t>(ids.size()) > model.config().max_position_embeddings) continue;
      const std::vector<float> logits = Prefill(model, ids, {});
      for (size_t i = 0; i < p.greedy.size(); ++i) {
        const float* row = logits.data() + (p.ids.size() - 1 + i) * vocab;
        const int32_t top = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
        agree += top == p.greedy[i];
        ++total;
      }
    }
    if (total == 0) continue;
    const double share = static_cast<double>(agree) / total;
    std::printf("%s %s: %lld of %lld greedy tokens agree (%.3f)\n",
                kernels::DTypeName(bounds.dtype), c.name.c_str(), static_cast<long long>(agree),
                static_cast<long long>(total), share);
    EXPECT_GE(share, bounds.greedy_agreement) << c.name;
    if (c.name == kSharedModel) EXPECT_GE(share, kSharedModelGreedyAgreement);
  }
}

TEST_P(WeightDTypeAccuracyTest, AdaptersUnmergedAndMergedStayNearTheReference) {
  const DTypeBounds& bounds = GetParam();
  for (const test_support::GoldenCase& c : adapters_) {
    LlamaModel& model = Model(c.base);
    const std::unique_ptr<adapters::DeviceAdapter> adapter = Adapter(c);
    const AdapterChoice choice{adapter.get(), 1.0f};
    absl::StatusOr<std::unique_ptr<MergedWeights>> merged = model.Merge(choice);
    ASSERT_OK(merged);
    double unmerged_error = 0, merged_error = 0, between = 0;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      const std::vector<float> unmerged = Prefill(model, p.ids, choice);
      const std::vector<float> on_merged = Prefill(model, p.ids, choice, merged->get());
      unmerged_error = std::max(unmerged_error, RelativeError(unmerged, p.logits));
      merged_error = std::max(merged_error, RelativeError(on_merged, p.logits));
      between = std::max(between, RelativeError(on_merged, unmerged));
    }
    std::printf("%s %s: unmerged %.3g, merged %.3g of the reference; merged vs unmerged %.3g\n",
                kernels::DTypeName(bounds.dtype), c.name.c_str(), unmerged_error, merged_error,
                between);
    EXPECT_LE(unmerged_error, bounds.adapter_logits) << c.name;
    EXPECT_LE(merged_error, bounds.adapter_logits) << c.name;
    EXPECT_LE(between, bounds.merged_vs_unmerged) << c.name;
  }
}

// Measured worst cases (x86-64 with AVX-512), model / adapter / merged vs
// unmerged / greedy: bf16 0.034 / 0.035 / 0.021 / 0.977; f16 0.0026 /
// 0.013 / 0.0031 / 0.996; int8 with AVX-512 VNNI (x rounded to int8 too)
// 0.100 / 0.146 / 0.132 / 0.918, without (dequantized weights, float32 x)
// 0.089 / 0.164 / 0.058 / 0.941. The shared trained model picks every
// reference greedy token in every dtype (int8: logits within 0.03).
INSTANTIATE_TEST_SUITE_P(DTypes, WeightDTypeAccuracyTest,
                         ::testing::Values(DTypeBounds{DType::kBF16, 0.07, 0.07, 0.05, 0.95},
                                           DTypeBounds{DType::kF16, 0.006, 0.03, 0.008, 0.98},
                                           DTypeBounds{DType::kQ8, 0.2, 0.3, 0.26, 0.85}),
                         [](const auto& info) { return kernels::DTypeName(info.param.dtype); });

}  // namespace
}  // namespace loraserve::model
