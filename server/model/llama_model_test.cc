#include "server/model/llama_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "formats/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/forward_harness.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::model {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::HasSubstr;
namespace fs = std::filesystem;

using test_support::MaxAbsDiff;
using test_support::PagedTestCache;
using test_support::PrefillAll;

class LlamaModelGoldenTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto backend = kernels::CreateCpuBackend({});
    ASSERT_OK(backend);
    backend_ = std::move(*backend);
    auto cases = test_support::LoadModelCases();
    ASSERT_OK(cases);
    cases_ = std::move(*cases);
    ASSERT_GE(cases_.size(), 6u);
  }
  std::unique_ptr<kernels::Backend> backend_;
  std::vector<test_support::GoldenCase> cases_;
};

TEST_F(LlamaModelGoldenTest, LogitsMatchTransformersAtEveryPosition) {
  for (const test_support::GoldenCase& c : cases_) {
    SCOPED_TRACE(c.name);
    auto model = LlamaModel::Load(backend_.get(), c.model_dir, {});
    ASSERT_OK(model);
    const int64_t vocab = (*model)->config().vocab_size;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      PagedTestCache cache(backend_.get(), (*model)->kv_shape(), 1, p.ids.size());
      std::vector<float> logits;
      ASSERT_OK((*model)->Forward(PrefillAll({p.ids}, cache), cache.view(), &logits));
      ASSERT_EQ(logits.size(), p.ids.size() * vocab);
      EXPECT_LE(MaxAbsDiff(logits.data(), p.logits.data(), logits.size()), 1e-4f)
          << "prompt of " << p.ids.size() << " tokens";
    }
  }
}

TEST_F(LlamaModelGoldenTest, BatchedPrefillEqualsSinglePrefill) {
  for (const test_support::GoldenCase& c : cases_) {
    SCOPED_TRACE(c.name);
    auto model = LlamaModel::Load(backend_.get(), c.model_dir, {});
    ASSERT_OK(model);
    std::vector<std::vector<int32_t>> seqs;
    size_t longest = 0;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      seqs.push_back(p.ids);
      longest = std::max(longest, p.ids.size());
    }
    PagedTestCache cache(backend_.get(), (*model)->kv_shape(), seqs.size(), longest);
    std::vector<float> logits;
    ASSERT_OK((*model)->Forward(PrefillAll(seqs, cache), cache.view(), &logits));
    size_t offset = 0;
    for (const test_support::GoldenPrompt& p : c.prompts) {
      EXPECT_LE(MaxAbsDiff(logits.data() + offset, p.logits.data(), p.logits.size()), 1e-4f);
      offset += p.logits.size();
    }
  }
}

TEST_F(LlamaModelGoldenTest, DecodeStepsReuseTheCache) {
  // Prefill all but the last token, then decode it: its logits must match
  // the golden of the full prompt's last position.
  const test_support::GoldenCase& c = cases_[0];
  auto model = LlamaModel::Load(backend_.get(), c.model_dir, {});
  ASSERT_OK(model);
  const int64_t vocab = (*model)->config().vocab_size;
  for (const test_support::GoldenPrompt& p : c.prompts) {
    if (p.ids.size() < 2) continue;
    PagedTestCache cache(backend_.get(), (*model)->kv_shape(), 1, p.ids.size());
    std::vector<int32_t> head(p.ids.begin(), p.ids.end() - 1);
    std::vector<float> logits;
    ASSERT_OK((*model)->Forward(PrefillAll({head}, cache), cache.view(), &logits));
    ForwardInput step = PrefillAll({p.ids}, cache);
    const int32_t last = static_cast<int32_t>(p.ids.size()) - 1;
    step.tokens = {p.ids[last]};
    step.positions = {last};
    step.slot_mapping = {step.slot_mapping[last]};
    step.query_start = {0, 1};
    step.logit_rows = {0};
    ASSERT_OK((*model)->Forward(step, cache.view(), &logits));
    EXPECT_LE(MaxAbsDiff(logits.data(), p.logits.data() + last * vocab, vocab), 1e-4f);
  }
}

TEST(LlamaModelDummyTest, PresetBuildsAndRuns) {
  auto backend = kernels::CreateCpuBackend({});
  ASSERT_OK(backend);
  auto config = formats::DummyPreset("tiny");
  ASSERT_OK(config);
  auto model = LlamaModel::CreateDummy(backend->get(), *config, 7, {});
  ASSERT_OK(model);
  PagedTestCache cache(backend->get(), (*model)->kv_shape(), 1, 8);
  std::vector<float> logits;
  ASSERT_OK((*model)->Forward(PrefillAll({{1, 2, 3, 4}}, cache), cache.view(), &logits));
  ASSERT_EQ(logits.size(), 4 * config->vocab_size);
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
}

// Malformed checkpoints: a copy of the shared model's config with a
// hand-written safetensors file.
class MalformedModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           absl::StrCat("loraserve_malformed_", ::getpid(), "_",
                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    fs::copy_file(fs::path(LORASERVE_SHARED_DIR) / "models/aidreams-260k/config.json",
                  dir_ / "config.json", fs::copy_options::overwrite_existing);
    auto backend = kernels::CreateCpuBackend({1});
    ASSERT_OK(backend);
    backend_ = std::move(*backend);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Every tensor of the shared model with its expected shape, as F32 zeros.
  std::vector<formats::SerializedTensor> ValidTensors() {
    std::vector<formats::SerializedTensor> t;
    auto add = [&t](const std::string& name, std::vector<int64_t> shape) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      t.push_back({name, "F32", shape, std::string(n * 4, '\0')});
    };
    add("model.embed_tokens.weight", {512, 64});
    for (int l = 0; l < 4; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      add(p + "input_layernorm.weight", {64});
      add(p + "post_attention_layernorm.weight", {64});
      for (const char* m : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
        add(p + "self_attn." + m + ".weight", {64, 64});
      }
      add(p + "mlp.gate_proj.weight", {172, 64});
      add(p + "mlp.up_proj.weight", {172, 64});
      add(p + "mlp.down_proj.weight", {64, 172});
    }
    add("model.norm.weight", {64});
    return t;
  }
  absl::Status LoadWith(const std::vector<formats::SerializedTensor>& tensors) {
    EXPECT_OK(formats::WriteSafetensors(dir_ / "model.safetensors", tensors));
    return LlamaModel::Load(backend_.get(), dir_, {}).status();
  }

  fs::path dir_;
  std::unique_ptr<kernels::Backend> backend_;
};

TEST_F(MalformedModelTest, ValidFileLoads) { EXPECT_OK(LoadWith(ValidTensors())); }

TEST_F(MalformedModelTest, MissingTensorIsNamed) {
  auto tensors = ValidTensors();
  tensors.erase(tensors.begin() + 5);
  const std::string missing = ValidTensors()[5].name;
  absl::Status s = LoadWith(tensors);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(std::string(s.message()), HasSubstr(missing));
}

TEST_F(MalformedModelTest, WrongShapeIsNamed) {
  auto tensors = ValidTensors();
  tensors[3].shape = {32, 128};
  absl::Status s = LoadWith(tensors);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(s.message()), HasSubstr(tensors[3].name));
  EXPECT_THAT(std::string(s.message()), HasSubstr("[32, 128]"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected [64, 64]"));
}

TEST_F(MalformedModelTest, UnexpectedTensorIsNamed) {
  auto tensors = ValidTensors();
  tensors.push_back({"model.layers.9.mlp.extra.weight", "F32", {2}, std::string(8, '\0')});
  absl::Status s = LoadWith(tensors);
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("unexpected tensor model.layers.9.mlp.extra.weight"));
}

TEST_F(MalformedModelTest, MissingConfigIsNamed) {
  fs::remove(dir_ / "config.json");
  absl::Status s = LoadWith(ValidTensors());
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(std::string(s.message()), HasSubstr("config.json"));
}

TEST_F(MalformedModelTest, TruncatedFileIsAnErrorNotACrash) {
  const std::string bytes = formats::SerializeSafetensors(ValidTensors());
  std::ofstream(dir_ / "model.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  absl::Status s = LlamaModel::Load(backend_.get(), dir_, {}).status();
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.safetensors"));
}

}  // namespace
}  // namespace loraserve::model
