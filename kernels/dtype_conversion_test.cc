// The host-side dtype conversions of kernels/backend.h: bfloat16 and half
// rounding (to nearest, ties to even, as __float2bfloat16_rn and vcvtps2ph)
// on hand-picked bit patterns, and against the nearest of the two neighbours
// for random floats.
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

uint16_t ToF16(float f) {
  uint16_t out;
  ConvertFloat32ToF16(&f, 1, &out);
  return out;
}

TEST(ConvertFloat32ToF16Test, RoundsToNearestWithTiesToEvenAndKeepsSpecials) {
  EXPECT_EQ(ToF16(1.0f), 0x3C00);
  EXPECT_EQ(ToF16(-2.0f), 0xC000);
  EXPECT_EQ(ToF16(65504.0f), 0x7BFF);                          // the largest half
  EXPECT_EQ(ToF16(65520.0f), 0x7C00);                          // halfway past it: infinity
  EXPECT_EQ(ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // one half step, even: down
  EXPECT_EQ(ToF16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // one half step, odd: up
  EXPECT_EQ(ToF16(std::ldexp(1.0f, -24)), 0x0001);             // the smallest subnormal
  EXPECT_EQ(ToF16(std::ldexp(1.0f, -26)), 0x0000);             // under half of it: zero
  EXPECT_EQ(ToF16(-0.0f), 0x8000);
  EXPECT_EQ(ToF16(INFINITY), 0x7C00);
  EXPECT_EQ(ToF16(-INFINITY), 0xFC00);
  const uint16_t nan = ToF16(NAN);
  EXPECT_EQ(nan & 0x7C00, 0x7C00);
  EXPECT_NE(nan & 0x03FF, 0);
}

TEST(ConvertFloat32ToF16Test, PicksTheNearestNeighbourOfRandomFloats) {
  std::mt19937 rng(8);
  // Within the half range, normal and subnormal; the tail (count not a
  // multiple of 8) goes through the padded path.
  std::uniform_real_distribution<float> exponent(-26.0f, 15.9f);
  std::vector<float> values(100003);
  for (float& v : values) v = std::exp2(exponent(rng)) * (rng() % 2 ? 1.0f : -1.0f);
  std::vector<uint16_t> rounded(values.size());
  ConvertFloat32ToF16(values.data(), static_cast<int64_t>(values.size()), rounded.data());
  std::vector<float> widened(values.size());
  ConvertToFloat32(rounded.data(), DType::kF16, static_cast<int64_t>(values.size()),
                   widened.data());
  for (size_t i = 0; i < values.size(); ++i) {
    const double x = values[i];
    const double chosen = widened[i];
    // Its neighbours: the halves one step either side of the chosen one.
    for (const int step : {-1, 1}) {
      const uint16_t other_bits = static_cast<uint16_t>(rounded[i] + step);
      float other;
      ConvertToFloat32(&other_bits, DType::kF16, 1, &other);
      if (std::isnan(other) || ((other_bits ^ rounded[i]) & 0x8000)) continue;
      ASSERT_LE(std::abs(chosen - x), std::abs(other - x)) << x;
      if (std::abs(chosen - x) == std::abs(other - x)) {
        ASSERT_EQ(rounded[i] & 1, 0) << "tie not to even: " << x;
      }
    }
  }
}

}  // namespace
}  // namespace loraserve::kernels
