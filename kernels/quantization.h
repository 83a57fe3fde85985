// The kQ8 weight format (kernels/backend.h): int8 weights quantized
// symmetrically in groups of kQ8GroupSize columns along each row, with one
// float32 scale per group, as a weight-only quantization of a checkpoint of
// any dtype at load.
//
// A group's scale is max|w| / 127 over its columns and its values are
// q = round(w / scale) in [-127, 127], so a weight is off by at most scale /
// 2 (half a step) and dequantizes to exactly float(q) · scale.
//
// Layout of one row of `cols` weights (Q8RowLayout): the values as unsigned
// bytes q + 128 (in [1, 255]: the unsigned operand of AVX-512 VNNI's
// vpdpbusd, so an int8 GEMM needs no conversion of the weights), padding to
// a multiple of 4 bytes, the float32 scales of the ceil(cols / 128) groups,
// then padding to a multiple of 64 bytes, so every row starts on a cache line
// and a row slice of a matrix is a matrix again.
//
// Example:
//   std::vector<char> q(WeightBytes(DType::kQ8, rows, cols));
//   RETURN_IF_ERROR(QuantizeQ8Rows(w.data(), rows, cols, q.data()));
//   DequantizeQ8Row(q.data() + r * WeightRowBytes(DType::kQ8, cols), cols, row.data());
#ifndef LORASERVE_KERNELS_QUANTIZATION_H_
#define LORASERVE_KERNELS_QUANTIZATION_H_

#include <cstdint>

#include "absl/status/status.h"

namespace loraserve::kernels {

struct Q8RowLayout {
  int64_t groups = 0;         // scales per row
  int64_t scales_offset = 0;  // bytes from a row's start to its first scale
  int64_t row_bytes = 0;      // bytes from one row to the next

  static Q8RowLayout For(int64_t cols);
};

// Quantizes `rows` rows of `cols` floats (contiguous) into kQ8 rows at `dst`.
// A non-finite weight has no int8 value: INVALID_ARGUMENT naming its row and
// column.
absl::Status QuantizeQ8Rows(const float* src, int64_t rows, int64_t cols, void* dst);

// The byte that stores q.
inline uint8_t Q8Byte(int q) { return static_cast<uint8_t>(q + 128); }

// Writes the `cols` dequantized weights of the kQ8 row at `row`.
void DequantizeQ8Row(const void* row, int64_t cols, float* dst);

}  // namespace loraserve::kernels

#endif  // LORASERVE_KERNELS_QUANTIZATION_H_
