// The CUDA backend's attention kernels: rotary embedding, paged KV writes
// and paged attention. Plain entry points: raw device pointers, sizes and a
// stream, with every tensor's layout written beside it. Each returns the
// launch's error (cudaGetLastError), never aborts; the device-side checks are
// described with KernelError (cuda_status.h).
#ifndef LORASERVE_KERNELS_CUDA_ATTENTION_H_
#define LORASERVE_KERNELS_CUDA_ATTENTION_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/backend.h"

namespace loraserve::kernels::cuda {

// Largest head_dim PagedAttention supports (registers per lane: head_dim / 32).
inline constexpr int32_t kMaxAttentionHeadDim = 256;

// Rotate-half rotary embedding in place, angle = float(position) * inv_freq[i].
cudaError_t RopeInPlace(float* q,  // [tokens, q_ld]: num_heads heads of head_dim
                        int64_t q_ld,
                        float* k,  // [tokens, k_ld]: num_kv_heads heads of head_dim
                        int64_t k_ld,
                        const int32_t* positions,  // [tokens]
                        int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                        const float* inv_freq,  // [head_dim / 2]
                        int32_t head_dim, float attention_scaling, int32_t* error,
                        cudaStream_t stream);

// k_cache[slot_mapping[t]] = k[t] and likewise for v, rounded to the cache's
// `cache_dtype`; tokens whose slot is kPaddingSlot are skipped.
cudaError_t WriteKvSlots(const float* k,  // [tokens, kv_ld]: slot_floats used
                         const float* v,  // [tokens, kv_ld]: slot_floats used
                         int64_t kv_ld,
                         const int32_t* slot_mapping,          // [tokens]
                         int64_t tokens, int64_t slot_floats,  // kv_heads * head_dim
                         int64_t num_slots,                    // num_blocks * block_size
                         DType cache_dtype,
                         void* k_cache,  // [num_slots, slot_floats]
                         void* v_cache,  // [num_slots, slot_floats]
                         int32_t* error, cudaStream_t stream);

// Causal attention of every token over cache positions 0 .. positions[t] of
// its sequence, one block per (token, head), online softmax in float32.
cudaError_t PagedAttentionForward(
    const float* q,  // [tokens, q_ld]: num_heads heads of head_dim
    int64_t q_ld, int32_t tokens, int32_t num_seqs,
    const int32_t* query_start,   // [num_seqs + 1]
    const int32_t* context_lens,  // [num_seqs]
    const int32_t* block_tables,  // [num_seqs, max_blocks_per_seq]
    int32_t max_blocks_per_seq,
    const int32_t* positions,  // [tokens]
    int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    int32_t num_blocks, DType cache_dtype,
    const void* k_cache,  // [num_blocks, block_size, num_kv_heads, head_dim] of cache_dtype
    const void* v_cache,  // [num_blocks, block_size, num_kv_heads, head_dim] of cache_dtype
    float* out,           // [tokens, num_heads * head_dim]
    int32_t* error, cudaStream_t stream);

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_ATTENTION_H_
