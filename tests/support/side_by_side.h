// Row-major matrices side by side in one wider matrix, as the fused q|k|v
// projection lays out each token's q, k and v, and column slices back out:
// for tests of operations that read rows a stride apart.
#ifndef LORASERVE_TESTS_SUPPORT_SIDE_BY_SIDE_H_
#define LORASERVE_TESTS_SUPPORT_SIDE_BY_SIDE_H_

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace loraserve::test_support {

// Row r of part i ((values, width), `rows` rows of `width` floats) lands in
// columns [sum of the earlier widths, + width) of row r; `pad` NaN columns
// follow, so that reading past a part shows. Rows are the sum of the widths
// plus `pad` floats apart.
inline std::vector<float> SideBySide(
    int64_t rows, const std::vector<std::pair<const std::vector<float>*, int64_t>>& parts,
    int64_t pad) {
  int64_t ld = pad;
  for (const auto& part : parts) ld += part.second;
  std::vector<float> out(static_cast<size_t>(rows * ld), NAN);
  int64_t first = 0;
  for (const auto& [values, width] : parts) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < width; ++c) out[r * ld + first + c] = (*values)[r * width + c];
    }
    first += width;
  }
  return out;
}

// Columns [first, first + width) of a `rows` x `ld` matrix.
inline std::vector<float> ColumnSlice(const std::vector<float>& m, int64_t rows, int64_t ld,
                                      int64_t first, int64_t width) {
  std::vector<float> out(static_cast<size_t>(rows * width));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < width; ++c) out[r * width + c] = m[r * ld + first + c];
  }
  return out;
}

}  // namespace loraserve::test_support

#endif  // LORASERVE_TESTS_SUPPORT_SIDE_BY_SIDE_H_
