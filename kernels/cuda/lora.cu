// The kernels behind kernels/cuda/lora.h.
#include <algorithm>

#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/lora.h"

namespace loraserve::kernels::cuda {
namespace {

constexpr int kShrinkWarps = kThreads / kWarp;
// Rows an expand block takes of its segment (grid.z slices longer segments).
constexpr int64_t kExpandRowsPerBlock = 16;
// Output columns each expand thread owns: a 4096-wide output is 4 blocks per
// segment row rather than 16, fewer blocks for the many one-row segments of a
// decode step, and the segment lookups serve four columns.
constexpr int kExpandColumns = 4;

// Block (segment, y): warps take the segment's (row, r) dot products in turn;
// work item w is row start + w / rank, rank row w % rank, and lands at
// t[t_offset + w]. Blocks past the table's count have nothing to do.
// L is the dtype of the segments' A and Bᵀ.
template <typename L>
__global__ void LoraShrinkKernel(const float* x, int64_t in, const DeviceLoraTable* table,
                                 float* t) {
  if (static_cast<int32_t>(blockIdx.x) >= table->count) return;
  const DeviceLoraSegment seg = TableSegments(table)[blockIdx.x];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t work = static_cast<int64_t>(seg.end - seg.start) * seg.rank;
  for (int64_t w = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + warp; w < work;
       w += static_cast<int64_t>(gridDim.y) * kShrinkWarps) {
    const float* xr = x + (seg.start + w / seg.rank) * in;
    const L* ar = static_cast<const L*>(seg.a) + (w % seg.rank) * in;
    float sum = 0.0f;
    for (int64_t c = lane; c < in; c += kWarp) sum = fmaf(xr[c], ToFloat(ar[c]), sum);
    sum = WarpSum(sum);
    if (lane == 0) t[seg.t_offset + w] = sum;
  }
}

// Whether segment `seg` covers token row `row`.
__device__ __forceinline__ bool Covers(const DeviceLoraSegment& seg, int32_t row) {
  return seg.start <= row && row < seg.end;
}

// Block (segment, column tile, row slice): each thread owns kExpandColumns
// output columns, blockDim.x apart, of rows start + z, start + z + gridDim.z,
// ... of its segment. A row that several segments cover (a sequence's adapter
// and the correction for merged weights) is written only by the block of the
// first of them, which adds every covering segment's term in table order,
// summing over r in order: no two blocks update one element, and the sums are
// the CPU's, in the CPU's order.
template <typename L>
__global__ void LoraExpandKernel(const float* t, const DeviceLoraTable* table, int64_t out,
                                 float* y, int64_t ldy) {
  const int32_t count = table->count;
  const int32_t index = static_cast<int32_t>(blockIdx.x);
  if (index >= count) return;
  const DeviceLoraSegment* segments = TableSegments(table);
  const int64_t first_col =
      static_cast<int64_t>(blockIdx.y) * blockDim.x * kExpandColumns + threadIdx.x;
  const DeviceLoraSegment own = segments[index];
  for (int32_t row = own.start + static_cast<int32_t>(blockIdx.z); row < own.end;
       row += static_cast<int32_t>(gridDim.z)) {
    bool written_elsewhere = false;
    for (int32_t j = 0; j < index && !written_elsewhere; ++j) {
      written_elsewhere = Covers(segments[j], row);
    }
    if (written_elsewhere) continue;
    float* yr = y + static_cast<int64_t>(row) * ldy;
    float value[kExpandColumns];
#pragma unroll
    for (int c = 0; c < kExpandColumns; ++c) {
      const int64_t col = first_col + c * blockDim.x;
      value[c] = col < out ? yr[col] : 0.0f;
    }
    for (int32_t j = index; j < count; ++j) {
      const DeviceLoraSegment seg = segments[j];
      if (!Covers(seg, row)) continue;
      const float* tr = t + seg.t_offset + static_cast<int64_t>(row - seg.start) * seg.rank;
      const L* bt = static_cast<const L*>(seg.bt);
      float acc[kExpandColumns] = {};
      for (int32_t r = 0; r < seg.rank; ++r) {
        const float tv = tr[r];
#pragma unroll
        for (int c = 0; c < kExpandColumns; ++c) {
          const int64_t col = first_col + c * blockDim.x;
          if (col < out) acc[c] = fmaf(tv, ToFloat(bt[r * out + col]), acc[c]);
        }
      }
#pragma unroll
      for (int c = 0; c < kExpandColumns; ++c) value[c] = fmaf(seg.scale, acc[c], value[c]);
    }
#pragma unroll
    for (int c = 0; c < kExpandColumns; ++c) {
      const int64_t col = first_col + c * blockDim.x;
      if (col < out) yr[col] = value[c];
    }
  }
}

template <typename T, typename L>
__global__ void MergeKernel(const T* base, int64_t rows, int64_t cols, const L* a, const L* bt,
                            int32_t rank, float scale, const float* row_scale, T* out) {
  const int64_t count = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    float acc = 0.0f;
    for (int32_t r = 0; r < rank; ++r) {
      acc = fmaf(ToFloat(bt[r * rows + row]), ToFloat(a[r * cols + col]), acc);
    }
    const float merged = fmaf(scale, acc, ToFloat(base[i]));
    out[i] = FromFloat<T>(row_scale != nullptr ? merged * row_scale[row] : merged);
  }
}

__global__ void ScaleColumnsKernel(float* y, int64_t ldy, int64_t rows, int64_t cols,
                                   const float* scale) {
  const int64_t count = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    y[row * ldy + col] *= scale[col];
  }
}

}  // namespace

void FillLoraTable(const LoraSegment* segments, int32_t num_segments, DeviceLoraTable* table) {
  table->count = num_segments;
  DeviceLoraSegment* out = const_cast<DeviceLoraSegment*>(TableSegments(table));
  int64_t offset = 0;
  for (int32_t i = 0; i < num_segments; ++i) {
    const LoraSegment& seg = segments[i];
    out[i] = {seg.start, seg.end, seg.rank, seg.scale, seg.a, seg.bt, offset};
    offset += static_cast<int64_t>(seg.end - seg.start) * seg.rank;
  }
}

cudaError_t LoraShrinkSegments(const float* x, int64_t in, const DeviceLoraTable* table,
                               DType lora_dtype, int32_t grid_segments, int64_t max_work, float* t,
                               cudaStream_t stream) {
  if (grid_segments == 0 || max_work == 0) return cudaSuccess;
  const int64_t y = std::min<int64_t>(65535, (max_work + kShrinkWarps - 1) / kShrinkWarps);
  return DispatchDType(lora_dtype, [&](auto tag) {
    LoraShrinkKernel<decltype(tag)>
        <<<dim3(grid_segments, static_cast<unsigned>(y)), kThreads, 0, stream>>>(x, in, table, t);
    return cudaGetLastError();
  });
}

cudaError_t LoraExpandSegments(const float* t, const DeviceLoraTable* table, DType lora_dtype,
                               int32_t grid_segments, int64_t max_rows, int64_t out, float* y,
                               int64_t ldy, cudaStream_t stream) {
  if (grid_segments == 0 || max_rows == 0) return cudaSuccess;
  const int64_t tile_columns = int64_t{kThreads} * kExpandColumns;
  const int64_t tiles = (out + tile_columns - 1) / tile_columns;
  if (tiles > 65535) return cudaErrorInvalidValue;
  // Long segments (prefill) are split into slices of rows, so that the grid
  // fills the GPU even when one adapter serves a whole prompt.
  const int64_t slices =
      std::min<int64_t>(65535, (max_rows + kExpandRowsPerBlock - 1) / kExpandRowsPerBlock);
  return DispatchDType(lora_dtype, [&](auto tag) {
    LoraExpandKernel<decltype(tag)>
        <<<dim3(grid_segments, static_cast<unsigned>(tiles), static_cast<unsigned>(slices)),
           kThreads, 0, stream>>>(t, table, out, y, ldy);
    return cudaGetLastError();
  });
}

cudaError_t MergeLoraWeights(const void* base, DType dtype, int64_t rows, int64_t cols,
                             const void* a, const void* bt, DType lora_dtype, int32_t rank,
                             float scale, const float* row_scale, void* out,
                             cudaStream_t stream) {
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    return DispatchDType(lora_dtype, [&](auto lora_tag) {
      using L = decltype(lora_tag);
      MergeKernel<T, L><<<GridFor(rows * cols), kThreads, 0, stream>>>(
          static_cast<const T*>(base), rows, cols, static_cast<const L*>(a),
          static_cast<const L*>(bt), rank, scale, row_scale, static_cast<T*>(out));
      return cudaGetLastError();
    });
  });
}

cudaError_t ScaleColumnRows(float* y, int64_t ldy, int64_t rows, int64_t cols, const float* scale,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  ScaleColumnsKernel<<<GridFor(rows * cols), kThreads, 0, stream>>>(y, ldy, rows, cols, scale);
  return cudaGetLastError();
}

}  // namespace loraserve::kernels::cuda
