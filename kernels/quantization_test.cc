// The kQ8 weight format (kernels/quantization.h): its row layout, and
// quantization within half a step of every weight with exact dequantized
// values.
#include "kernels/quantization.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/support/status_matchers.h"

namespace loraserve::kernels {
namespace {

using ::loraserve::test_support::StatusIs;

using ::testing::HasSubstr;

TEST(Q8RowLayoutTest, ValuesThenScalesThenPaddingToACacheLine) {
  struct Case {
    int64_t cols, groups, scales_offset, row_bytes;
  };
  for (const Case& c :
       {Case{1, 1, 4, 64}, Case{64, 1, 64, 128}, Case{128, 1, 128, 192}, Case{172, 2, 172, 192},
        Case{2048, 16, 2048, 2112}, Case{5632, 44, 5632, 5824}, Case{14336, 112, 14336, 14784}}) {
    const Q8RowLayout layout = Q8RowLayout::For(c.cols);
    EXPECT_EQ(layout.groups, c.groups) << c.cols;
    EXPECT_EQ(layout.scales_offset, c.scales_offset) << c.cols;
    EXPECT_EQ(layout.row_bytes, c.row_bytes) << c.cols;
    EXPECT_EQ(WeightRowBytes(DType::kQ8, c.cols), c.row_bytes);
    EXPECT_EQ(WeightBytes(DType::kQ8, 3, c.cols), 3 * c.row_bytes);
  }
  EXPECT_EQ(WeightRowBytes(DType::kBF16, 100), 200);
  EXPECT_EQ(WeightRowBytes(DType::kF32, 100), 400);
}

// Scale of group g of row r in quantized rows `q` of `cols` columns.
float ScaleOf(const std::vector<char>& q, int64_t cols, int64_t r, int64_t g) {
  const Q8RowLayout layout = Q8RowLayout::For(cols);
  float scale;
  std::memcpy(&scale, q.data() + r * layout.row_bytes + layout.scales_offset + 4 * g, 4);
  return scale;
}

TEST(QuantizeQ8RowsTest, EveryWeightIsWithinHalfAStepAndDequantizesExactly) {
  const int64_t rows = 5, cols = 300;  // groups of 128, 128 and 44
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<float> w(rows * cols);
  for (float& v : w) v = dist(rng);
  w[7] = 1.5f;  // an outlier sets its group's scale
  std::vector<char> q(WeightBytes(DType::kQ8, rows, cols), 0x5A);
  ASSERT_OK(QuantizeQ8Rows(w.data(), rows, cols, q.data()));
  const int64_t row_bytes = WeightRowBytes(DType::kQ8, cols);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> back(cols);
    DequantizeQ8Row(q.data() + r * row_bytes, cols, back.data());
    for (int64_t g = 0; g < 3; ++g) {
      const float scale = ScaleOf(q, cols, r, g);
      float max_abs = 0;
      for (int64_t c = g * 128; c < std::min<int64_t>(cols, (g + 1) * 128); ++c) {
        max_abs = std::max(max_abs, std::fabs(w[r * cols + c]));
      }
      EXPECT_EQ(scale, max_abs / 127.0f) << r << " " << g;
      for (int64_t c = g * 128; c < std::min<int64_t>(cols, (g + 1) * 128); ++c) {
        const int value = static_cast<uint8_t>(q[r * row_bytes + c]) - 128;
        ASSERT_EQ(back[c], static_cast<float>(value) * scale) << r << " " << c;
        ASSERT_LE(std::fabs(back[c] - w[r * cols + c]), scale / 2 * (1 + 1e-6f)) << r << " " << c;
      }
    }
    // Padding after the values and after the scales is zero bytes.
    for (int64_t b = cols; b < Q8RowLayout::For(cols).scales_offset; ++b) {
      ASSERT_EQ(q[r * row_bytes + b], 0) << b;
    }
    const Q8RowLayout layout = Q8RowLayout::For(cols);
    for (int64_t b = layout.scales_offset + 4 * layout.groups; b < row_bytes; ++b) {
      ASSERT_EQ(q[r * row_bytes + b], 0) << b;
    }
  }
  EXPECT_EQ(static_cast<uint8_t>(q[7]), 255);  // the outlier is the group's maximum: q = 127
}

TEST(QuantizeQ8RowsTest, AnAllZeroGroupStaysZero) {
  const int64_t cols = 200;
  std::vector<float> w(cols, 0.0f);
  w[150] = -0.25f;
  std::vector<char> q(WeightBytes(DType::kQ8, 1, cols));
  ASSERT_OK(QuantizeQ8Rows(w.data(), 1, cols, q.data()));
  EXPECT_EQ(ScaleOf(q, cols, 0, 0), 0.0f);
  std::vector<float> back(cols, std::numeric_limits<float>::quiet_NaN());
  DequantizeQ8Row(q.data(), cols, back.data());
  for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(back[c], w[c]) << c;
}

TEST(QuantizeQ8RowsTest, RefusesANonFiniteWeightNamingIt) {
  for (const float bad :
       {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    std::vector<float> w(3 * 40, 0.5f);
    w[2 * 40 + 17] = bad;
    std::vector<char> q(WeightBytes(DType::kQ8, 3, 40));
    const absl::Status status = QuantizeQ8Rows(w.data(), 3, 40, q.data());
    EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument));
    EXPECT_THAT(status.message(), HasSubstr("weight [2, 17]"));
  }
}

}  // namespace
}  // namespace loraserve::kernels
