// The CUDA backend's LoRA kernels: the segmented shrink and expand over a
// segment table in device memory, and the merge of an adapter into a weight;
// also the table's layout and how the host writes one. The kernels are plain
// entry points: raw device pointers, sizes and a stream, with every tensor's
// layout written beside it. Each returns the launch's error
// (cudaGetLastError), never aborts.
#ifndef LORASERVE_KERNELS_CUDA_LORA_H_
#define LORASERVE_KERNELS_CUDA_LORA_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/backend.h"

namespace loraserve::kernels::cuda {

// One LoRA segment as the segmented kernels read it from device memory.
struct DeviceLoraSegment {
  int32_t start;  // first token row
  int32_t end;    // one past the last token row
  int32_t rank;
  float scale;
  const void* a;     // [rank, in] of the call's lora_dtype
  const void* bt;    // [rank, out] of the call's lora_dtype
  int64_t t_offset;  // floats before this segment's part of the packed t
  // (segment, row) pairs of the segments before this one: the shrink's work
  // items are the table's pairs, segment after segment.
  int32_t pair_offset;
};

// A segment table in device memory: this header, then `count` segments
// (DeviceLoraSegment, 16-byte aligned right after it). The sizes live on the
// device so that a recorded step graph can be launched again with another
// table of the same capacity: kernels launched over more blocks than the
// table needs leave the extra blocks idle, and stride when they are fewer.
struct DeviceLoraTable {
  int32_t count;
  int32_t rows;   // one past the last row any segment covers
  int32_t pairs;  // Σ (end - start) over the segments
  int32_t reserved;
};

// The segments of `table`.
__host__ __device__ inline const DeviceLoraSegment* TableSegments(const DeviceLoraTable* table) {
  return reinterpret_cast<const DeviceLoraSegment*>(table + 1);
}

// Bytes of a table with room for `capacity` segments.
inline size_t LoraTableBytes(int32_t capacity) {
  return sizeof(DeviceLoraTable) + static_cast<size_t>(capacity) * sizeof(DeviceLoraSegment);
}

// Writes `segments` (host) as a device-layout table into `table` (host
// memory with room for them), with each segment's offsets into the packed
// intermediate and the pair list.
void FillLoraTable(const LoraSegment* segments, int32_t num_segments, DeviceLoraTable* table);

// Whether the segmented kernels may read the rows of a call 16 bytes at a
// time: the row length (`in` for the shrink, `out` for the expand) is a
// multiple of 8 elements and every matrix the call reads starts 16-byte
// aligned. Otherwise they read one element at a time.
bool LoraShrinkVectorizable(const float* x, int64_t in, const LoraSegment* segments,
                            int32_t num_segments);
bool LoraExpandVectorizable(const LoraSegment* segments, int32_t num_segments, int64_t out,
                            const float* y, int64_t ldy);

// Rank rows each shrink block computes: grid.y blocks share a segment's rank.
inline constexpr int32_t kLoraShrinkRankGroup = 4;

// Segmented shrink, one launch over blocks (pair, rank group): block (p, g)
// computes, for the table's p-th (segment, row) pair,
// t[seg.t_offset + (row - seg.start) * seg.rank + r] = x[row, :] · seg.a[r, :]
// for the rank rows r of groups g, g + grid_ranks, ... (kLoraShrinkRankGroup
// each), striding over pairs past grid_pairs.
cudaError_t LoraShrinkSegments(const float* x,  // [tokens, in]
                               int64_t in,
                               const DeviceLoraTable* table,  // device
                               DType lora_dtype,              // of every segment's a and bt
                               int32_t grid_pairs, int32_t grid_ranks, bool vectorized,
                               float* t,  // packed intermediate
                               cudaStream_t stream);

// Segmented expand, one launch over blocks (row, column tile), striding over
// rows past grid_rows: y[row, 0:out] += seg.scale * Σ_r t_seg[row, r] *
// seg.bt[r, 0:out] for every segment that covers the row, in table order (a
// row that several segments cover, a sequence's adapter and the correction
// for merged weights, gets their terms in order from one block: the sums are
// the CPU's, in the CPU's order).
cudaError_t LoraExpandSegments(const float* t,                // packed intermediate
                               const DeviceLoraTable* table,  // device
                               DType lora_dtype,              // of every segment's a and bt
                               int32_t grid_rows, bool vectorized, int64_t out,
                               float* y,  // [tokens, ldy], columns [0, out)
                               int64_t ldy, cudaStream_t stream);

// out = base + scale * btᵀ · a (times row_scale per row), in base's dtype (sum in
// float32, one rounding).
cudaError_t MergeLoraWeights(const void* base,  // [rows, cols] of dtype
                             DType dtype, int64_t rows, int64_t cols,
                             const void* a,   // [rank, cols] of lora_dtype
                             const void* bt,  // [rank, rows] of lora_dtype
                             DType lora_dtype, int32_t rank, float scale,
                             const float* row_scale,  // [rows] or null: multiplies each row
                             void* out,               // [rows, cols] of dtype
                             cudaStream_t stream);

// y[r, c] *= scale[c] for r < rows, c < cols; rows of y ldy floats apart.
cudaError_t ScaleColumnRows(float* y, int64_t ldy, int64_t rows, int64_t cols,
                            const float* scale,  // [cols] device
                            cudaStream_t stream);

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_LORA_H_
