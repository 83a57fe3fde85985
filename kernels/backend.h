// The compute boundary of loraserve.
//
// A Backend owns device memory and runs the tensor operations of a decoder-only
// transformer step. It knows tensors, never models or adapters: callers pass raw
// device pointers, sizes and layouts (written beside every argument), so the
// same interface serves the CPU reference and the CUDA implementation.
//
// Conventions
//  - Activations are float32 and row-major; "[tokens, hidden]" means `tokens`
//    rows of `hidden` contiguous floats.
//  - Weights are `WeightView`s in the backend's storage dtype, laid out as in a
//    Hugging Face checkpoint: [out_features, in_features], row-major, so a
//    linear layer is y = x · Wᵀ.
//  - Every pointer handed to an operation was allocated by the same backend
//    (device memory). Integer metadata (positions, block tables, ...) is in
//    device memory too; `CopyToDevice` puts it there.
//  - Operations return a Status instead of aborting: a bad argument or a
//    device error fails the step, never the process.
//
// Threading: a Backend is used by one thread at a time (the engine loop).
// Allocation and copies may be called from that thread only as well.
//
// Example:
//   ASSIGN_OR_RETURN(auto backend, CreateCpuBackend({.num_threads = 2}));
//   ASSIGN_OR_RETURN(DeviceBuffer x, backend->Allocate(rows * cols * 4));
#ifndef LORASERVE_KERNELS_BACKEND_H_
#define LORASERVE_KERNELS_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/sampling.h"

namespace loraserve::kernels {

// Element types of tensors. kQ8 is a weight format, not an element type:
// int8 values quantized symmetrically in groups of kQ8GroupSize along each
// row, one float32 scale per group (see kernels/quantization.h).
enum class DType { kF32, kF16, kBF16, kQ8 };

// Columns of a weight row that share one kQ8 scale.
inline constexpr int64_t kQ8GroupSize = 128;

// Bytes of one element (1 for kQ8's values; its rows also hold their scales,
// so size kQ8 weights with WeightRowBytes).
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);
// Whether `dtype` is one of the enumerators (a value cast from an int may not be).
bool IsKnownDType(DType dtype);
// Bytes of one row of `cols` weights stored as `dtype`; rows of a matrix lie
// this many bytes apart.
int64_t WeightRowBytes(DType dtype, int64_t cols);
// Bytes of a [rows, cols] weight matrix stored as `dtype`.
int64_t WeightBytes(DType dtype, int64_t rows, int64_t cols);

// Host-side conversion of `count` elements to float32 (exact for F16 and BF16,
// subnormals, infinities and NaN included; kQ8: one row of `count` weights).
void ConvertToFloat32(const void* src, DType src_dtype, int64_t count, float* dst);
// Host-side rounding of `count` floats to bfloat16 bits, to nearest with ties
// to even as __float2bfloat16_rn does; NaN stays NaN.
void ConvertFloat32ToBf16(const float* src, int64_t count, uint16_t* dst);
// Host-side rounding of `count` floats to IEEE half bits, to nearest with ties
// to even (F16C's vcvtps2ph); beyond the half range gives infinity.
void ConvertFloat32ToF16(const float* src, int64_t count, uint16_t* dst);

class Backend;

// Owns one allocation of device memory; frees it through its backend when
// destroyed. Move-only. The backend must outlive every buffer it handed out.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* backend, void* data, size_t bytes)
      : backend_(backend), data_(data), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  void Reset();

 private:
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A weight matrix in device memory: [rows = out_features, cols = in_features],
// rows WeightRowBytes(dtype, cols) bytes apart.
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
};

// slot_mapping value of a padding token (a decode step padded up to the batch
// size of a recorded step graph): WriteKv writes nothing for it, and its
// sequence's outputs are never read.
inline constexpr int32_t kPaddingSlot = -1;

// Describes the sequences of one step for attention over the paged KV cache.
// Tokens of one sequence are contiguous in the batch.
struct AttentionBatch {
  int32_t num_seqs = 0;
  int32_t num_tokens = 0;
  const int32_t* query_start = nullptr;   // [num_seqs + 1] first token of each sequence
  const int32_t* context_lens = nullptr;  // [num_seqs] tokens in the KV cache after this step
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq] block ids
  int32_t max_blocks_per_seq = 0;
  const int32_t* slot_mapping = nullptr;  // [num_tokens] block * block_size + offset,
                                          // or kPaddingSlot
  const int32_t* positions = nullptr;     // [num_tokens] absolute position of each token
};

// Shapes of one layer's paged KV cache: [num_blocks, block_size, kv_heads,
// head_dim] elements of `dtype` (the backend's KvCacheDType).
struct KvLayout {
  int32_t num_blocks = 0;
  int32_t block_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kF32;
};

// Bytes of one layer's K pool (or V pool) of `layout`.
int64_t KvPoolBytes(const KvLayout& layout);

// Rotary embedding parameters; inv_freq already includes any scaling
// (e.g. llama3), so the kernel only rotates.
struct RopeParams {
  const float* inv_freq = nullptr;  // [head_dim / 2] device memory
  int32_t head_dim = 0;
  float attention_scaling = 1.0f;  // multiplies cos and sin (1 for default and llama3)
};

// One run of tokens that share a LoRA adapter (and scale) in a segmented
// shrink/expand: for the token rows [start, end) of the batch,
//   y[start:end] += scale · (x[start:end] · aᵀ) · bt   (bt = Bᵀ).
// Each segment runs at its own rank: nothing is padded to the largest.
// The intermediate t of all segments is packed: segment s occupies
// (end_s - start_s) · rank_s floats, segments in order.
// `a` and `bt` hold elements of the backend's LoraDType().
struct LoraSegment {
  int32_t start = 0;
  int32_t end = 0;
  const void* a = nullptr;   // [rank, in] device memory
  const void* bt = nullptr;  // [rank, out] device memory: Bᵀ, so the expand is
                             // rank scaled rows added to each output row
  int32_t rank = 0;
  float scale = 0.0f;
};

// Floats of the packed intermediate of `segments` (see LoraSegment).
int64_t LoraIntermediateSize(const LoraSegment* segments, int32_t num_segments);

// One run of token rows whose outputs are multiplied column by column (DoRA's
// magnitude over the weight norm, m / ‖W + s·B·A‖, for its adapter's rows).
struct ColumnScaleSegment {
  int32_t start = 0;
  int32_t end = 0;
  const float* scale = nullptr;  // [cols] device memory
};

// The operations are non-virtual: each checks its arguments here, once for
// every backend (kernels/backend.cc), and then calls the backend's protected
// Do* implementation, which may assume them checked: pointers not null where
// there is work, sizes in range, weights, layouts and segment tables well
// formed. A backend checks only its own limits (dtypes it does not compute
// in, sizes beyond a library's int) and, where it can read device memory
// cheaply (the CPU), the indices held there; the CUDA backend checks those
// on the device. An op with nothing to do (zero rows, tokens or bytes)
// returns OK without calling the backend, except the LoRA shrink and expand
// (see DoLoraShrink). A bad argument is INVALID_ARGUMENT, named as
// "<backend name>: <op>: <what>".
class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;

  // --- memory -------------------------------------------------------------
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  absl::Status CopyToDevice(void* dst, const void* src, size_t bytes);
  // Starts a copy to the device without waiting for it to land: operations
  // called afterwards see the data (they are ordered after the copy), and
  // `src` may be reused as soon as this returns. The CUDA backend stages it
  // through pinned memory and copies on a stream of its own, so an adapter
  // upload overlaps the kernels already queued. The default is CopyToDevice.
  absl::Status CopyToDeviceAsync(void* dst, const void* src, size_t bytes);
  absl::Status CopyToHost(void* dst, const void* src, size_t bytes);
  absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes);
  // Converts a [rows, cols] matrix of `src_dtype` (F32, F16 or BF16) on the
  // host (rows contiguous) into the backend's storage dtype for weights of
  // that source (see WeightDType) at `dst`: WeightBytes(WeightDType(src_dtype),
  // rows, cols) bytes. Rows are what kQ8 quantizes in groups along; a weight
  // that cannot be stored (a non-finite value to quantize) is
  // INVALID_ARGUMENT.
  absl::Status UploadWeight(void* dst, const void* src, DType src_dtype, int64_t rows,
                            int64_t cols);
  // The dtype in which this backend stores a weight that arrives as `source`.
  virtual DType WeightDType(DType source) const = 0;
  // The element dtype of the KV caches the model allocates for WriteKv and
  // PagedAttention (KvLayout::dtype). Keys and values are computed in float32
  // and rounded to it when written.
  virtual DType KvCacheDType() const { return DType::kF32; }
  // The element dtype of LoRA A and Bᵀ matrices (LoraSegment, MergeLora).
  // Shrink, expand and merge compute in float32 whatever it is.
  virtual DType LoraDType() const { return DType::kF32; }
  // Waits for all queued work (a no-op on the CPU).
  virtual absl::Status Synchronize() = 0;
  // Returns memory from Allocate; called by DeviceBuffer only.
  virtual void Free(void* data, size_t bytes) = 0;

  // --- dense --------------------------------------------------------------
  // y = x · Wᵀ (+ y when accumulate).
  absl::Status Linear(const float* x,       // [m, w.cols]
                      const WeightView& w,  // [n = w.rows, w.cols]
                      int64_t m,
                      float* y,  // [m, n]
                      bool accumulate);
  // y[i, :] = table[ids[i], :] (converted to f32).
  absl::Status Embedding(const int32_t* ids,  // [n]
                         int64_t n,
                         const WeightView& table,  // [vocab, hidden]
                         float* y);                // [n, hidden]
  // y = x / rms(x) * weight, per row.
  absl::Status RmsNorm(const float* x,       // [n, dim]
                       const float* weight,  // [dim]
                       int64_t n, int64_t dim, float eps,
                       float* y);  // [n, dim]; may alias x
  // h = RmsNorm(x) and y = h · Wᵀ: a norm whose output feeds a projection
  // (and the LoRA shrink, which reads h). The default runs RmsNorm, then
  // Linear; the CUDA backend writes the GEMM's copy of h in the weight's
  // dtype (bf16, f16) in the norm's own pass instead of converting h again.
  // y must not alias h.
  absl::Status RmsNormLinear(const float* x,            // [n, dim]
                             const float* norm_weight,  // [dim]
                             int64_t n, int64_t dim, float eps,
                             float* h,             // [n, dim]; may alias x
                             const WeightView& w,  // [rows, dim]
                             float* y);            // [n, w.rows]
  // act = silu(gate) * up and y = act · Wᵀ (+ y when accumulate): the gate
  // that feeds the down projection (and its LoRA shrink, which reads act).
  // The default runs SiluMul, then Linear; the CUDA backend writes the GEMM's
  // copy of act in the weight's dtype in the gate's own pass, as
  // RmsNormLinear does. y must not alias act.
  absl::Status SiluMulLinear(const float* gate_up,  // [n, 2 * dim]
                             int64_t n, int64_t dim,
                             float* act,           // [n, dim]
                             const WeightView& w,  // [rows, dim]
                             float* y,             // [n, w.rows]
                             bool accumulate);
  // x += y
  absl::Status Add(float* x, const float* y, int64_t count);
  // x[i, :] += bias for every row (q/k/v biases of Qwen2).
  absl::Status AddBias(float* x,           // [n, dim]
                       const float* bias,  // [dim]
                       int64_t n, int64_t dim);
  // out = silu(gate) * up, where gate_up holds [gate | up] per row.
  absl::Status SiluMul(const float* gate_up,  // [n, 2 * dim]
                       int64_t n, int64_t dim,
                       float* out);  // [n, dim]

  // --- LoRA ---------------------------------------------------------------
  // Segmented shrink: t_s = x[start_s:end_s] · a_sᵀ for every segment.
  // `segments` is a host array.
  absl::Status LoraShrink(const float* x,  // [tokens, in]
                          int64_t in, const LoraSegment* segments, int32_t num_segments,
                          float* t);  // packed, LoraIntermediateSize floats
  // Segmented expand: y[start_s:end_s, 0:out] += scale_s · t_s · bt_s, where
  // rows of y are `ldy` floats apart (y may be a column slice of a wider
  // output, e.g. the gate half of a fused gate/up activation). Segments may
  // cover the same rows (a sequence's adapter and the correction for merged
  // weights); each row gets their terms in segment order.
  absl::Status LoraExpand(const float* t, const LoraSegment* segments, int32_t num_segments,
                          int64_t out,
                          float* y,  // [tokens, ldy], columns [0, out) updated
                          int64_t ldy);
  // out = base + scale · btᵀ · a, a merged copy of one weight matrix; `base`
  // stays untouched (it is the golden copy). `out` has base's dtype and shape.
  // With `row_scale`, each row of the sum is multiplied by its entry first
  // (DoRA's merged weight: m / ‖W + s·B·A‖ per output row).
  absl::Status MergeLora(const WeightView& base,
                         const void* a,   // [rank, base.cols] of LoraDType()
                         const void* bt,  // [rank, base.rows] of LoraDType()
                         int32_t rank, float scale,
                         void* out,  // [base.rows, base.cols]
                         const float* row_scale = nullptr);  // [base.rows] device memory
  // y[start_s:end_s, c] *= scale_s[c] for c < cols, for every segment; rows
  // of y are `ldy` floats apart. `segments` is a host array.
  absl::Status ScaleColumns(float* y, int64_t ldy, int64_t cols,
                            const ColumnScaleSegment* segments, int32_t num_segments);

  // --- step graphs --------------------------------------------------------
  // A backend that supports them (CUDA graphs) records a step's operations
  // the first time it sees the step's `key` and, on later steps with that
  // key, launches the recording as a whole instead of each operation. The
  // caller still calls every operation, in the same order with the same
  // arguments; only the host-side inputs the backend copies per call (LoRA
  // segment tables, at most `max_segments` segments each) may differ.
  // Per-step data in device memory (positions, slots, block tables, ...) is
  // uploaded before BeginStep, into the same buffers each time.
  //
  // Between BeginStep and EndStep only operations may be called: no
  // allocation, copy or synchronisation. If BeginStep, an operation or
  // EndStep fails (for instance a call that differs from the recording), the
  // caller calls AbortStep and runs the step's operations again without a
  // step: nothing of the step has run. EndStep queues the whole step.
  virtual bool SupportsStepGraphs() const { return false; }
  virtual absl::Status BeginStep(uint64_t key, int32_t max_segments);
  virtual absl::Status EndStep();
  virtual void AbortStep() {}

  // --- attention ----------------------------------------------------------
  // q, k and v are read (and q and k rotated) row by row, rows `*_ld` floats
  // apart, at least a row's width: each may be a column slice of the fused
  // q|k|v projection of every token.
  //
  // Rotates q and k in place (Hugging Face's rotate-half layout).
  absl::Status Rope(float* q,  // [tokens, q_ld]: num_heads heads of head_dim
                    int64_t q_ld,
                    float* k,  // [tokens, k_ld]: num_kv_heads heads of head_dim
                    int64_t k_ld,
                    const int32_t* positions,  // [tokens]
                    int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                    const RopeParams& rope);
  // Writes each token's k and v into its slot of the paged cache (none for a
  // kPaddingSlot token).
  absl::Status WriteKv(const float* k,  // [tokens, kv_ld]: kv_heads heads of head_dim
                       const float* v,  // [tokens, kv_ld]: likewise
                       int64_t kv_ld, const AttentionBatch& batch, const KvLayout& layout,
                       void* k_cache,  // [num_blocks, block_size, kv_heads, head_dim]
                       void* v_cache);
  // Causal attention of each token over its sequence's cached keys and values
  // (positions 0 .. its own), with grouped-query heads.
  absl::Status PagedAttention(const float* q,  // [tokens, q_ld]: num_heads heads
                              int64_t q_ld, const AttentionBatch& batch, const KvLayout& layout,
                              int32_t num_heads, const void* k_cache, const void* v_cache,
                              float* out);  // [tokens, num_heads * head_dim]

  // --- sampling -----------------------------------------------------------
  // Samples the next token of every row as `params[row]` says, with the
  // results of SampleRow (kernels/sampling.h), and writes them to `out[row]`.
  // Only the results cross to the host, never the logits. A backend that sums
  // probabilities in another order may differ from SampleRow only where a
  // draw or top_p falls within rounding of a boundary, and in the last bits
  // of logprobs. Parameters are checked first (ValidateSamplingRow); `vocab`
  // must be in [1, INT32_MAX].
  absl::Status Sample(const float* logits,  // [rows, vocab] device memory
                      int64_t rows, int64_t vocab,
                      const SamplingRow* params,  // [rows] host memory
                      SampledToken* out);         // [rows] host memory

 protected:
  // The implementations of the operations above, called with arguments
  // checked as the class comment says.
  virtual absl::Status DoCopyToDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status DoCopyToDeviceAsync(void* dst, const void* src, size_t bytes) {
    return DoCopyToDevice(dst, src, bytes);
  }
  virtual absl::Status DoCopyToHost(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status DoCopyOnDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status DoUploadWeight(void* dst, const void* src, DType src_dtype, int64_t rows,
                                      int64_t cols) = 0;
  virtual absl::Status DoLinear(const float* x, const WeightView& w, int64_t m, float* y,
                                bool accumulate) = 0;
  virtual absl::Status DoEmbedding(const int32_t* ids, int64_t n, const WeightView& table,
                                   float* y) = 0;
  virtual absl::Status DoRmsNorm(const float* x, const float* weight, int64_t n, int64_t dim,
                                 float eps, float* y) = 0;
  // The defaults compose the unfused ops (see RmsNormLinear, SiluMulLinear).
  virtual absl::Status DoRmsNormLinear(const float* x, const float* norm_weight, int64_t n,
                                       int64_t dim, float eps, float* h, const WeightView& w,
                                       float* y);
  virtual absl::Status DoSiluMulLinear(const float* gate_up, int64_t n, int64_t dim, float* act,
                                       const WeightView& w, float* y, bool accumulate);
  virtual absl::Status DoAdd(float* x, const float* y, int64_t count) = 0;
  virtual absl::Status DoAddBias(float* x, const float* bias, int64_t n, int64_t dim) = 0;
  virtual absl::Status DoSiluMul(const float* gate_up, int64_t n, int64_t dim, float* out) = 0;
  // Called with num_segments == 0 as well (x, t and `in` are then
  // unchecked): a recorded step graph launches the LoRA kernels of a step
  // whose table is empty, since the same step with segments replays it.
  virtual absl::Status DoLoraShrink(const float* x, int64_t in, const LoraSegment* segments,
                                    int32_t num_segments, float* t) = 0;
  virtual absl::Status DoLoraExpand(const float* t, const LoraSegment* segments,
                                    int32_t num_segments, int64_t out, float* y, int64_t ldy) = 0;
  virtual absl::Status DoMergeLora(const WeightView& base, const void* a, const void* bt,
                                   int32_t rank, float scale, void* out, const float* row_scale) = 0;
  virtual absl::Status DoScaleColumns(float* y, int64_t ldy, int64_t cols,
                                      const ColumnScaleSegment* segments,
                                      int32_t num_segments) = 0;
  virtual absl::Status DoRope(float* q, int64_t q_ld, float* k, int64_t k_ld,
                              const int32_t* positions, int64_t tokens, int32_t num_heads,
                              int32_t num_kv_heads, const RopeParams& rope) = 0;
  virtual absl::Status DoWriteKv(const float* k, const float* v, int64_t kv_ld,
                                 const AttentionBatch& batch, const KvLayout& layout, void* k_cache,
                                 void* v_cache) = 0;
  virtual absl::Status DoPagedAttention(const float* q, int64_t q_ld, const AttentionBatch& batch,
                                        const KvLayout& layout, int32_t num_heads,
                                        const void* k_cache, const void* v_cache, float* out) = 0;
  virtual absl::Status DoSample(const float* logits, int64_t rows, int64_t vocab,
                                const SamplingRow* params, SampledToken* out) = 0;
};

struct CpuBackendOptions {
  // Threads for GEMM and for the backend's own loops; 0 = all cores.
  int num_threads = 0;
  // Storage dtype of every weight matrix, whatever the checkpoint holds:
  // kF32 (exact float32 math, the reference), kBF16 or kF16 (half the bytes a
  // decode step reads), or kQ8 (int8, about a quarter). GEMMs widen weights
  // to float32 in registers and sum in float32 over float32 activations, so
  // a narrower dtype only rounds the weights. Adapters are float32 beside
  // kF32 weights and bf16 beside the others (LoraDType).
  DType weight_dtype = DType::kF32;
};

// The CPU backend: always available.
absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options);

struct CudaBackendOptions {
  // CUDA device ordinal.
  int device = 0;
  // Storage dtype of weights arriving as F32 or BF16: kBF16 (the default:
  // half the bytes, bf16 GEMM operands with float32 accumulation) or kF32
  // (float32 GEMMs without TF32, for exact comparisons with the CPU). F16
  // weights stay F16 under kBF16.
  DType weight_dtype = DType::kBF16;
};

// The CUDA backend (kernels/cuda). Fails with FailedPrecondition when this
// build has no CUDA or when no GPU is present; the message says which.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options);

}  // namespace loraserve::kernels

#endif  // LORASERVE_KERNELS_BACKEND_H_
