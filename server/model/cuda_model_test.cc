// Whole forward passes on the CUDA backend against the CPU backend: the
// shared model (base, mixed adapter batches, merged weights, step graphs),
// dummy presets with the shapes of real models, and the seeded golden
// models. Errors are relative (‖cuda − cpu‖ / ‖cpu‖) with bounds per weight
// dtype. Without a GPU (or without CUDA in the build) every case skips and
// says why. The op-by-op comparison is kernels/backend_parity_test.cc.
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "adapters/device_adapter.h"
#include "formats/model_config.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"
#include "tests/support/backend_test_util.h"
#include "tests/support/forward_harness.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using kernels::Backend;
using test_support::CudaCase;
using test_support::kBf16Bound;
using test_support::RelativeError;

// Whole forward passes with bf16 weights against the float32 CPU: every GEMM
// rounds its weights (2^-9) and its input rows to bf16, layer after layer.
// A first estimate, to be confirmed by the first GPU run.
constexpr double kBf16ModelBound = 3e-2;
// Whole forward passes in float32 on both sides: only summation order differs.
constexpr double kF32ModelBound = 1e-4;

using CudaModelTest = test_support::CudaAgainstCpuTest;

std::string SharedModel() { return std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k"; }

std::vector<std::vector<int32_t>> Prompts(int64_t vocab) {
  std::mt19937 rng(70);
  std::uniform_int_distribution<int32_t> id(3, static_cast<int32_t>(vocab - 1));
  std::vector<std::vector<int32_t>> prompts;
  for (const int len : {1, 9, 23, 40}) {
    std::vector<int32_t> p = {1};
    while (static_cast<int>(p.size()) < len) p.push_back(id(rng));
    prompts.push_back(p);
  }
  return prompts;
}

// Prefill of `seqs` (logits for every token), then one decode step per
// sequence (logits appended), all with `adapters`.
std::vector<float> PrefillAndDecode(Backend& backend, model::LlamaModel& model,
                                    const std::vector<std::vector<int32_t>>& seqs,
                                    const std::vector<model::AdapterChoice>& adapters,
                                    const model::MergedWeights* merged = nullptr) {
  size_t longest = 0;
  for (const auto& s : seqs) longest = std::max(longest, s.size());
  test_support::PagedTestCache cache(&backend, model.kv_shape(), seqs.size(), longest + 1);
  model::ForwardInput in = test_support::PrefillAll(seqs, cache);
  in.adapters = adapters;
  in.merged = merged;
  std::vector<float> logits;
  absl::Status status = model.Forward(in, cache.view(), &logits);
  EXPECT_OK(status);
  model::ForwardInput decode;
  decode.max_blocks_per_seq = in.max_blocks_per_seq;
  decode.block_tables = in.block_tables;
  decode.query_start = {0};
  for (int32_t s = 0; s < static_cast<int32_t>(seqs.size()); ++s) {
    const int32_t pos = static_cast<int32_t>(seqs[s].size());
    decode.tokens.push_back(seqs[s][pos / 2]);
    decode.positions.push_back(pos);
    decode.slot_mapping.push_back(cache.Block(s, pos / test_support::kTestBlockSize) *
                                      test_support::kTestBlockSize +
                                  pos % test_support::kTestBlockSize);
    decode.logit_rows.push_back(s);
    decode.query_start.push_back(s + 1);
    decode.context_lens.push_back(pos + 1);
  }
  decode.adapters = adapters;
  decode.merged = merged;
  std::vector<float> decoded;
  status = model.Forward(decode, cache.view(), &decoded);
  EXPECT_OK(status);
  logits.insert(logits.end(), decoded.begin(), decoded.end());
  return logits;
}

TEST_F(CudaModelTest, SharedModelLogitsMatchCpu) {
  auto cpu_model = model::LlamaModel::Load(cpu_.get(), SharedModel(), {});
  ASSERT_OK(cpu_model);
  const auto prompts = Prompts((*cpu_model)->config().vocab_size);
  const std::vector<float> ref = PrefillAndDecode(*cpu_, **cpu_model, prompts, {});
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    auto cuda_model = model::LlamaModel::Load(c.backend.get(), SharedModel(), {});
    ASSERT_OK(cuda_model);
    const std::vector<float> logits = PrefillAndDecode(*c.backend, **cuda_model, prompts, {});
    EXPECT_LE(RelativeError(logits, ref), c.bf16 ? kBf16ModelBound : kF32ModelBound);
  }
}

// The seeded HF models of the golden set (GQA, biases, llama3 rope, f16/bf16
// checkpoints, explicit head_dim) on the float32 CUDA backend.
// Dummy presets (random weights with the shapes of real models: GQA, llama3
// rope, a 128k vocabulary), cut to two layers so the CPU reference is quick.
TEST_F(CudaModelTest, DummyPresetLogitsMatchCpu) {
  for (const char* preset : {"tiny", "llama-3.2-1b"}) {
    SCOPED_TRACE(preset);
    absl::StatusOr<formats::ModelConfig> config = formats::DummyPreset(preset);
    ASSERT_OK(config);
    config->num_hidden_layers = std::min<int64_t>(config->num_hidden_layers, 2);
    auto cpu_model = model::LlamaModel::CreateDummy(cpu_.get(), *config, /*seed=*/7, {});
    ASSERT_OK(cpu_model);
    const auto prompts = Prompts(config->vocab_size);
    const std::vector<float> ref = PrefillAndDecode(*cpu_, **cpu_model, prompts, {});
    for (CudaCase& c : cases_) {
      SCOPED_TRACE(c.name);
      auto cuda_model = model::LlamaModel::CreateDummy(c.backend.get(), *config, /*seed=*/7, {});
      ASSERT_OK(cuda_model);
      const std::vector<float> logits = PrefillAndDecode(*c.backend, **cuda_model, prompts, {});
      EXPECT_LE(RelativeError(logits, ref), c.bf16 ? kBf16ModelBound : kF32ModelBound);
    }
  }
}

TEST_F(CudaModelTest, GoldenModelsMatchCpu) {
  auto cases = test_support::LoadModelCases();
  ASSERT_OK(cases);
  CudaCase& c = cases_[1];
  for (const test_support::GoldenCase& g : *cases) {
    SCOPED_TRACE(g.name);
    auto cpu_model = model::LlamaModel::Load(cpu_.get(), g.model_dir, {});
    ASSERT_OK(cpu_model);
    auto cuda_model = model::LlamaModel::Load(c.backend.get(), g.model_dir, {});
    ASSERT_OK(cuda_model);
    const std::vector<std::vector<int32_t>> seqs = {g.prompts[0].ids};
    EXPECT_LE(RelativeError(PrefillAndDecode(*c.backend, **cuda_model, seqs, {}),
                            PrefillAndDecode(*cpu_, **cpu_model, seqs, {})),
              kF32ModelBound);
  }
}

class CudaLoraTest : public CudaModelTest {
 protected:
  // The shared model with every shared adapter, on `backend`.
  static test_support::SharedModel Load(Backend& backend) {
    absl::StatusOr<std::vector<std::string>> names = test_support::SharedAdapterNames();
    EXPECT_OK(names);
    if (!names.ok()) return {};
    absl::StatusOr<test_support::SharedModel> shared =
        test_support::LoadSharedModel(&backend, *names);
    EXPECT_OK(shared);
    if (!shared.ok()) return {};
    return std::move(*shared);
  }

  // A batch of the prompts, each with an adapter in turn (every third on the
  // base, one at half strength), as choices into `adapters`.
  static std::vector<model::AdapterChoice> Choices(
      const std::vector<std::unique_ptr<adapters::DeviceAdapter>>& adapters, size_t n) {
    std::vector<model::AdapterChoice> choices;
    for (size_t i = 0; i < n; ++i) {
      if (i % 3 == 2) {
        choices.push_back({});
      } else {
        choices.push_back({adapters[i % adapters.size()].get(), i == 1 ? 0.5f : 1.0f});
      }
    }
    return choices;
  }
};

TEST_F(CudaLoraTest, MixedAdapterBatchMatchesCpu) {
  test_support::SharedModel cpu = Load(*cpu_);
  ASSERT_NE(cpu.model, nullptr);
  ASSERT_GE(cpu.adapters.size(), 4u);
  std::vector<std::vector<int32_t>> prompts = Prompts(cpu.model->config().vocab_size);
  const auto more = Prompts(100);
  prompts.insert(prompts.end(), more.begin(), more.end());
  const std::vector<float> ref =
      PrefillAndDecode(*cpu_, *cpu.model, prompts, Choices(cpu.adapters, prompts.size()));
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel cuda = Load(*c.backend);
    ASSERT_NE(cuda.model, nullptr);
    const std::vector<float> logits =
        PrefillAndDecode(*c.backend, *cuda.model, prompts, Choices(cuda.adapters, prompts.size()));
    EXPECT_LE(RelativeError(logits, ref), c.bf16 ? kBf16ModelBound : kF32ModelBound);
  }
}

// On the GPU too, each request of a batch that mixes adapters (and the base,
// and a half-scale request) gets the logits it gets alone: prefill rows and
// its decode row. cuBLAS is not batch-invariant, so only summation order may
// differ.
TEST_F(CudaLoraTest, MixedBatchEqualsEachRequestAlone) {
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel shared = Load(*c.backend);
    ASSERT_NE(shared.model, nullptr);
    ASSERT_GE(shared.adapters.size(), 4u);
    const int64_t vocab = shared.model->config().vocab_size;
    const auto prompts = Prompts(vocab);
    const std::vector<model::AdapterChoice> choices = Choices(shared.adapters, prompts.size());
    const std::vector<float> batched =
        PrefillAndDecode(*c.backend, *shared.model, prompts, choices);
    size_t total_tokens = 0;
    for (const auto& p : prompts) total_tokens += p.size();
    size_t prefill_offset = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      SCOPED_TRACE(i);
      const std::vector<float> alone =
          PrefillAndDecode(*c.backend, *shared.model, {prompts[i]}, {choices[i]});
      // The batch's rows of request i, laid out as alone: prefill, then decode.
      std::vector<float> mine(batched.begin() + prefill_offset,
                              batched.begin() + prefill_offset + prompts[i].size() * vocab);
      const auto decode_row = batched.begin() + (total_tokens + i) * vocab;
      mine.insert(mine.end(), decode_row, decode_row + vocab);
      EXPECT_LE(RelativeError(mine, alone), c.bf16 ? kBf16Bound : kF32ModelBound);
      prefill_offset += prompts[i].size() * vocab;
    }
  }
}

TEST_F(CudaLoraTest, MergedMatchesUnmerged) {
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel cuda = Load(*c.backend);
    ASSERT_NE(cuda.model, nullptr);
    ASSERT_GE(cuda.adapters.size(), 2u);
    const auto prompts = Prompts(cuda.model->config().vocab_size);
    const model::AdapterChoice hot{cuda.adapters[0].get(), 1.0f};
    auto merged = cuda.model->Merge(hot);
    ASSERT_OK(merged);
    // All on the hot adapter, then a mix whose others get low-rank corrections.
    const std::vector<model::AdapterChoice> all_hot(prompts.size(), hot);
    const std::vector<model::AdapterChoice> mixed = {hot, {cuda.adapters[1].get(), 1.0f}, {}, hot};
    for (const auto& choices : {all_hot, mixed}) {
      const std::vector<float> unmerged =
          PrefillAndDecode(*c.backend, *cuda.model, prompts, choices);
      const std::vector<float> on_merged =
          PrefillAndDecode(*c.backend, *cuda.model, prompts, choices, merged->get());
      // bf16: the merged weights are rounded once more than base + LoRA.
      EXPECT_LE(RelativeError(on_merged, unmerged), c.bf16 ? kBf16ModelBound : kF32ModelBound);
    }
  }
}

// Decode steps as step graphs (CUDA graphs): captured once per padded shape,
// then replayed with other tokens, positions and adapter mixes, and a smaller
// batch in another bucket. Each step equals the same step run operation by
// operation on a twin cache; most steps must have been replays.
TEST_F(CudaLoraTest, DecodeStepGraphsMatchEagerSteps) {
  constexpr int kSteps = 8;
  for (CudaCase& c : cases_) {
    SCOPED_TRACE(c.name);
    test_support::SharedModel shared = Load(*c.backend);
    ASSERT_NE(shared.model, nullptr);
    ASSERT_GE(shared.adapters.size(), 4u);
    std::vector<std::vector<int32_t>> prompts = Prompts(shared.model->config().vocab_size);
    const auto more = Prompts(100);
    prompts.insert(prompts.end(), more.begin(), more.end());
    const size_t n = prompts.size();
    size_t longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, p.size());
    test_support::PagedTestCache eager_cache(c.backend.get(), shared.model->kv_shape(), n,
                                             longest + kSteps);
    test_support::PagedTestCache graph_cache(c.backend.get(), shared.model->kv_shape(), n,
                                             longest + kSteps);
    shared.model->set_step_graphs(false);
    for (auto* cache : {&eager_cache, &graph_cache}) {
      model::ForwardInput prefill = test_support::PrefillAll(prompts, *cache);
      prefill.adapters = Choices(shared.adapters, n);
      std::vector<float> logits;
      ASSERT_OK(shared.model->Forward(prefill, cache->view(), &logits));
    }
    const int64_t graph_steps_before = shared.model->step_graph_stats().graph_steps;
    for (int step = 0; step < kSteps; ++step) {
      SCOPED_TRACE(step);
      // From step 5 on the last sequence is done: a smaller padded batch.
      const size_t active = step < 5 ? n : n - 1;
      std::vector<int32_t> tokens, positions;
      std::vector<model::AdapterChoice> choices = Choices(shared.adapters, n + step);
      choices.erase(choices.begin(), choices.begin() + step);  // another mix each step
      choices.resize(active);
      for (size_t s = 0; s < active; ++s) {
        tokens.push_back(prompts[s][(step * 7 + s) % prompts[s].size()]);
        positions.push_back(static_cast<int32_t>(prompts[s].size()) + step);
      }
      std::vector<float> eager, graphed;
      model::ForwardInput in = test_support::DecodeOne(tokens, positions, eager_cache);
      in.adapters = choices;
      shared.model->set_step_graphs(false);
      ASSERT_OK(shared.model->Forward(in, eager_cache.view(), &eager));
      in = test_support::DecodeOne(tokens, positions, graph_cache);
      in.adapters = choices;
      shared.model->set_step_graphs(true);
      absl::Status status = shared.model->Forward(in, graph_cache.view(), &graphed);
      ASSERT_OK(status);
      // Only the GEMMs' batch size differs (padding): summation order.
      EXPECT_LE(RelativeError(graphed, eager), c.bf16 ? kBf16Bound : kF32ModelBound);
    }
    const model::LlamaModel::StepGraphStats& stats = shared.model->step_graph_stats();
    // Two shapes, each captured (perhaps after one try that had to allocate
    // first) and replayed on the other steps.
    EXPECT_GE(stats.graph_steps - graph_steps_before, kSteps - 4)
        << stats.eager_fallbacks << " steps fell back to eager";
  }
}

}  // namespace
}  // namespace loraserve::model
