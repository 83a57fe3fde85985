#include "adapters/merge_policy.h"

#include <map>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::adapters {
namespace {

using ::loraserve::test_support::StatusIs;
using ::testing::ElementsAre;
using ::testing::IsEmpty;
using ::testing::Optional;

using Tokens = std::map<std::string, int64_t>;

TEST(MergePolicyTest, ParsesTheModeFlag) {
  EXPECT_EQ(ParseLoraMode("auto").value(), LoraMode::kAuto);
  EXPECT_EQ(ParseLoraMode("merged").value(), LoraMode::kMerged);
  EXPECT_EQ(ParseLoraMode("unmerged").value(), LoraMode::kUnmerged);
  EXPECT_THAT(ParseLoraMode("fused"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(MergePolicyTest, UnmergedModeNeverMerges) {
  MergePolicy policy({.mode = LoraMode::kUnmerged, .cache_bytes = 1 << 30});
  EXPECT_EQ(policy.Choose({{"a", 10}}, 10), std::nullopt);
}

TEST(MergePolicyTest, MergedModeMergesOnlyASingleAdapterStepWhateverTheBudget) {
  MergePolicy policy({.mode = LoraMode::kMerged, .cache_bytes = 0});
  EXPECT_EQ(policy.Choose({{"a", 6}}, 8), std::nullopt) << "two tokens are the base model's";
  EXPECT_EQ(policy.Choose({{"a", 3}, {"b", 5}}, 8), std::nullopt);
  EXPECT_THAT(policy.Choose({{"a", 8}}, 8), Optional(std::string("a")));
  MergePolicy::Room room = policy.MakeRoom(100);
  EXPECT_TRUE(room.fits) << "the step needs the set: it is kept over the budget";
  policy.Insert("a", 100);
  EXPECT_TRUE(policy.IsCached("a"));
  EXPECT_THAT(policy.Choose({{"b", 8}}, 8), Optional(std::string("b")));
  room = policy.MakeRoom(100);
  EXPECT_THAT(room.evict, ElementsAre("a"));
  EXPECT_TRUE(room.fits);
}

TEST(MergePolicyTest, AutoModeMergesAnAdapterThatPassesTheThresholdOfTheWindow) {
  MergePolicy policy({.mode = LoraMode::kAuto,
                      .cache_bytes = 1000,
                      .threshold = 0.7,
                      .window_steps = 4,
                      .min_batch_share = 1.0});
  // Steps shared by a and b never run merged: neither has the whole step.
  for (int i = 0; i < 4; ++i) EXPECT_EQ(policy.Choose({{"a", 4}, {"b", 4}}, 8), std::nullopt);
  // Window {a4 b4} x3, {b8}: b has 20 of 32 tokens, 0.625 < 0.7.
  EXPECT_EQ(policy.Choose({{"b", 8}}, 8), std::nullopt);
  // Window {a4 b4} x2, {b8} x2: 24 of 32, 0.75.
  EXPECT_THAT(policy.Choose({{"b", 8}}, 8), Optional(std::string("b")));
  policy.Insert("b", 100);
  // Once cached, b needs only the step's share: after two steps of a, b has 16
  // of the window's 32 tokens (< 0.7) and still runs merged.
  for (int i = 0; i < 2; ++i) EXPECT_EQ(policy.Choose({{"a", 8}}, 8), std::nullopt);
  EXPECT_THAT(policy.Choose({{"b", 8}}, 8), Optional(std::string("b")));
}

TEST(MergePolicyTest, AutoModeNeedsABudgetAndTheBatchShare) {
  MergePolicy no_budget({.mode = LoraMode::kAuto, .cache_bytes = 0});
  EXPECT_EQ(no_budget.Choose({{"a", 8}}, 8), std::nullopt);
  MergePolicy half({.mode = LoraMode::kAuto, .cache_bytes = 1000, .min_batch_share = 0.5});
  EXPECT_EQ(half.Choose({{"a", 3}}, 8), std::nullopt) << "3 of 8 < 0.5";
  EXPECT_THAT(half.Choose({{"a", 4}}, 8), Optional(std::string("a")));
  EXPECT_EQ(half.Choose({}, 8), std::nullopt) << "no mergeable tokens";
}

TEST(MergePolicyTest, TheCacheEvictsLeastRecentlyUsedSetsToItsByteBudget) {
  MergePolicy policy({.mode = LoraMode::kAuto, .cache_bytes = 250, .threshold = 0.0});
  for (const std::string hash : {"a", "b"}) {
    ASSERT_THAT(policy.Choose({{hash, 8}}, 8), Optional(hash));
    const MergePolicy::Room room = policy.MakeRoom(100);
    EXPECT_THAT(room.evict, IsEmpty());
    ASSERT_TRUE(room.fits);
    policy.Insert(hash, 100);
  }
  EXPECT_EQ(policy.cached_bytes(), 200);
  ASSERT_THAT(policy.Choose({{"a", 8}}, 8), Optional(std::string("a")));  // a used after b
  ASSERT_THAT(policy.Choose({{"c", 8}}, 8), Optional(std::string("c")));
  MergePolicy::Room room = policy.MakeRoom(100);
  EXPECT_THAT(room.evict, ElementsAre("b")) << "least recently used first";
  EXPECT_TRUE(room.fits);
  policy.Insert("c", 100);
  EXPECT_FALSE(policy.IsCached("b"));
  // A set larger than the whole budget drops everything and still does not fit.
  room = policy.MakeRoom(300);
  EXPECT_THAT(room.evict, ElementsAre("a", "c"));
  EXPECT_FALSE(room.fits);
  EXPECT_EQ(policy.cached_bytes(), 0);
  policy.Insert("a", 100);
  policy.Clear();
  EXPECT_FALSE(policy.IsCached("a"));
  EXPECT_EQ(policy.cached_bytes(), 0);
}

}  // namespace
}  // namespace loraserve::adapters
