#include "kernels/quantization.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"

namespace loraserve::kernels {

Q8RowLayout Q8RowLayout::For(int64_t cols) {
  Q8RowLayout layout;
  layout.groups = (cols + kQ8GroupSize - 1) / kQ8GroupSize;
  layout.scales_offset = (cols + 3) / 4 * 4;
  const int64_t used = layout.scales_offset + layout.groups * int64_t{sizeof(float)};
  layout.row_bytes = (used + 63) / 64 * 64;
  return layout;
}

absl::Status QuantizeQ8Rows(const float* src, int64_t rows, int64_t cols, void* dst) {
  const Q8RowLayout layout = Q8RowLayout::For(cols);
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = src + r * cols;
    char* row = static_cast<char*>(dst) + r * layout.row_bytes;
    auto* values = reinterpret_cast<uint8_t*>(row);
    std::memset(row, 0, static_cast<size_t>(layout.row_bytes));
    std::memset(row, Q8Byte(0), static_cast<size_t>(cols));
    for (int64_t g = 0; g < layout.groups; ++g) {
      const int64_t begin = g * kQ8GroupSize;
      const int64_t end = std::min(cols, begin + kQ8GroupSize);
      float max_abs = 0.0f;
      for (int64_t c = begin; c < end; ++c) {
        if (!std::isfinite(w[c])) {
          return absl::InvalidArgumentError(absl::StrCat("cannot quantize to int8: weight [", r,
                                                         ", ", c, "] is ", w[c], " (not finite)"));
        }
        max_abs = std::max(max_abs, std::fabs(w[c]));
      }
      const float scale = max_abs / 127.0f;
      std::memcpy(row + layout.scales_offset + g * int64_t{sizeof(float)}, &scale, sizeof(scale));
      if (scale == 0.0f) continue;  // an all-zero group stays zero
      for (int64_t c = begin; c < end; ++c) {
        const float q = std::nearbyint(w[c] / scale);
        values[c] = Q8Byte(static_cast<int>(std::clamp(q, -127.0f, 127.0f)));
      }
    }
  }
  return absl::OkStatus();
}

void DequantizeQ8Row(const void* row, int64_t cols, float* dst) {
  const Q8RowLayout layout = Q8RowLayout::For(cols);
  const auto* bytes = static_cast<const char*>(row);
  const auto* values = reinterpret_cast<const uint8_t*>(bytes);
  for (int64_t g = 0; g < layout.groups; ++g) {
    float scale;
    std::memcpy(&scale, bytes + layout.scales_offset + g * int64_t{sizeof(float)}, sizeof(scale));
    const int64_t end = std::min(cols, (g + 1) * kQ8GroupSize);
    for (int64_t c = g * kQ8GroupSize; c < end; ++c)
      dst[c] = static_cast<float>(values[c] - 128) * scale;
  }
}

}  // namespace loraserve::kernels
