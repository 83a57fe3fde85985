// The kernels behind kernels/cuda/lora.h.
#include <algorithm>

#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/lora.h"

namespace loraserve::kernels::cuda {
namespace {

constexpr int kShrinkWarps = kThreads / kWarp;
constexpr int kRankGroup = kLoraShrinkRankGroup;
// An expand thread owns 8 output columns; 128 threads make a 1024-column
// tile, so that a decode row's 4096-wide output is 4 blocks.
constexpr int kExpandThreads = 128;
constexpr int kExpandColumns = 8;
// Elements a vectorized load reads: 16 bytes of bf16/f16, 32 of float.
constexpr int kVector = 8;

// out[0:8] = p[0:8] widened to float; p is 16-byte aligned.
__device__ __forceinline__ void Load8(const float* p, float* out) {
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + 4);
  out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
  out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
}
__device__ __forceinline__ void Load8(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void Load8(const __half* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* pairs = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    out[2 * i] = f.x, out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void Store8(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}

// The segment of the table's pair p: the last one whose pair_offset is at
// most p (an empty segment shares its offset with the next one).
__device__ __forceinline__ int32_t SegmentOfPair(const DeviceLoraSegment* segments, int32_t count,
                                                 int32_t p) {
  int32_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (segments[mid].pair_offset <= p) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Block (pair, rank group): the whole block takes one (segment, row) pair's
// dot products for kRankGroup rank rows at a time, each thread summing its
// share of `in` for all of them (x is read once per group, A's rows side by
// side), then a block reduction. One block per pair rather than per segment
// keeps a segment of many rows (one adapter serving a whole batch) as
// parallel as many segments of one row. L is the dtype of A and Bᵀ.
template <typename L, bool kVectorized>
__global__ void LoraShrinkKernel(const float* x, int64_t in, const DeviceLoraTable* table,
                                 float* t) {
  __shared__ float partial[kShrinkWarps][kRankGroup];
  const int32_t count = table->count;
  const int32_t pairs = table->pairs;
  const DeviceLoraSegment* segments = TableSegments(table);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int32_t p = static_cast<int32_t>(blockIdx.x); p < pairs;
       p += static_cast<int32_t>(gridDim.x)) {
    const DeviceLoraSegment seg = segments[SegmentOfPair(segments, count, p)];
    const int32_t local_row = p - seg.pair_offset;
    const float* xr = x + static_cast<int64_t>(seg.start + local_row) * in;
    const L* a = static_cast<const L*>(seg.a);
    float* tr = t + seg.t_offset + static_cast<int64_t>(local_row) * seg.rank;
    for (int32_t g = static_cast<int32_t>(blockIdx.y) * kRankGroup; g < seg.rank;
         g += static_cast<int32_t>(gridDim.y) * kRankGroup) {
      const int32_t n = min(kRankGroup, seg.rank - g);
      float acc[kRankGroup] = {};
      if constexpr (kVectorized) {
        for (int64_t c = int64_t{threadIdx.x} * kVector; c < in;
             c += int64_t{blockDim.x} * kVector) {
          float xv[kVector];
          Load8(xr + c, xv);
#pragma unroll
          for (int k = 0; k < kRankGroup; ++k) {
            if (k >= n) break;
            float av[kVector];
            Load8(a + (g + k) * in + c, av);
#pragma unroll
            for (int e = 0; e < kVector; ++e) acc[k] = fmaf(xv[e], av[e], acc[k]);
          }
        }
      } else {
        for (int64_t c = threadIdx.x; c < in; c += blockDim.x) {
          const float xv = xr[c];
#pragma unroll
          for (int k = 0; k < kRankGroup; ++k) {
            if (k < n) acc[k] = fmaf(xv, ToFloat(a[(g + k) * in + c]), acc[k]);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kRankGroup; ++k) {
        acc[k] = WarpSum(acc[k]);
        if (lane == 0) partial[warp][k] = acc[k];
      }
      __syncthreads();
      if (threadIdx.x < n) {
        float sum = 0.0f;
        for (int w = 0; w < kShrinkWarps; ++w) sum += partial[w][threadIdx.x];
        tr[g + threadIdx.x] = sum;
      }
      __syncthreads();
    }
  }
}

// Whether segment `seg` covers token row `row`.
__device__ __forceinline__ bool Covers(const DeviceLoraSegment& seg, int32_t row) {
  return seg.start <= row && row < seg.end;
}

// Block (row, column tile): each thread owns kExpandColumns output columns
// of the row (side by side when vectorized, else blockDim.x apart) and adds
// the term of every segment that covers the row, in table order, summing
// over r in order. Each warp finds the covering segments 32 at a time with
// a ballot, so a decode step's long table costs a few loads per row.
template <typename L, bool kVectorized>
__global__ void LoraExpandKernel(const float* t, const DeviceLoraTable* table, int64_t out,
                                 float* y, int64_t ldy) {
  const int32_t count = table->count;
  const int32_t rows = table->rows;
  const DeviceLoraSegment* segments = TableSegments(table);
  const int lane = threadIdx.x % kWarp;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * blockDim.x * kExpandColumns;
  const int64_t first_col = tile + (kVectorized ? threadIdx.x * kExpandColumns : threadIdx.x);
  const int64_t col_step = kVectorized ? 1 : blockDim.x;
  const bool in_range = kVectorized ? first_col < out : true;
  for (int32_t row = static_cast<int32_t>(blockIdx.x); row < rows;
       row += static_cast<int32_t>(gridDim.x)) {
    float* yr = y + static_cast<int64_t>(row) * ldy;
    float value[kExpandColumns];
    bool loaded = false;
    for (int32_t base = 0; base < count; base += kWarp) {
      const int32_t mine = base + lane;
      uint32_t covering = __ballot_sync(0xffffffffu, mine < count && Covers(segments[mine], row));
      while (covering != 0) {
        const int32_t j = base + __ffs(covering) - 1;
        covering &= covering - 1;
        if (!in_range) continue;
        if (!loaded) {
          if constexpr (kVectorized) {
            Load8(yr + first_col, value);
          } else {
#pragma unroll
            for (int c = 0; c < kExpandColumns; ++c) {
              const int64_t col = first_col + c * col_step;
              value[c] = col < out ? yr[col] : 0.0f;
            }
          }
          loaded = true;
        }
        const DeviceLoraSegment seg = segments[j];
        const float* tr = t + seg.t_offset + static_cast<int64_t>(row - seg.start) * seg.rank;
        const L* bt = static_cast<const L*>(seg.bt);
        float acc[kExpandColumns] = {};
        for (int32_t r = 0; r < seg.rank; ++r) {
          const float tv = tr[r];
          float b[kExpandColumns];
          if constexpr (kVectorized) {
            Load8(bt + r * out + first_col, b);
          } else {
#pragma unroll
            for (int c = 0; c < kExpandColumns; ++c) {
              const int64_t col = first_col + c * col_step;
              b[c] = col < out ? ToFloat(bt[r * out + col]) : 0.0f;
            }
          }
#pragma unroll
          for (int c = 0; c < kExpandColumns; ++c) acc[c] = fmaf(tv, b[c], acc[c]);
        }
#pragma unroll
        for (int c = 0; c < kExpandColumns; ++c) value[c] = fmaf(seg.scale, acc[c], value[c]);
      }
    }
    if (!loaded) continue;
    if constexpr (kVectorized) {
      Store8(yr + first_col, value);
    } else {
#pragma unroll
      for (int c = 0; c < kExpandColumns; ++c) {
        const int64_t col = first_col + c * col_step;
        if (col < out) yr[col] = value[c];
      }
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

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void FillLoraTable(const LoraSegment* segments, int32_t num_segments, DeviceLoraTable* table) {
  DeviceLoraSegment* out = const_cast<DeviceLoraSegment*>(TableSegments(table));
  int64_t t_offset = 0;
  int32_t pairs = 0, rows = 0;
  for (int32_t i = 0; i < num_segments; ++i) {
    const LoraSegment& seg = segments[i];
    out[i] = {seg.start, seg.end, seg.rank, seg.scale, seg.a, seg.bt, t_offset, pairs};
    t_offset += static_cast<int64_t>(seg.end - seg.start) * seg.rank;
    pairs += seg.end - seg.start;
    rows = std::max(rows, seg.end);
  }
  *table = {num_segments, rows, pairs, 0};
}

bool LoraShrinkVectorizable(const float* x, int64_t in, const LoraSegment* segments,
                            int32_t num_segments) {
  if (in % kVector != 0 || !Aligned16(x)) return false;
  for (int32_t i = 0; i < num_segments; ++i) {
    if (!Aligned16(segments[i].a)) return false;
  }
  return true;
}

bool LoraExpandVectorizable(const LoraSegment* segments, int32_t num_segments, int64_t out,
                            const float* y, int64_t ldy) {
  if (out % kVector != 0 || ldy % 4 != 0 || !Aligned16(y)) return false;
  for (int32_t i = 0; i < num_segments; ++i) {
    if (!Aligned16(segments[i].bt)) return false;
  }
  return true;
}

cudaError_t LoraShrinkSegments(const float* x, int64_t in, const DeviceLoraTable* table,
                               DType lora_dtype, int32_t grid_pairs, int32_t grid_ranks,
                               bool vectorized, float* t, cudaStream_t stream) {
  if (grid_pairs == 0 || grid_ranks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(std::min(grid_pairs, int32_t{65535})),
                  static_cast<unsigned>(std::min(grid_ranks, int32_t{65535})));
  return DispatchDType(lora_dtype, [&](auto tag) {
    using L = decltype(tag);
    if (vectorized) {
      LoraShrinkKernel<L, true><<<grid, kThreads, 0, stream>>>(x, in, table, t);
    } else {
      LoraShrinkKernel<L, false><<<grid, kThreads, 0, stream>>>(x, in, table, t);
    }
    return cudaGetLastError();
  });
}

cudaError_t LoraExpandSegments(const float* t, const DeviceLoraTable* table, DType lora_dtype,
                               int32_t grid_rows, bool vectorized, int64_t out, float* y,
                               int64_t ldy, cudaStream_t stream) {
  if (grid_rows == 0 || out == 0) return cudaSuccess;
  const int64_t tile_columns = int64_t{kExpandThreads} * kExpandColumns;
  const int64_t tiles = (out + tile_columns - 1) / tile_columns;
  if (tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(std::min(grid_rows, int32_t{65535})),
                  static_cast<unsigned>(tiles));
  return DispatchDType(lora_dtype, [&](auto tag) {
    using L = decltype(tag);
    if (vectorized) {
      LoraExpandKernel<L, true><<<grid, kExpandThreads, 0, stream>>>(t, table, out, y, ldy);
    } else {
      LoraExpandKernel<L, false><<<grid, kExpandThreads, 0, stream>>>(t, table, out, y, ldy);
    }
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
