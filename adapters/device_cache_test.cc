#include "adapters/device_cache.h"

#include "adapters/dummy_adapter.h"
#include "adapters/testing.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::adapters {
namespace {

using ::loraserve::test_support::StatusIs;

// Adapters for the shared model's shape, written by the dummy writer.
LoraAdapter MakeAdapter(int seed, int rank = 4) {
  const std::string dir = test_support::FreshDir("device_cache_" + std::to_string(seed));
  EXPECT_OK(WriteDummyAdapter(
      dir, test_support::SharedModelShape(),
      {.rank = rank, .target_modules = {"q_proj", "v_proj"}, .seed = static_cast<uint64_t>(seed)}));
  auto adapter = LoadLoraAdapter(dir, test_support::SharedModelShape(), {});
  EXPECT_OK(adapter);
  return std::move(*adapter);
}

TEST(DeviceAdapterCacheTest, UploadsOnceAndKeepsBTransposed) {
  auto backend = std::move(*kernels::CreateCpuBackend({1}));
  const LoraAdapter adapter = MakeAdapter(1);
  DeviceAdapterCache cache(backend.get(), 1 << 20);
  auto first = cache.Acquire(adapter);
  ASSERT_OK(first);
  auto second = cache.Acquire(adapter);
  ASSERT_OK(second);
  EXPECT_EQ(*first, *second);
  EXPECT_EQ(cache.stats().misses, 1);
  EXPECT_EQ(cache.stats().hits, 1);
  const LoraWeights& host = adapter.weights(2, LoraModule::kVProj);
  const DeviceLoraWeights& device = (*first)->weights(2, LoraModule::kVProj);
  ASSERT_EQ(device.rank, host.rank);
  const auto* bt = static_cast<const float*>(device.bt);  // the CPU keeps adapters in float32
  for (int64_t o = 0; o < host.out_features; ++o) {
    for (int r = 0; r < host.rank; ++r) {
      ASSERT_EQ(bt[r * host.out_features + o], host.b[o * host.rank + r]);
    }
  }
  EXPECT_EQ((*first)->weights(2, LoraModule::kKProj).rank, 0);
}

TEST(DeviceAdapterCacheTest, EvictsOnlyAdaptersNobodyHolds) {
  auto backend = std::move(*kernels::CreateCpuBackend({1}));
  const LoraAdapter a = MakeAdapter(1), b = MakeAdapter(2), c = MakeAdapter(3);
  // Room for two adapters.
  DeviceAdapterCache cache(backend.get(), static_cast<int64_t>(2 * a.bytes() + a.bytes() / 2));
  ASSERT_OK(cache.Acquire(a));
  ASSERT_OK(cache.Acquire(b));
  // Both in use: no room for c.
  EXPECT_THAT(cache.Acquire(c), StatusIs(absl::StatusCode::kResourceExhausted));
  cache.Release(a);
  ASSERT_OK(cache.Acquire(c));  // evicts a, the unused one
  EXPECT_FALSE(cache.IsResident(a));
  EXPECT_TRUE(cache.IsResident(b));
  EXPECT_TRUE(cache.IsResident(c));
  EXPECT_EQ(cache.stats().evictions, 1);
  EXPECT_EQ(cache.stats().resident_adapters, 2);
  EXPECT_LE(cache.stats().resident_bytes, cache.budget_bytes());
}

}  // namespace
}  // namespace loraserve::adapters
