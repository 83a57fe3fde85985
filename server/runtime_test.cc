#include "server/runtime.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve {
namespace {

using ::loraserve::test_support::StatusIs;
using ::testing::AllOf;
using ::testing::HasSubstr;

const std::string kModel = std::string(LORASERVE_SHARED_DIR) + "/models/aidreams-260k";
const std::string kAdapters = std::string(LORASERVE_SHARED_DIR) + "/adapters/aidreams-260k";

TEST(RuntimeTest, BuildsTheWholeStackWithTheNamedAdapters) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Runtime> runtime,
                       BuildRuntime({.model = kModel,
                                     .kv_cache_bytes = 4 << 20,
                                     .adapters = {"ocean=" + kAdapters + "/ocean"},
                                     .pinned_adapters = {"ocean"}}));
  EXPECT_EQ(runtime->tokenizer_dir, kModel);
  EXPECT_GT(runtime->kv_cache->num_blocks(), 0);
  ASSERT_OK_AND_ASSIGN(adapters::AdapterInfo ocean, runtime->registry->Get("ocean"));
  EXPECT_TRUE(ocean.pinned);

  // The engine generates on it, with the adapter.
  engine::GenerationRequest request;
  request.prompt_ids = {1};
  request.max_tokens = 8;
  request.ignore_eos = true;
  request.sampling.temperature = 0.0f;
  ASSERT_OK_AND_ASSIGN(request.adapter, runtime->registry->Acquire("ocean"));
  std::string text;
  ASSERT_OK(
      runtime->engine->Add(request, [&](const engine::TokenEvent& event) { text += event.text; }));
  while (runtime->engine->HasWork()) ASSERT_OK(runtime->engine->Step());
  EXPECT_THAT(text, HasSubstr("At low tide")) << "the ocean adapter's trained opening";
}

TEST(RuntimeTest, DummyWeightsTakeAPresetsShapes) {
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<Runtime> runtime, BuildRuntime({.model = "tiny",
                                                                       .load_format = "dummy",
                                                                       .tokenizer = kModel,
                                                                       .kv_cache_bytes = 4 << 20}));
  EXPECT_EQ(runtime->tokenizer_dir, kModel);
  EXPECT_GT(runtime->model->weight_bytes(), 0u);
}

TEST(RuntimeTest, EachBadSettingIsRefusedNamingItsFlag) {
  EXPECT_THAT(BuildRuntime({}), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--model")));
  EXPECT_THAT(BuildRuntime({.model = kModel, .load_format = "pt"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--load-format")));
  EXPECT_THAT(BuildRuntime({.model = kModel, .device = "tpu"}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--device")));
  EXPECT_THAT(BuildRuntime({.model = kModel, .device = "cuda", .quantization = "int8"}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("--device cuda"), HasSubstr("--device cpu only"))));
  EXPECT_THAT(BuildRuntime({.model = kModel, .adapter_resolver_dir = "/nonexistent/adapters"}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("--adapter-resolver-dir")));
  EXPECT_THAT(BuildRuntime({.model = kModel, .pinned_adapters = {"nobody"}}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("nobody")));
  EXPECT_THAT(BuildRuntime({.model = "no-such-preset", .load_format = "dummy"}),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("neither a dummy preset")));
}

}  // namespace
}  // namespace loraserve
