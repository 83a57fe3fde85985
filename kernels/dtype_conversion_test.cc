// The host-side dtype conversions of kernels/backend.h: bfloat16 rounding
// (to nearest, ties to even, as __float2bfloat16_rn) on hand-picked bit
// patterns, and against the nearest of the two neighbours for random floats.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"

namespace loraserve::kernels {
namespace {

float FromBits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint16_t ToBf16(float f) {
  uint16_t out;
  ConvertFloat32ToBf16(&f, 1, &out);
  return out;
}

TEST(ConvertFloat32ToBf16Test, RoundsToNearestWithTiesToEven) {
  EXPECT_EQ(ToBf16(1.0f), 0x3F80);
  EXPECT_EQ(ToBf16(FromBits(0x3F807FFF)), 0x3F80);  // under one half: down
  EXPECT_EQ(ToBf16(FromBits(0x3F808000)), 0x3F80);  // one half, even kept part: down
  EXPECT_EQ(ToBf16(FromBits(0x3F808001)), 0x3F81);  // over one half: up
  EXPECT_EQ(ToBf16(FromBits(0x3F818000)), 0x3F82);  // one half, odd kept part: up
  EXPECT_EQ(ToBf16(FromBits(0xBF818000)), 0xBF82);  // the same for negatives
  EXPECT_EQ(ToBf16(FromBits(0x3FFF8000)), 0x4000);  // the carry moves into the exponent
  EXPECT_EQ(ToBf16(FromBits(0x00018000)), 0x0002);  // subnormals round the same way
  EXPECT_EQ(ToBf16(-0.0f), 0x8000);
}

TEST(ConvertFloat32ToBf16Test, KeepsInfinitiesAndNaNAndOverflowsToInfinity) {
  EXPECT_EQ(ToBf16(INFINITY), 0x7F80);
  EXPECT_EQ(ToBf16(-INFINITY), 0xFF80);
  EXPECT_EQ(ToBf16(FromBits(0x7F7FFFFF)), 0x7F80);  // the largest float rounds up to infinity
  for (const uint32_t nan : {0x7FC00000u, 0x7F800001u, 0xFF800001u, 0x7FFFFFFFu}) {
    const uint16_t out = ToBf16(FromBits(nan));
    EXPECT_EQ(out & 0x7F80, 0x7F80) << std::hex << nan;
    EXPECT_NE(out & 0x007F, 0) << std::hex << nan;  // NaN, not infinity
    EXPECT_EQ(out & 0x8000, (nan >> 16) & 0x8000) << std::hex << nan;
  }
}

TEST(ConvertFloat32ToBf16Test, PicksTheNearestNeighbourOfRandomFloats) {
  std::mt19937 rng(7);
  // Finite and non-negative, below the last bf16 step (whose upper neighbour,
  // infinity, the test above covers).
  std::uniform_int_distribution<uint32_t> bits(0, 0x7F7EFFFF);
  std::vector<float> values(100000);
  for (float& v : values) v = FromBits(bits(rng));
  std::vector<uint16_t> rounded(values.size());
  ConvertFloat32ToBf16(values.data(), static_cast<int64_t>(values.size()), rounded.data());
  std::vector<float> widened(values.size());
  ConvertToFloat32(rounded.data(), DType::kBF16, static_cast<int64_t>(values.size()),
                   widened.data());
  for (size_t i = 0; i < values.size(); ++i) {
    uint32_t v;
    std::memcpy(&v, &values[i], sizeof(v));
    const double down = FromBits(v & 0xFFFF0000u);
    const double up = FromBits((v & 0xFFFF0000u) + 0x10000u);
    const double x = values[i];
    const double chosen = widened[i];
    ASSERT_TRUE(chosen == down || chosen == up) << x;
    ASSERT_LE(std::abs(chosen - x), std::abs((chosen == down ? up : down) - x)) << x;
  }
}

}  // namespace
}  // namespace loraserve::kernels
