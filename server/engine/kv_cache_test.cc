#include "server/engine/kv_cache.h"

#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::engine {
namespace {

using ::loraserve::test_support::StatusIs;

TEST(KvCacheTest, ReservesAndReleasesBlocks) {
  auto backend = kernels::CreateCpuBackend({1});
  ASSERT_OK(backend);
  const model::KvShape shape{2, 2, 8};
  const int64_t block_bytes = 2 * 2 * 4 * 2 * 8 * 4;  // K+V, layers, block, heads, dim, f32
  auto cache = KvCache::Create(backend->get(), shape, 4, 10 * block_bytes);
  ASSERT_OK(cache);
  KvCache& c = **cache;
  EXPECT_EQ(c.num_blocks(), 10);
  std::vector<int32_t> a, b;
  ASSERT_OK(c.Reserve(a, 9));  // 3 blocks
  EXPECT_EQ(a.size(), 3u);
  ASSERT_OK(c.Reserve(a, 12));  // still 3
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(c.free_blocks(), 7);
  EXPECT_THAT(c.Reserve(b, 40), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_TRUE(b.empty());
  c.Release(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(c.free_blocks(), 10);
  EXPECT_EQ(c.View().k.size(), 2u);
}

TEST(KvCacheTest, BudgetTooSmallForOneBlock) {
  auto backend = kernels::CreateCpuBackend({1});
  ASSERT_OK(backend);
  auto cache = KvCache::Create(backend->get(), {2, 2, 8}, 16, 100);
  EXPECT_THAT(cache, StatusIs(absl::StatusCode::kResourceExhausted));
}

}  // namespace
}  // namespace loraserve::engine
