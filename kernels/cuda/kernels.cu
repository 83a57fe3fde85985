// The CUDA kernels behind kernels/cuda/kernels.h. Simple, correct first:
// float32 arithmetic everywhere (weights are converted on load from bf16/f16),
// coalesced accesses, grid-stride loops, one launch per operation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cuda/kernels.h"

namespace loraserve::kernels::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
// Grid-stride kernels never launch more blocks than this.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

int GridFor(int64_t count, int threads = kThreads) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min(kMaxBlocks, (count + threads - 1) / threads)));
}

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls fn(T{}) with T the device element type of `dtype`.
template <typename Fn>
cudaError_t DispatchDType(DType dtype, Fn fn) {
  switch (dtype) {
    case DType::kF32:
      return fn(float{});
    case DType::kF16:
      return fn(__half{});
    case DType::kBF16:
      return fn(__nv_bfloat16{});
    case DType::kQ8:  // no int8 kernels on CUDA
      break;
  }
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ void RecordError(int32_t* error, int32_t code) {
  atomicCAS(error, kNoKernelError, code);
}

__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result. `scratch` holds 32 floats.
__device__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  v = lane < warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}

// ---- elementwise ----------------------------------------------------------

template <typename S, typename D>
__global__ void ConvertKernel(const S* src, D* dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<D>(ToFloat(src[i]));
  }
}

template <typename T>
__global__ void EmbeddingKernel(const int32_t* ids, int64_t n, const T* table, int64_t vocab,
                                int64_t hidden, float* y, int32_t* error) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int32_t id = ids[i];
    float* row = y + i * hidden;
    if (id < 0 || id >= vocab) {
      if (threadIdx.x == 0) RecordError(error, kEmbeddingIdOutOfRange);
      for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) row[c] = NAN;
      continue;
    }
    const T* src = table + id * hidden;
    for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) row[c] = ToFloat(src[c]);
  }
}

// C is the dtype of `converted` (null: none).
template <typename C>
__global__ void RmsNormKernel(const float* x, const float* weight, int64_t n, int64_t dim,
                              float eps, float* y, C* converted) {
  __shared__ float scratch[kWarp];
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const float* xr = x + row * dim;
    float* yr = y + row * dim;
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) sum = fmaf(xr[c], xr[c], sum);
    sum = BlockSum(sum, scratch);
    const float inv_rms = 1.0f / sqrtf(sum / static_cast<float>(dim) + eps);
    // Each thread rewrites only the elements it read: y may alias x.
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const float value = weight[c] * (xr[c] * inv_rms);
      yr[c] = value;
      if (converted != nullptr) converted[row * dim + c] = FromFloat<C>(value);
    }
  }
}

__global__ void AddKernel(float* x, const float* y, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += y[i];
  }
}

__global__ void AddBiasKernel(float* x, const float* bias, int64_t n, int64_t dim) {
  const int64_t count = n * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += bias[i % dim];
  }
}

// C is the dtype of `converted` (null: none).
template <typename C>
__global__ void SiluMulKernel(const float* gate_up, int64_t n, int64_t dim, float* out,
                              C* converted) {
  const int64_t count = n * dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / dim;
    const int64_t c = i - row * dim;
    const float gate = gate_up[row * 2 * dim + c];
    const float up = gate_up[row * 2 * dim + dim + c];
    const float value = gate / (1.0f + expf(-gate)) * up;
    out[i] = value;
    if (converted != nullptr) converted[i] = FromFloat<C>(value);
  }
}

// One thread per (token, head of q then k, rotation pair i).
__global__ void RopeKernel(float* q, int64_t q_ld, float* k, int64_t k_ld, const int32_t* positions,
                           int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                           const float* inv_freq, int32_t half, float attention_scaling,
                           int32_t* error) {
  const int64_t heads = num_heads + num_kv_heads;
  const int64_t count = tokens * heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < count;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t head = (idx / half) % heads;
    const int64_t t = idx / (half * heads);
    float* x = head < num_heads ? q + t * q_ld + head * 2 * half
                                : k + t * k_ld + (head - num_heads) * 2 * half;
    const int32_t position = positions[t];
    if (position < 0) {
      RecordError(error, kRopePositionNegative);
      x[i] = NAN;
      x[i + half] = NAN;
      continue;
    }
    // As Hugging Face: the angle is rounded to float32 before cos and sin.
    const float angle = static_cast<float>(position) * inv_freq[i];
    const float c = cosf(angle) * attention_scaling;
    const float s = sinf(angle) * attention_scaling;
    const float a = x[i];
    const float b = x[i + half];
    x[i] = a * c - b * s;
    x[i + half] = b * c + a * s;
  }
}

template <typename T>
__global__ void WriteKvKernel(const float* k, const float* v, int64_t kv_ld,
                              const int32_t* slot_mapping, int64_t tokens, int64_t slot_floats,
                              int64_t num_slots, T* k_cache, T* v_cache, int32_t* error) {
  const int64_t count = tokens * slot_floats;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / slot_floats;
    const int64_t e = i - t * slot_floats;
    const int64_t slot = slot_mapping[t];
    if (slot == kPaddingSlot) continue;
    if (slot < 0 || slot >= num_slots) {
      RecordError(error, kWriteKvSlotOutOfRange);
      continue;
    }
    k_cache[slot * slot_floats + e] = FromFloat<T>(k[t * kv_ld + e]);
    v_cache[slot * slot_floats + e] = FromFloat<T>(v[t * kv_ld + e]);
  }
}

// ---- attention ------------------------------------------------------------

constexpr int kAttentionWarps = 4;

// One block per (token, head); each warp walks every kAttentionWarps-th cache
// position with an online softmax (running max m, sum l, accumulator acc over
// the head's dimensions, kDimsPerLane per lane), then the warps' partial
// results are merged. Keys and values are read a whole head row per warp:
// coalesced.
template <int kDimsPerLane, typename T>
__global__ void __launch_bounds__(kAttentionWarps* kWarp)
    PagedAttentionKernel(const float* q, int64_t q_ld, int32_t num_seqs, const int32_t* query_start,
                         const int32_t* context_lens, const int32_t* block_tables,
                         int32_t max_blocks_per_seq, const int32_t* positions, int32_t num_heads,
                         int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
                         int32_t num_blocks, const T* k_cache, const T* v_cache, float* out,
                         int32_t* error) {
  __shared__ float warp_max[kAttentionWarps];
  __shared__ float warp_sum[kAttentionWarps];
  __shared__ float warp_acc[kAttentionWarps][kDimsPerLane * kWarp];
  __shared__ int bad_block;

  const int32_t token = blockIdx.x;
  const int32_t head = blockIdx.y;
  const int32_t kv_head = head / (num_heads / num_kv_heads);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  float* out_row = out + (static_cast<int64_t>(token) * num_heads + head) * head_dim;

  // The token's sequence: the last s with query_start[s] <= token.
  int32_t lo = 0, hi = num_seqs - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (query_start[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int32_t seq = lo;
  const int32_t position = positions[token];
  const int32_t context = position + 1;
  if (position < 0 || position >= context_lens[seq] ||
      position >= static_cast<int64_t>(max_blocks_per_seq) * block_size) {
    if (threadIdx.x == 0) RecordError(error, kAttentionPositionOutOfRange);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = NAN;
    return;
  }
  if (threadIdx.x == 0) bad_block = 0;

  const float scale = 1.0f / sqrtf(static_cast<float>(head_dim));
  const float* q_row = q + token * q_ld + static_cast<int64_t>(head) * head_dim;
  float qv[kDimsPerLane];
  float acc[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + i * kWarp;
    qv[i] = d < head_dim ? q_row[d] : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -INFINITY;
  float l = 0.0f;
  const int32_t* table = block_tables + static_cast<int64_t>(seq) * max_blocks_per_seq;
  __syncthreads();  // bad_block initialised
  for (int32_t j = warp; j < context; j += kAttentionWarps) {
    const int32_t block = table[j / block_size];
    if (block < 0 || block >= num_blocks) {
      if (lane == 0) {
        RecordError(error, kAttentionBlockOutOfRange);
        bad_block = 1;
      }
      break;
    }
    const int64_t base =
        ((static_cast<int64_t>(block) * block_size + j % block_size) * num_kv_heads + kv_head) *
        head_dim;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + i * kWarp;
      if (d < head_dim) dot = fmaf(qv[i], ToFloat(k_cache[base + d]), dot);
    }
    const float s = WarpSum(dot) * scale;
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new);  // 0 for the first position (m = -inf)
    const float p = expf(s - m_new);
    l = l * correction + p;
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) {
      const int d = lane + i * kWarp;
      const float value = d < head_dim ? ToFloat(v_cache[base + d]) : 0.0f;
      acc[i] = fmaf(p, value, acc[i] * correction);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) warp_acc[warp][lane + i * kWarp] = acc[i];
  __syncthreads();
  if (bad_block) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = NAN;
    return;
  }
  float max_all = -INFINITY;
  for (int w = 0; w < kAttentionWarps; ++w) max_all = fmaxf(max_all, warp_max[w]);
  float total = 0.0f;
  float weight[kAttentionWarps];
  for (int w = 0; w < kAttentionWarps; ++w) {
    // A warp that saw no position has m = -inf and weight 0.
    weight[w] = warp_max[w] == -INFINITY ? 0.0f : expf(warp_max[w] - max_all);
    total += warp_sum[w] * weight[w];
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) sum += warp_acc[w][d] * weight[w];
    out_row[d] = sum / total;
  }
}

// ---- LoRA -----------------------------------------------------------------

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
                            int32_t rank, float scale, T* out) {
  const int64_t count = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    float acc = 0.0f;
    for (int32_t r = 0; r < rank; ++r) {
      acc = fmaf(ToFloat(bt[r * rows + row]), ToFloat(a[r * cols + col]), acc);
    }
    out[i] = FromFloat<T>(fmaf(scale, acc, ToFloat(base[i])));
  }
}

}  // namespace

const char* KernelErrorName(int32_t code) {
  switch (code) {
    case kNoKernelError:
      return "no error";
    case kEmbeddingIdOutOfRange:
      return "Embedding: a token id is outside the vocabulary";
    case kRopePositionNegative:
      return "Rope: a position is negative";
    case kWriteKvSlotOutOfRange:
      return "WriteKv: a slot_mapping entry is outside the cache";
    case kAttentionPositionOutOfRange:
      return "PagedAttention: a position is beyond its sequence's context_lens or block table";
    case kAttentionBlockOutOfRange:
      return "PagedAttention: a block_tables entry is outside the cache";
  }
  return "unknown kernel error";
}

cudaError_t ConvertElements(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                            int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  return DispatchDType(src_dtype, [&](auto s) {
    return DispatchDType(dst_dtype, [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      ConvertKernel<S, D><<<GridFor(count), kThreads, 0, stream>>>(static_cast<const S*>(src),
                                                                   static_cast<D*>(dst), count);
      return cudaGetLastError();
    });
  });
}

cudaError_t EmbeddingGather(const int32_t* ids, int64_t n, const void* table, DType table_dtype,
                            int64_t vocab, int64_t hidden, float* y, int32_t* error,
                            cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return DispatchDType(table_dtype, [&](auto tag) {
    using T = decltype(tag);
    EmbeddingKernel<T><<<static_cast<int>(std::min(n, kMaxBlocks)), kThreads, 0, stream>>>(
        ids, n, static_cast<const T*>(table), vocab, hidden, y, error);
    return cudaGetLastError();
  });
}

cudaError_t RmsNormRows(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                        float* y, void* converted, DType converted_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int blocks = static_cast<int>(std::min(n, kMaxBlocks));
  if (converted == nullptr) {
    RmsNormKernel<float><<<blocks, kThreads, 0, stream>>>(x, weight, n, dim, eps, y, nullptr);
    return cudaGetLastError();
  }
  return DispatchDType(converted_dtype, [&](auto tag) {
    using C = decltype(tag);
    RmsNormKernel<C>
        <<<blocks, kThreads, 0, stream>>>(x, weight, n, dim, eps, y, static_cast<C*>(converted));
    return cudaGetLastError();
  });
}

cudaError_t AddInPlace(float* x, const float* y, int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  AddKernel<<<GridFor(count), kThreads, 0, stream>>>(x, y, count);
  return cudaGetLastError();
}

cudaError_t AddBiasRows(float* x, const float* bias, int64_t n, int64_t dim, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AddBiasKernel<<<GridFor(n * dim), kThreads, 0, stream>>>(x, bias, n, dim);
  return cudaGetLastError();
}

cudaError_t SiluMulRows(const float* gate_up, int64_t n, int64_t dim, float* out, void* converted,
                        DType converted_dtype, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (converted == nullptr) {
    SiluMulKernel<float><<<GridFor(n * dim), kThreads, 0, stream>>>(gate_up, n, dim, out, nullptr);
    return cudaGetLastError();
  }
  return DispatchDType(converted_dtype, [&](auto tag) {
    using C = decltype(tag);
    SiluMulKernel<C><<<GridFor(n * dim), kThreads, 0, stream>>>(gate_up, n, dim, out,
                                                                static_cast<C*>(converted));
    return cudaGetLastError();
  });
}

cudaError_t RopeInPlace(float* q, int64_t q_ld, float* k, int64_t k_ld, const int32_t* positions,
                        int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                        const float* inv_freq, int32_t head_dim, float attention_scaling,
                        int32_t* error, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  const int32_t half = head_dim / 2;
  RopeKernel<<<GridFor(tokens * (num_heads + num_kv_heads) * half), kThreads, 0, stream>>>(
      q, q_ld, k, k_ld, positions, tokens, num_heads, num_kv_heads, inv_freq, half,
      attention_scaling, error);
  return cudaGetLastError();
}

cudaError_t WriteKvSlots(const float* k, const float* v, int64_t kv_ld, const int32_t* slot_mapping,
                         int64_t tokens, int64_t slot_floats, int64_t num_slots, DType cache_dtype,
                         void* k_cache, void* v_cache, int32_t* error, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  return DispatchDType(cache_dtype, [&](auto element) {
    using T = decltype(element);
    WriteKvKernel<T><<<GridFor(tokens * slot_floats), kThreads, 0, stream>>>(
        k, v, kv_ld, slot_mapping, tokens, slot_floats, num_slots, static_cast<T*>(k_cache),
        static_cast<T*>(v_cache), error);
    return cudaGetLastError();
  });
}

cudaError_t PagedAttentionForward(const float* q, int64_t q_ld, int32_t tokens, int32_t num_seqs,
                                  const int32_t* query_start, const int32_t* context_lens,
                                  const int32_t* block_tables, int32_t max_blocks_per_seq,
                                  const int32_t* positions, int32_t num_heads, int32_t num_kv_heads,
                                  int32_t head_dim, int32_t block_size, int32_t num_blocks,
                                  DType cache_dtype, const void* k_cache, const void* v_cache,
                                  float* out, int32_t* error, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  if (head_dim > kMaxAttentionHeadDim || num_heads > 65535) return cudaErrorInvalidValue;
  const dim3 grid(tokens, num_heads);
  return DispatchDType(cache_dtype, [&](auto element) {
    using T = decltype(element);
    const auto launch = [&](auto kernel) {
      kernel<<<grid, kAttentionWarps * kWarp, 0, stream>>>(
          q, q_ld, num_seqs, query_start, context_lens, block_tables, max_blocks_per_seq, positions,
          num_heads, num_kv_heads, head_dim, block_size, num_blocks, static_cast<const T*>(k_cache),
          static_cast<const T*>(v_cache), out, error);
      return cudaGetLastError();
    };
    // Registers per lane follow head_dim: 32, 64, 128 or 256 dimensions.
    if (head_dim <= 32) return launch(PagedAttentionKernel<1, T>);
    if (head_dim <= 64) return launch(PagedAttentionKernel<2, T>);
    if (head_dim <= 128) return launch(PagedAttentionKernel<4, T>);
    return launch(PagedAttentionKernel<8, T>);
  });
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
                             float scale, void* out, cudaStream_t stream) {
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    return DispatchDType(lora_dtype, [&](auto lora_tag) {
      using L = decltype(lora_tag);
      MergeKernel<T, L><<<GridFor(rows * cols), kThreads, 0, stream>>>(
          static_cast<const T*>(base), rows, cols, static_cast<const L*>(a),
          static_cast<const L*>(bt), rank, scale, static_cast<T*>(out));
      return cudaGetLastError();
    });
  });
}

// ---- sampling ---------------------------------------------------------------

namespace {

constexpr int kSampleThreads = 512;

// The logit as the sampler reads it (kernels/sampling.cc): NaN is -inf.
__device__ __forceinline__ float SamplingLogit(float v) { return isnan(v) ? -INFINITY : v; }

// A strict total order over a row's elements, larger = earlier in the
// sampling order: the logit's bits mapped so that unsigned order is float
// order (-0 folded into +0, as in kernels/sampling.cc), above the id
// inverted so that a lower id of an equal logit ranks higher. Every key is
// above 0 (the lowest logit, -inf, maps to 0x007FFFFF), so 0 can mean "none".
struct SamplingKey {
  int id_bits;      // bits that hold vocab - 1
  int32_t last_id;  // vocab - 1

  __device__ __forceinline__ uint64_t operator()(float v, int64_t id) const {
    uint32_t bits = __float_as_uint(SamplingLogit(v));
    if (bits == 0x80000000u) bits = 0;
    bits = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
    return (static_cast<uint64_t>(bits) << id_bits) | static_cast<uint64_t>(last_id - id);
  }
  __device__ __forceinline__ int32_t Id(uint64_t key) const {
    return last_id - static_cast<int32_t>(key & ((uint64_t{1} << id_bits) - 1));
  }
};

// `op` over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the bitwise same result (the warp partials are combined in one
// fixed order), which keeps the searches below in step across the block.
// `scratch` holds 32 eight-byte values.
template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, uint64_t* scratch) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "scratch holds 8-byte values");
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  T* partials = reinterpret_cast<T*>(scratch);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  T result = partials[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w) result = op(result, partials[w]);
  return result;
}

struct MaxOp {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a > b ? a : b; }
};
struct MinOp {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a < b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// The sum over the block of each of `v`'s N values, in BlockReduce's order:
// every thread gets the bitwise same results. `scratch` holds kWarp * N.
template <typename T, int N>
__device__ void BlockSumEach(T (&v)[N], T* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
    }
  }
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
  }
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / kWarp;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    T result = scratch[j];
    for (int w = 1; w < warps; ++w) result += scratch[w * N + j];
    v[j] = result;
  }
}

// Bits a search pass decides: a 49-bit key (vocab 128K) takes 13 passes over
// the row rather than 49.
constexpr int kDigitBits = 4;
constexpr int kDigits = 1 << kDigitBits;

// The largest key value t (of `bits` bits) for which pred(S(t)) holds, where
// S(t) sums weight(v) over the row's elements with key >= max(t, lowest) and
// pred(S(t)) is monotone (true up to some t, false above it); 0 when it holds
// for no t > 0. Built from the top digit down (the top digit takes what is
// left of `bits`): one pass sums S for every value of the next digit at once.
// Each thread adds its elements in index order, skipping those below a
// candidate (adding 0), so every S is the sum a bit-by-bit search would form,
// and the result is the same. Every thread calls it together (the sums reduce
// over the block). `scratch` holds kWarp * kDigits values.
template <typename W, typename Weight, typename Pred>
__device__ uint64_t LargestKeyWhere(const float* __restrict__ x, int64_t vocab, SamplingKey key,
                                    int bits, uint64_t lowest, Weight weight, Pred pred,
                                    W* scratch) {
  uint64_t t = 0;
  for (int shift = bits; shift > 0;) {
    const int width = shift % kDigitBits == 0 ? kDigitBits : shift % kDigitBits;
    shift -= width;
    // Candidates are t's bits above this digit, then digit d, then zeros.
    const uint64_t prefix = t >> (shift + width);
    W sums[kDigits];
#pragma unroll
    for (int d = 0; d < kDigits; ++d) sums[d] = W{0};
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = x[i];
      const uint64_t k = key(v, i);
      const uint64_t high = k >> (shift + width);
      if (k < lowest || high < prefix) continue;  // below every candidate
      // An element above the prefix is at or above every candidate.
      const int digit =
          high > prefix ? kDigits - 1 : static_cast<int>((k >> shift) & ((1u << width) - 1));
      const W w = weight(v);
#pragma unroll
      for (int d = 0; d < kDigits; ++d) sums[d] += d <= digit ? w : W{0};
    }
    BlockSumEach(sums, scratch);
    // The largest digit where pred holds; 0 keeps t (pred holds there, or t
    // is 0). Unrolled, so that `sums` stays in registers.
    int chosen = 0;
#pragma unroll
    for (int d = kDigits - 1; d > 0; --d) {
      if (chosen == 0 && d < (1 << width) && pred(sums[d])) chosen = d;
    }
    t |= static_cast<uint64_t>(chosen) << shift;
  }
  return t;
}

// The key of the row's k-th element in sampling order (1 <= k <= vocab):
// the largest t with at least k keys >= t (keys are distinct).
__device__ uint64_t KthKey(const float* __restrict__ x, int64_t vocab, SamplingKey key, int bits,
                           int32_t k, uint64_t* scratch) {
  return LargestKeyWhere(
      x, vocab, key, bits, /*lowest=*/0, [](float) { return int32_t{1}; },
      [&](int32_t count) { return count >= k; }, reinterpret_cast<int32_t*>(scratch));
}

// One block per row; see SampleRows. Greedy rows skip the searches.
__global__ void __launch_bounds__(kSampleThreads)
    SampleKernel(const float* __restrict__ logits, int64_t vocab, SamplingKey key, int bits,
                 const DeviceSamplingRow* __restrict__ params, DeviceSampledRow* results,
                 DeviceTopEntry* top) {
  __shared__ uint64_t scratch[kWarp * kDigits];
  __shared__ int32_t top_count;
  const int64_t row = blockIdx.x;
  const float* __restrict__ x = logits + row * vocab;
  const DeviceSamplingRow p = params[row];

  // The first maximum, and log_softmax's normaliser around it.
  uint64_t best = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) best = MaxOp{}(best, key(x[i], i));
  best = BlockReduce(best, MaxOp{}, scratch);
  const int32_t best_id = key.Id(best);
  const float max_logit = SamplingLogit(x[best_id]);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    sum += exp(static_cast<double>(SamplingLogit(x[i])) - max_logit);
  }
  const double log_z = max_logit + log(BlockReduce(sum, SumOp{}, scratch));

  int32_t chosen = best_id;
  if (p.temperature != 0.0f && p.top_k != 1) {
    // Kept elements are those with key >= floor (0 keeps all).
    uint64_t floor = 0;
    if (p.top_k > 0 && p.top_k < vocab) floor = KthKey(x, vocab, key, bits, p.top_k, scratch);
    const double inv_t = 1.0 / static_cast<double>(p.temperature);
    const double max_scaled = __dmul_rn(max_logit, inv_t);
    // exp(logit / T - max / T) rounded step by step as the reference does
    // (no fused multiply-add; exp itself may differ from glibc's in the last
    // bit, which moves a draw only when it falls that close to a boundary).
    const auto prob = [&](float v) {
      return exp(__dsub_rn(__dmul_rn(SamplingLogit(v), inv_t), max_scaled));
    };
    // Probability mass of the kept elements (key >= floor).
    const auto kept_mass = [&] {
      double m = 0.0;
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (key(v, i) >= floor) m += prob(v);
      }
      return BlockReduce(m, SumOp{}, scratch);
    };
    auto* mass_scratch = reinterpret_cast<double*>(scratch);
    double total = kept_mass();
    if (p.top_p < 1.0f) {
      // The smallest prefix whose normalised mass (each term divided by the
      // total, as the reference sums it) reaches top_p ends at the largest
      // key whose prefix mass does; none (rounding) keeps all.
      const double top_p = p.top_p;
      const double norm = total;
      const uint64_t t = LargestKeyWhere(
          x, vocab, key, bits, floor, [&](float v) { return prob(v) / norm; },
          [&](double mass) { return mass >= top_p; }, mass_scratch);
      if (t > floor) floor = t;
      total = kept_mass();
    }
    // The draw: the first element whose prefix mass exceeds u * total, i.e.
    // the largest key whose prefix mass does; the last kept one if rounding
    // leaves none (or the row's mass is NaN).
    const double target = p.uniform * total;
    uint64_t t = LargestKeyWhere(
        x, vocab, key, bits, floor, prob, [&](double mass) { return mass > target; }, mass_scratch);
    if (t == 0) {
      uint64_t lowest = ~uint64_t{0};
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const uint64_t k = key(x[i], i);
        if (k >= floor) lowest = MinOp{}(lowest, k);
      }
      t = BlockReduce(lowest, MinOp{}, scratch);
    }
    chosen = key.Id(t);
  }

  if (p.num_top > 0) {
    const uint64_t t = p.num_top < vocab ? KthKey(x, vocab, key, bits, p.num_top, scratch) : 0;
    if (threadIdx.x == 0) top_count = 0;
    __syncthreads();
    DeviceTopEntry* out = top + p.top_offset;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = x[i];
      if (key(v, i) >= t) {
        const int32_t slot = atomicAdd(&top_count, 1);
        if (slot < p.num_top) out[slot] = {static_cast<int32_t>(i), SamplingLogit(v)};
      }
    }
  }
  if (threadIdx.x == 0) results[row] = {chosen, SamplingLogit(x[chosen]), log_z};
}

}  // namespace

cudaError_t SampleRows(const float* logits, int64_t rows, int64_t vocab,
                       const DeviceSamplingRow* params, DeviceSampledRow* results,
                       DeviceTopEntry* top, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (vocab < 1 || vocab > INT32_MAX || rows > INT32_MAX) return cudaErrorInvalidValue;
  SamplingKey key{0, static_cast<int32_t>(vocab - 1)};
  while ((int64_t{1} << key.id_bits) < vocab) ++key.id_bits;
  SampleKernel<<<static_cast<unsigned>(rows), kSampleThreads, 0, stream>>>(
      logits, vocab, key, 32 + key.id_bits, params, results, top);
  return cudaGetLastError();
}

}  // namespace loraserve::kernels::cuda
