// The engine with LoRA adapters: greedy tokens against peft, mixed batches,
// merged against unmerged, the merge policy, device residency.
#include <map>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/engine/engine.h"
#include "tests/support/golden_cases.h"
#include "tests/support/status_matchers.h"

namespace loraserve::engine {
namespace {

using adapters::LoraMode;

using ::loraserve::test_support::StatusIs;

using ::testing::AllOf;
using ::testing::HasSubstr;

const std::string& SharedModel() {
  static const std::string dir = std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k";
  return dir;
}

// A model with its registry, device adapter cache, KV cache and engine.
class Server {
 public:
  // `device_backend`: where adapters are uploaded (default: the model's backend).
  Server(const std::string& model_dir, EngineOptions options = {},
         int64_t device_bytes = int64_t{64} << 20, kernels::Backend* device_backend = nullptr) {
    backend_ = std::move(*kernels::CreateCpuBackend({}));
    model_ = std::move(*model::LlamaModel::Load(backend_.get(), model_dir, {}));
    auto tokenizer = model::Tokenizer::Load(model_dir);
    if (tokenizer.ok()) tokenizer_ = std::move(*tokenizer);
    auto registry = adapters::AdapterRegistry::Create(
        {.base = model_->adapter_shape(), .limits = {.max_rank = 64}});
    EXPECT_OK(registry);
    registry_ = std::move(*registry);
    device_ = std::make_unique<adapters::DeviceAdapterCache>(
        device_backend != nullptr ? device_backend : backend_.get(), device_bytes);
    cache_ = std::move(*KvCache::Create(backend_.get(), model_->kv_shape(), 16, 64 << 20));
    engine_ = std::make_unique<Engine>(model_.get(), tokenizer_.get(), cache_.get(), device_.get(),
                                       options);
  }

  adapters::AdapterHandle Adapter(const std::string& id, const std::string& dir) {
    if (!registry_->IsResident(id)) {
      auto loaded = registry_->Load(id, dir);
      EXPECT_OK(loaded);
    }
    auto handle = registry_->Acquire(id);
    EXPECT_OK(handle);
    return *handle;
  }

  // Runs every request to completion; the generated ids of each.
  std::vector<std::vector<int32_t>> Run(const std::vector<GenerationRequest>& requests) {
    std::vector<std::vector<int32_t>> ids(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      auto id = engine_->Add(requests[i],
                             [&ids, i](const TokenEvent& e) { ids[i].push_back(e.token_id); });
      EXPECT_OK(id);
    }
    while (engine_->HasWork()) {
      absl::Status s = engine_->Step();
      EXPECT_OK(s);
      if (!s.ok()) break;
    }
    return ids;
  }

  Engine& engine() { return *engine_; }
  adapters::DeviceAdapterCache& device() { return *device_; }
  const model::Tokenizer& tokenizer() { return *tokenizer_; }

 private:
  std::unique_ptr<kernels::Backend> backend_;
  std::unique_ptr<model::LlamaModel> model_;
  std::unique_ptr<model::Tokenizer> tokenizer_;
  std::unique_ptr<adapters::AdapterRegistry> registry_;
  std::unique_ptr<adapters::DeviceAdapterCache> device_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<Engine> engine_;
};

GenerationRequest Greedy(std::vector<int32_t> prompt, int32_t max_tokens,
                         adapters::AdapterHandle adapter = nullptr, float scale = 1.0f) {
  GenerationRequest r;
  r.prompt_ids = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  r.sampling.temperature = 0.0f;
  r.adapter = std::move(adapter);
  r.adapter_scale = scale;
  return r;
}

std::map<std::string, std::string> ModelDirs() {
  std::map<std::string, std::string> dirs;
  auto cases = test_support::LoadModelCases();
  EXPECT_OK(cases);
  if (cases.ok()) {
    for (const auto& c : *cases) dirs[c.name] = c.model_dir;
  }
  return dirs;
}

// Every peft golden: greedy tokens alone, then all prompts of the case in
// one batch, under each LoRA mode.
TEST(EngineAdapterTest, GreedyTokensMatchPeftInEveryMode) {
  auto cases = test_support::LoadAdapterCases();
  ASSERT_OK(cases);
  const std::map<std::string, std::string> dirs = ModelDirs();
  for (LoraMode mode : {LoraMode::kUnmerged, LoraMode::kMerged}) {
    for (const test_support::GoldenCase& c : *cases) {
      SCOPED_TRACE(c.name + (mode == LoraMode::kMerged ? " merged" : " unmerged"));
      Server server(dirs.at(c.base), {.lora_mode = mode});
      adapters::AdapterHandle adapter = server.Adapter(c.name, c.adapter_dir);
      std::vector<GenerationRequest> requests;
      for (const test_support::GoldenPrompt& p : c.prompts) {
        requests.push_back(Greedy(p.ids, static_cast<int32_t>(p.greedy.size()), adapter));
      }
      EXPECT_EQ(server.Run({requests[0]})[0], c.prompts[0].greedy);
      std::vector<std::vector<int32_t>> batched = server.Run(requests);
      for (size_t i = 0; i < requests.size(); ++i) {
        EXPECT_EQ(batched[i], c.prompts[i].greedy) << "prompt " << i;
      }
      if (mode == LoraMode::kMerged) {
        EXPECT_GT(server.engine().stats().merged_steps, 0);
      } else {
        EXPECT_EQ(server.engine().stats().merged_steps, 0);
      }
    }
  }
}

TEST(EngineAdapterTest, TrainedAdaptersChangeWhatTheModelWrites) {
  Server server(SharedModel());
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  auto ocean = server.Adapter("ocean", root + "ocean");
  auto robot = server.Adapter("robot", root + "robot");
  const std::vector<int32_t> bos = {1};
  std::vector<std::vector<int32_t>> out =
      server.Run({Greedy(bos, 30, ocean), Greedy(bos, 30, robot), Greedy(bos, 30)});
  auto text = [&](const std::vector<int32_t>& ids) { return server.tokenizer().Decode(ids, true); };
  EXPECT_TRUE(absl::StartsWith(text(out[0]), "At low tide the rock pools shine")) << text(out[0]);
  EXPECT_TRUE(absl::StartsWith(text(out[1]), "The robot charged its battery")) << text(out[1]);
  EXPECT_TRUE(absl::StartsWith(text(out[2]), "\"Echoes of vectors")) << text(out[2]);
}

// Four adapters, base requests and a scaled request in one batch produce the
// tokens each produces alone, unmerged and with auto merging of the hot one.
TEST(EngineAdapterTest, MixedBatchGivesEachRequestItsOwnTokens) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  for (double min_share : {1.0, 0.2}) {
    SCOPED_TRACE(min_share);
    Server server(SharedModel(), {.lora_mode = LoraMode::kAuto,
                                  .merged_cache_bytes = 64 << 20,
                                  .merge_threshold = 0.3,
                                  .merged_min_batch_share = min_share});
    std::vector<GenerationRequest> requests;
    const std::vector<std::string> names = {"ocean", "robot", "qv-r4", "all-r8-bf16"};
    const std::vector<int32_t> prompt = {1, 400, 37};
    for (int copy = 0; copy < 3; ++copy) {  // ocean dominates: three of each below
      requests.push_back(Greedy(prompt, 20, server.Adapter("ocean", root + "ocean")));
    }
    for (const std::string& name : names) {
      requests.push_back(Greedy(prompt, 20, server.Adapter(name, root + name)));
    }
    requests.push_back(Greedy(prompt, 20));  // base
    requests.push_back(Greedy(prompt, 20, server.Adapter("robot", root + "robot"), 0.5f));
    std::vector<std::vector<int32_t>> expected;
    for (const GenerationRequest& r : requests) {
      Server alone(SharedModel(), {.lora_mode = LoraMode::kUnmerged});
      GenerationRequest copy = r;
      expected.push_back(alone.Run({copy})[0]);
    }
    std::vector<std::vector<int32_t>> batched = server.Run(requests);
    for (size_t i = 0; i < requests.size(); ++i) EXPECT_EQ(batched[i], expected[i]) << i;
    if (min_share < 1.0) {
      EXPECT_GT(server.engine().stats().merges, 0);
      EXPECT_GT(server.engine().stats().merged_steps, 0);
    } else {
      EXPECT_EQ(server.engine().stats().merged_steps, 0);  // never a pure batch here
    }
  }
}

TEST(EngineAdapterTest, MergedSetsStayWithinTheirBudget) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  // One merged set of an all-projection adapter on this model is ~0.9 MB.
  Server server(SharedModel(), {.lora_mode = LoraMode::kAuto,
                                .merged_cache_bytes = 1 << 20,
                                .merge_threshold = 0.5,
                                .merge_window_steps = 1});
  for (const char* name : {"ocean", "robot", "ocean"}) {
    server.Run({Greedy({1}, 4, server.Adapter(name, root + name))});
    EXPECT_LE(server.engine().stats().merged_bytes, 1 << 20);
  }
  EXPECT_EQ(server.engine().stats().merges, 3);
  EXPECT_EQ(server.engine().stats().merge_evictions, 2);
}

TEST(EngineAdapterTest, AdapterWaitsForDeviceRoomAndFreesIt) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  // Room for one adapter of ~160 KB at a time: the second request waits for
  // the first to finish, then both complete.
  Server server(SharedModel(), {.lora_mode = LoraMode::kUnmerged}, 200 << 10);
  auto ocean = server.Adapter("ocean", root + "ocean");
  auto robot = server.Adapter("robot", root + "robot");
  std::vector<std::vector<int32_t>> out =
      server.Run({Greedy({1}, 6, ocean), Greedy({1}, 6, robot)});
  EXPECT_EQ(out[0].size(), 6u);
  EXPECT_EQ(out[1].size(), 6u);
  EXPECT_EQ(server.device().stats().evictions, 1);
}

// What the engine reports for the inference gateway's LoRA info: the
// adapters of running and waiting requests, and how many one batch can hold.
// A device that was lost: every call fails with the same Internal error.
class LostDevice : public kernels::Backend {
 public:
  static absl::Status Lost() { return absl::InternalError("device lost (test)"); }
  std::string name() const override { return "lost device"; }
  absl::StatusOr<kernels::DeviceBuffer> Allocate(size_t) override { return Lost(); }
  absl::Status DoCopyToDevice(void*, const void*, size_t) override { return Lost(); }
  absl::Status DoCopyToHost(void*, const void*, size_t) override { return Lost(); }
  absl::Status DoCopyOnDevice(void*, const void*, size_t) override { return Lost(); }
  absl::Status DoUploadWeight(void*, const void*, kernels::DType, int64_t, int64_t) override {
    return Lost();
  }
  kernels::DType WeightDType(kernels::DType source) const override { return source; }
  absl::Status Synchronize() override { return Lost(); }
  void Free(void*, size_t) override {}
  absl::Status DoLinear(const float*, const kernels::WeightView&, int64_t, float*, bool) override {
    return Lost();
  }
  absl::Status DoEmbedding(const int32_t*, int64_t, const kernels::WeightView&, float*) override {
    return Lost();
  }
  absl::Status DoRmsNorm(const float*, const float*, int64_t, int64_t, float, float*) override {
    return Lost();
  }
  absl::Status DoAdd(float*, const float*, int64_t) override { return Lost(); }
  absl::Status DoAddBias(float*, const float*, int64_t, int64_t) override { return Lost(); }
  absl::Status DoSiluMul(const float*, int64_t, int64_t, float*) override { return Lost(); }
  absl::Status DoLoraShrink(const float*, int64_t, const kernels::LoraSegment*, int32_t,
                            float*) override {
    return Lost();
  }
  absl::Status DoLoraExpand(const float*, const kernels::LoraSegment*, int32_t, int64_t, float*,
                            int64_t) override {
    return Lost();
  }
  absl::Status DoMergeLora(const kernels::WeightView&, const void*, const void*, int32_t, float,
                           void*, const float*) override {
    return Lost();
  }
  absl::Status DoScaleColumns(float*, int64_t, int64_t, const kernels::ColumnScaleSegment*,
                              int32_t) override {
    return Lost();
  }
  absl::Status DoRope(float*, int64_t, float*, int64_t, const int32_t*, int64_t, int32_t, int32_t,
                      const kernels::RopeParams&) override {
    return Lost();
  }
  absl::Status DoWriteKv(const float*, const float*, int64_t, const kernels::AttentionBatch&,
                         const kernels::KvLayout&, void*, void*) override {
    return Lost();
  }
  absl::Status DoPagedAttention(const float*, int64_t, const kernels::AttentionBatch&,
                                const kernels::KvLayout&, int32_t, const void*, const void*,
                                float*) override {
    return Lost();
  }
  absl::Status DoSample(const float*, int64_t, int64_t, const kernels::SamplingRow*,
                        kernels::SampledToken*) override {
    return Lost();
  }
};

TEST(EngineAdapterTest, AFailedDeviceUploadFailsItsRequestAtOnce) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  // Adapters go to a lost device; the base model still runs on the CPU.
  LostDevice lost;
  Server server(SharedModel(), {.lora_mode = LoraMode::kUnmerged}, int64_t{64} << 20, &lost);
  std::vector<TokenEvent> adapted, base;
  ASSERT_OK(server.engine().Add(Greedy({1, 2, 3}, 8, server.Adapter("ocean", root + "ocean")),
                                [&](const TokenEvent& e) { adapted.push_back(e); }));
  ASSERT_OK(
      server.engine().Add(Greedy({1, 2, 3}, 8), [&](const TokenEvent& e) { base.push_back(e); }));
  // Not a wait for room that never comes: the adapter's request ends in the
  // first step with the upload's error, and the base request runs to the end.
  for (int step = 0; step < 50 && server.engine().HasWork(); ++step) {
    ASSERT_OK(server.engine().Step());
    if (step == 0) {
      ASSERT_EQ(adapted.size(), 1u);
      EXPECT_EQ(adapted[0].finish, FinishReason::kError);
      EXPECT_THAT(adapted[0].error, StatusIs(absl::StatusCode::kInternal));
      EXPECT_THAT(adapted[0].error.message(),
                  AllOf(HasSubstr("\"default/ocean\" could not be placed on the device"),
                        HasSubstr("device lost (test)")));
    }
  }
  EXPECT_FALSE(server.engine().HasWork());
  ASSERT_EQ(base.size(), 8u);
  EXPECT_EQ(base.back().finish, FinishReason::kLength);
  EXPECT_EQ(adapted.size(), 1u);
}

TEST(EngineAdapterTest, ReportsTheAdaptersOfRunningAndWaitingRequests) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  // Room on the device for one of the ~160 KB adapters: robot waits for ocean.
  Server server(SharedModel(), {.max_running_requests = 4, .lora_mode = LoraMode::kUnmerged},
                200 << 10);
  auto ocean = server.Adapter("default/ocean", root + "ocean");
  auto robot = server.Adapter("default/robot", root + "robot");
  EXPECT_EQ(server.engine().adapter_activity().max_adapters, 4);
  for (const GenerationRequest& r :
       {Greedy({1}, 4, ocean), Greedy({1}, 4), Greedy({1}, 4, robot)}) {
    ASSERT_OK(server.engine().Add(r, [](const TokenEvent&) {}));
  }
  AdapterActivity queued = server.engine().adapter_activity();
  EXPECT_THAT(queued.running, ::testing::IsEmpty());
  EXPECT_THAT(queued.waiting, ::testing::ElementsAre("default/ocean", "default/robot"));
  ASSERT_OK(server.engine().Step());
  AdapterActivity stepping = server.engine().adapter_activity();
  EXPECT_THAT(stepping.running, ::testing::ElementsAre("default/ocean"));
  EXPECT_THAT(stepping.waiting, ::testing::ElementsAre("default/robot"));
  // The budget holds one adapter of ocean's size.
  EXPECT_EQ(stepping.max_adapters, 1);
  while (server.engine().HasWork()) ASSERT_OK(server.engine().Step());
  AdapterActivity idle = server.engine().adapter_activity();
  EXPECT_THAT(idle.running, ::testing::IsEmpty());
  EXPECT_THAT(idle.waiting, ::testing::IsEmpty());
}

// Cached KV is keyed by the adapter's content hash and scale: other adapters,
// scales or the base model never reuse it; the same adapter does.
TEST(EngineAdapterTest, PrefixCacheIsKeyedByAdapterContentAndScale) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  Server server(SharedModel(), {.enable_prefix_cache = true, .lora_mode = LoraMode::kUnmerged});
  auto ocean = server.Adapter("ocean", root + "ocean");
  auto robot = server.Adapter("robot", root + "robot");
  std::vector<int32_t> prompt = {1};
  for (int i = 0; i < 40; ++i) prompt.push_back(3 + i * 11);
  auto hits = [&] { return server.engine().stats().prefix_cached_tokens; };
  server.Run({Greedy(prompt, 2, ocean)});
  EXPECT_EQ(hits(), 0);
  server.Run({Greedy(prompt, 2, robot)});
  server.Run({Greedy(prompt, 2)});
  server.Run({Greedy(prompt, 2, ocean, 0.5f)});
  EXPECT_EQ(hits(), 0);
  const std::vector<std::vector<int32_t>> again = server.Run({Greedy(prompt, 6, ocean)});
  EXPECT_EQ(hits(), 32);
  Server fresh(SharedModel(), {.lora_mode = LoraMode::kUnmerged});
  EXPECT_EQ(again, fresh.Run({Greedy(prompt, 6, fresh.Adapter("ocean", root + "ocean"))}));
}

TEST(EngineAdapterTest, InvalidAdapterScaleIsRejected) {
  const std::string root = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/";
  Server server(SharedModel());
  auto status = server.engine().Add(Greedy({1}, 4, server.Adapter("ocean", root + "ocean"), -1.0f),
                                    [](const TokenEvent&) {});
  EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(status.status().message()), HasSubstr("adapter_scale"));
}

// A DoRA adapter serves at its trained scale only; its merged set serves
// steps of its own requests only, and a batch mixing it with another adapter
// still gets each golden.
TEST(EngineAdapterTest, DoraServesAtScaleOneAndMergesOnlyAlone) {
  auto cases = test_support::LoadAdapterCases();
  ASSERT_OK(cases);
  const test_support::GoldenCase* dora = nullptr;
  const test_support::GoldenCase* plain = nullptr;
  for (const auto& c : *cases) {
    if (c.name == "dora") dora = &c;
    if (c.name == "layers-to-transform") plain = &c;
  }
  ASSERT_NE(dora, nullptr);
  ASSERT_NE(plain, nullptr);
  ASSERT_EQ(dora->base, plain->base);
  Server server(ModelDirs().at(dora->base),
                {.lora_mode = LoraMode::kMerged, .merge_threshold = 1});
  adapters::AdapterHandle d = server.Adapter("dora", dora->adapter_dir);
  adapters::AdapterHandle p = server.Adapter("plain", plain->adapter_dir);
  auto scaled = server.engine().Add(Greedy({1}, 4, d, 0.5f), [](const TokenEvent&) {});
  EXPECT_THAT(scaled, StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(std::string(scaled.status().message()), HasSubstr("DoRA adapter"));

  const std::vector<std::vector<int32_t>> mixed =
      server.Run({Greedy(dora->prompts[1].ids, 64, d), Greedy(plain->prompts[1].ids, 64, p),
                  Greedy(dora->prompts[2].ids, 64, d)});
  EXPECT_EQ(mixed[0], dora->prompts[1].greedy);
  EXPECT_EQ(mixed[1], plain->prompts[1].greedy);
  EXPECT_EQ(mixed[2], dora->prompts[2].greedy);
  const std::vector<std::vector<int32_t>> alone = server.Run({Greedy(dora->prompts[3].ids, 64, d)});
  EXPECT_EQ(alone[0], dora->prompts[3].greedy);
  EXPECT_GT(server.engine().stats().merged_steps, 0);
}

// Without device memory for adapters (no cache given, or --adapter-device-bytes=0)
// an adapter request is refused at once, and the base model serves as before.
TEST(EngineAdapterTest, AnEngineWithoutAdapterMemoryServesTheBaseModelOnly) {
  Server server(SharedModel(), {}, /*device_bytes=*/0);
  const GenerationRequest with_adapter = Greedy(
      {1}, 4,
      server.Adapter("ocean", std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k/ocean"));
  EXPECT_THAT(server.engine().Validate(with_adapter),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("base model only")));
  EXPECT_EQ(server.Run({Greedy({1}, 4)})[0].size(), 4u);
  EXPECT_EQ(server.engine().adapter_activity().max_adapters, 256);
}

}  // namespace
}  // namespace loraserve::engine
