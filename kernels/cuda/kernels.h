// CUDA kernels of the CUDA backend, as plain entry points: raw device
// pointers, sizes and a stream, with every tensor's layout written beside it.
// Each returns the launch's error (cudaGetLastError), never aborts.
//
// Device-side checks: indices that come from device memory (token ids, slots,
// positions, block ids) cannot be checked on the host without a copy, so the
// kernels check them and, on a bad one, write NaN where the output would go
// and record a KernelError code in `*error` (first one wins); the backend
// reports it at the next synchronising call.
#ifndef LORASERVE_KERNELS_CUDA_KERNELS_H_
#define LORASERVE_KERNELS_CUDA_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/backend.h"

namespace loraserve::kernels::cuda {

enum KernelError : int32_t {
  kNoKernelError = 0,
  kEmbeddingIdOutOfRange = 1,
  kRopePositionNegative = 2,
  kWriteKvSlotOutOfRange = 3,
  kAttentionPositionOutOfRange = 4,
  kAttentionBlockOutOfRange = 5,
};

// What a KernelError code means, for error messages.
const char* KernelErrorName(int32_t code);

// One LoRA segment as the segmented kernels read it from device memory.
struct DeviceLoraSegment {
  int32_t start;  // first token row
  int32_t end;    // one past the last token row
  int32_t rank;
  float scale;
  const void* a;     // [rank, in] of the call's lora_dtype
  const void* bt;    // [rank, out] of the call's lora_dtype
  int64_t t_offset;  // floats before this segment's part of the packed t
};

// A segment table in device memory: this header, then `count` segments
// (DeviceLoraSegment, 16-byte aligned right after it). The count lives on the
// device so that a recorded step graph can be launched again with another
// table of the same capacity: kernels launched over more blocks than `count`
// leave the extra blocks idle.
struct DeviceLoraTable {
  int32_t count;
  int32_t reserved[3];
};

// The segments of `table`.
__host__ __device__ inline const DeviceLoraSegment* TableSegments(const DeviceLoraTable* table) {
  return reinterpret_cast<const DeviceLoraSegment*>(table + 1);
}

// Bytes of a table with room for `capacity` segments.
inline size_t LoraTableBytes(int32_t capacity) {
  return sizeof(DeviceLoraTable) + static_cast<size_t>(capacity) * sizeof(DeviceLoraSegment);
}

// Largest head_dim PagedAttention supports (registers per lane: head_dim / 32).
inline constexpr int32_t kMaxAttentionHeadDim = 256;

// dst[i] = src[i] converted, for `count` elements (float32 via the nearest
// even rounding of __float2bfloat16_rn / __float2half_rn).
cudaError_t ConvertElements(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                            int64_t count, cudaStream_t stream);

// y[i, :] = float(table[ids[i], :]).
cudaError_t EmbeddingGather(const int32_t* ids,  // [n]
                            int64_t n,
                            const void* table,  // [vocab, hidden] of table_dtype
                            DType table_dtype, int64_t vocab, int64_t hidden,
                            float* y,  // [n, hidden]
                            int32_t* error, cudaStream_t stream);

// y = weight * (x * rsqrt(mean(x²) + eps)) per row; y may alias x. With
// `converted` (else null), y also goes there in `converted_dtype`, rounded as
// ConvertElements rounds: the operand of a GEMM in that dtype.
cudaError_t RmsNormRows(const float* x,       // [n, dim]
                        const float* weight,  // [dim]
                        int64_t n, int64_t dim, float eps,
                        float* y,         // [n, dim]
                        void* converted,  // [n, dim] of converted_dtype, or null
                        DType converted_dtype, cudaStream_t stream);

// x += y
cudaError_t AddInPlace(float* x,        // [count]
                       const float* y,  // [count]
                       int64_t count, cudaStream_t stream);

// x[i, :] += bias
cudaError_t AddBiasRows(float* x,           // [n, dim]
                        const float* bias,  // [dim]
                        int64_t n, int64_t dim, cudaStream_t stream);

// out = silu(gate) * up. With `converted` (else null), out also goes there
// in `converted_dtype`, as in RmsNormRows.
cudaError_t SiluMulRows(const float* gate_up,  // [n, 2 * dim]: gate | up per row
                        int64_t n, int64_t dim,
                        float* out,       // [n, dim]
                        void* converted,  // [n, dim] of converted_dtype, or null
                        DType converted_dtype, cudaStream_t stream);

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

// Segmented shrink, one launch over segment blocks [0, grid_segments) of
// which the first table->count work:
// t[seg.t_offset + (row - seg.start) * seg.rank + r] = x[row, :] · seg.a[r, :].
// `max_work` bounds (end - start) * rank over the segments; it only sizes the
// grid (the kernel strides over whatever work a segment has).
cudaError_t LoraShrinkSegments(const float* x,  // [tokens, in]
                               int64_t in,
                               const DeviceLoraTable* table,  // device
                               DType lora_dtype,              // of every segment's a and bt
                               int32_t grid_segments, int64_t max_work,
                               float* t,  // packed intermediate
                               cudaStream_t stream);

// Segmented expand, one launch over (segment block, column tile, row slice):
// y[row, 0:out] += seg.scale * Σ_r t_seg[row, r] * seg.bt[r, 0:out]. Segments
// may cover the same rows; each row gets their terms in table order.
// `max_rows` bounds end - start over the segments; it only sizes the grid.
cudaError_t LoraExpandSegments(const float* t,                // packed intermediate
                               const DeviceLoraTable* table,  // device
                               DType lora_dtype,              // of every segment's a and bt
                               int32_t grid_segments, int64_t max_rows, int64_t out,
                               float* y,  // [tokens, ldy], columns [0, out)
                               int64_t ldy, cudaStream_t stream);

// out = base + scale * btᵀ · a, in base's dtype (sum in float32, one rounding).
cudaError_t MergeLoraWeights(const void* base,  // [rows, cols] of dtype
                             DType dtype, int64_t rows, int64_t cols,
                             const void* a,   // [rank, cols] of lora_dtype
                             const void* bt,  // [rank, rows] of lora_dtype
                             DType lora_dtype, int32_t rank, float scale,
                             void* out,  // [rows, cols] of dtype
                             cudaStream_t stream);

// --- sampling ----------------------------------------------------------------

// One row's sampling parameters as SampleRows reads them (device memory).
struct DeviceSamplingRow {
  float temperature;   // 0 = greedy
  int32_t top_k;       // 0 = off
  float top_p;         // 1 = off
  int32_t num_top;     // top entries to collect: min(num_top_logprobs, vocab)
  double uniform;      // the row's draw in [0, 1)
  int64_t top_offset;  // first entry of this row in SampleRows' `top`
};

// What SampleRows finds for one row; the host turns it into logprobs.
struct DeviceSampledRow {
  int32_t id;    // the chosen token
  float logit;   // its logit (NaN read as -inf)
  double log_z;  // logsumexp of the row (NaN read as -inf), in double
};

// One of a row's most likely tokens.
struct DeviceTopEntry {
  int32_t id;
  float logit;  // NaN read as -inf
};

// Samples every row of `logits` as kernels::SampleRow does (one block per
// row, one launch): token ids are ranked by a 64-bit key (the order-preserving
// bits of the logit above the inverted id), and the top-k, top-p, draw and
// top-n thresholds are found by building a key bit by bit with block
// reductions (counts, or probability mass in double), so nothing is sorted.
// Each row's num_top entries land in top[top_offset, top_offset + num_top),
// in no particular order. `vocab` must be in [1, 2^31).
cudaError_t SampleRows(const float* logits,  // [rows, vocab]
                       int64_t rows, int64_t vocab,
                       const DeviceSamplingRow* params,  // [rows] device
                       DeviceSampledRow* results,        // [rows] device
                       DeviceTopEntry* top,              // [Σ num_top] device
                       cudaStream_t stream);

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_KERNELS_H_
