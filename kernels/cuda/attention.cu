// The kernels behind kernels/cuda/attention.h.
#include <cmath>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/device_common.cuh"

namespace loraserve::kernels::cuda {
namespace {

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

}  // namespace

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

}  // namespace loraserve::kernels::cuda
