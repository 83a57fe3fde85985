// The CUDA backend: weights in GPU memory as bf16 (f16 kept as f16, or all
// float32 on request), GEMMs through cuBLAS with float32 accumulation, every
// other operation a kernel of kernels/cuda (elementwise.h, attention.h,
// lora.h, sampling.h). All work is queued on one non-blocking stream owned by
// the backend; asynchronous uploads run on a second one, and the first waits
// for them.
//
// Ownership: the backend owns its compute stream, a copy stream for
// CopyToDeviceAsync (with pinned staging), its cuBLAS handle and workspace,
// scratch buffers, its step graphs (StepGraphs) and the pinned/device buffers
// that carry LoRA segment tables and sampling parameters; DeviceBuffers it
// hands out own their cudaMalloc allocations. One thread at a time (see
// Backend); each call makes the backend's device current on that thread, so
// the engine loop may run on another thread than the one that created it.
//
// Step graphs (capture, signature checks, replay, the LoRA table arena) live
// in kernels/cuda/step_graphs.h; every operation launches through
// StepGraphs::Launch.
//
// Errors: arguments arrive checked (Backend, kernels/backend.cc); what is
// left here are this backend's own limits (no Q8 weights, cuBLAS's int sizes,
// the attention kernel's head_dim). Every CUDA and cuBLAS result becomes a
// Status naming the call. Indices read on the device (token ids, slots,
// positions, block tables) are checked there; a bad one is reported by the
// next Synchronize or CopyToHost.

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/elementwise.h"
#include "kernels/cuda/lora.h"
#include "kernels/cuda/pinned_mirror.h"
#include "kernels/cuda/sampling.h"
#include "kernels/cuda/step_graphs.h"

namespace loraserve::kernels {
namespace {

using cuda::DeviceLoraTable;
using cuda::PinnedMirror;
using cuda::StepGraphs;

// Elements converted per chunk when weights are uploaded in another dtype.
constexpr int64_t kUploadChunk = int64_t{16} << 20;
// LoRA segment tables in flight: a table's pinned host copy is reused only
// after its upload finished, which is long done after this many later calls.
constexpr int kSegmentSlots = 16;
// CopyToDeviceAsync stages through this many pinned chunks of this size; a
// chunk is refilled once its previous copy has landed.
constexpr int kCopyChunks = 4;
constexpr size_t kCopyChunkBytes = size_t{8} << 20;
// cuBLAS gets its workspace from us: it must not allocate while a step graph
// is captured. 32 MiB is what cuBLAS itself takes on Hopper.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
// In a step graph the LoRA grids cannot follow each step's segments: the
// shrink is sized for max_segments (segment, row) pairs, which a decode step
// (one row per request, each row covered by at most two segments) never
// exceeds, and this many rank groups (rank 16), striding over more; the
// expand for max_segments rows.
constexpr int32_t kStepShrinkRankGroups = 16 / cuda::kLoraShrinkRankGroup;

absl::Status Invalid(const char* op, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("CudaBackend::", op, ": ", what));
}

cudaDataType_t CudaDataType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kQ8:  // refused by CheckWeight
      break;
  }
  return CUDA_R_32F;
}

// This backend's own limit on weights: cuBLAS has no int8 GEMMs here.
absl::Status CheckNotQ8(const char* op, const char* arg, const WeightView& w) {
  if (w.dtype == DType::kQ8) return Invalid(op, absl::StrCat(arg, " is Q8: no int8 GEMMs on CUDA"));
  return absl::OkStatus();
}

// What sizes a LoRA launch outside a step graph.
struct SegmentStats {
  int32_t rows = 0;   // one past the last covered row
  int32_t pairs = 0;  // (segment, row) pairs
  int32_t max_rank = 0;
};

SegmentStats StatsOf(const LoraSegment* segments, int32_t num_segments) {
  SegmentStats stats;
  for (int32_t i = 0; i < num_segments; ++i) {
    stats.rows = std::max(stats.rows, segments[i].end);
    stats.pairs += segments[i].end - segments[i].start;
    stats.max_rank = std::max(stats.max_rank, segments[i].rank);
  }
  return stats;
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, DType weight_dtype) : device_(device), weight_dtype_(weight_dtype) {}

  ~CudaBackend() override {
    // Nothing to report to: errors on the way out are ignored.
    cudaSetDevice(device_);
    if (stream_ != nullptr) cudaStreamSynchronize(stream_);
    for (SegmentSlot& slot : segment_slots_) {
      if (slot.done != nullptr) cudaEventDestroy(slot.done);
    }
    steps_.AbortStep();  // while its stream exists
    cudaFree(cublas_workspace_);
    cudaFree(scratch_);
    cudaFree(staging_);
    cudaFree(error_);
    cudaFreeHost(error_host_);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (copy_stream_ != nullptr) {
      cudaStreamSynchronize(copy_stream_);
      cudaStreamDestroy(copy_stream_);
    }
    for (cudaEvent_t done : copy_chunk_done_) {
      if (done != nullptr) cudaEventDestroy(done);
    }
    if (copies_done_ != nullptr) cudaEventDestroy(copies_done_);
    cudaFreeHost(copy_staging_);
  }

  absl::Status Init() {
    CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&properties_, device_));
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    for (cudaEvent_t& done : copy_chunk_done_) {
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    }
    CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&copies_done_, cudaEventDisableTiming));
    const cublasStatus_t created = cublasCreate(&cublas_);
    if (created == CUBLAS_STATUS_NOT_INITIALIZED) {
      return absl::FailedPreconditionError(
          absl::StrCat("no CUDA GPU found (cublasCreate: ", cublasGetStatusString(created), ")"));
    }
    CUDA_RETURN_IF_ERROR(created);
    CUDA_RETURN_IF_ERROR(cublasSetStream(cublas_, stream_));
    // Float32 GEMMs stay float32: no TF32 unless the environment forces it.
    CUDA_RETURN_IF_ERROR(cublasSetMathMode(cublas_, CUBLAS_DEFAULT_MATH));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
    CUDA_RETURN_IF_ERROR(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes));
    CUDA_RETURN_IF_ERROR(steps_.Init(stream_));
    CUDA_RETURN_IF_ERROR(cudaMalloc(&error_, sizeof(int32_t)));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(error_, 0, sizeof(int32_t), stream_));
    CUDA_RETURN_IF_ERROR(cudaMallocHost(&error_host_, sizeof(int32_t)));
    for (SegmentSlot& slot : segment_slots_) {
      CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&slot.done, cudaEventDisableTiming));
    }
    return Synchronize();
  }

  std::string name() const override { return absl::StrCat("cuda:", device_); }

  // --- memory ---------------------------------------------------------------

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep("Allocate"));
    CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
    void* data = nullptr;
    // Never hand out null, even for zero bytes.
    const cudaError_t error = cudaMalloc(&data, std::max<size_t>(bytes, 1));
    if (error != cudaSuccess) {
      cudaGetLastError();  // an allocation failure is not sticky: clear it
      size_t free_bytes = 0, total_bytes = 0;
      cudaMemGetInfo(&free_bytes, &total_bytes);
      return absl::ResourceExhaustedError(
          absl::StrCat("CudaBackend::Allocate: cudaMalloc of ", bytes, " bytes failed (",
                       cudaGetErrorString(error), "); ", free_bytes, " of ", total_bytes,
                       " bytes free on ", name()));
    }
    return DeviceBuffer(this, data, bytes);
  }

  void Free(void* data, size_t bytes) override {
    cudaSetDevice(device_);
    cudaFree(data);  // called from destructors: nothing to report to
  }

  DType WeightDType(DType source) const override {
    if (weight_dtype_ == DType::kF32) return DType::kF32;
    return source == DType::kF16 ? DType::kF16 : DType::kBF16;
  }

  // bf16 keys and values by default: half the bytes of float32, both in the
  // pool (twice the tokens fit) and in what attention reads every step. F32
  // with F32 weights, for exact comparisons with the CPU.
  DType KvCacheDType() const override { return weight_dtype_; }

  // bf16 A and Bᵀ, as vLLM keeps adapters in the model's dtype: half the
  // bytes a LoRA segment reads every step and twice the adapters a pool
  // holds. bf16 even beside f16 weights: it has float32's range, so no
  // tenant's adapter overflows. F32 with F32 weights, for exact comparisons.
  DType LoraDType() const override {
    return weight_dtype_ == DType::kF32 ? DType::kF32 : DType::kBF16;
  }

  absl::Status Synchronize() override {
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep("Synchronize"));
    CUDA_RETURN_IF_ERROR(Begin("Synchronize"));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(error_host_, error_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    const int32_t code = *error_host_;
    if (code == cuda::kNoKernelError) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(error_, 0, sizeof(int32_t), stream_));
    return absl::OutOfRangeError(absl::StrCat("CudaBackend (", name(),
                                              "): ", cuda::KernelErrorName(code),
                                              " (checked on the device; the affected outputs "
                                              "hold NaN)"));
  }

 protected:
  absl::Status DoCopyToDevice(void* dst, const void* src, size_t bytes) override {
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep("CopyToDevice"));
    CUDA_RETURN_IF_ERROR(Begin("CopyToDevice"));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    // The caller may free or reuse pageable `src` as soon as we return.
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  absl::Status DoCopyToDeviceAsync(void* dst, const void* src, size_t bytes) override {
    constexpr const char* kOp = "CopyToDeviceAsync";
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep(kOp));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    if (copy_staging_ == nullptr) {
      CUDA_RETURN_IF_ERROR(cudaMallocHost(&copy_staging_, kCopyChunks * kCopyChunkBytes));
    }
    // Pageable memory cannot be copied asynchronously: each chunk goes
    // through pinned staging, then to the device on the copy stream.
    for (size_t done = 0; done < bytes;) {
      const size_t n = std::min(kCopyChunkBytes, bytes - done);
      const int chunk = next_copy_chunk_;
      next_copy_chunk_ = (next_copy_chunk_ + 1) % kCopyChunks;
      CUDA_RETURN_IF_ERROR(cudaEventSynchronize(copy_chunk_done_[chunk]));  // its last copy landed
      char* staging = copy_staging_ + chunk * kCopyChunkBytes;
      std::memcpy(staging, static_cast<const char*>(src) + done, n);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(dst) + done, staging, n,
                                           cudaMemcpyHostToDevice, copy_stream_));
      CUDA_RETURN_IF_ERROR(cudaEventRecord(copy_chunk_done_[chunk], copy_stream_));
      done += n;
    }
    // Whatever is queued on the compute stream from now on waits for them.
    CUDA_RETURN_IF_ERROR(cudaEventRecord(copies_done_, copy_stream_));
    CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream_, copies_done_, 0));
    return absl::OkStatus();
  }

  absl::Status DoCopyToHost(void* dst, const void* src, size_t bytes) override {
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep("CopyToHost"));
    CUDA_RETURN_IF_ERROR(Begin("CopyToHost"));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    // Results are read here: report what the kernels found on the way.
    return Synchronize();
  }

  absl::Status DoCopyOnDevice(void* dst, const void* src, size_t bytes) override {
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep("CopyOnDevice"));
    CUDA_RETURN_IF_ERROR(Begin("CopyOnDevice"));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    return absl::OkStatus();
  }

  absl::Status DoUploadWeight(void* dst, const void* src, DType src_dtype, int64_t rows,
                              int64_t cols) override {
    constexpr const char* kOp = "UploadWeight";
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep(kOp));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    const int64_t count = rows * cols;
    const DType stored = WeightDType(src_dtype);
    const size_t src_size = DTypeSize(src_dtype);
    if (stored == src_dtype) return DoCopyToDevice(dst, src, count * src_size);
    // Raw chunks go to a device staging buffer and are converted there; the
    // stream orders each chunk's copy after the previous chunk's conversion.
    if (staging_ == nullptr) {
      CUDA_RETURN_IF_ERROR(cudaMalloc(&staging_, kUploadChunk * sizeof(float)));
    }
    const size_t stored_size = DTypeSize(stored);
    for (int64_t begin = 0; begin < count; begin += kUploadChunk) {
      const int64_t n = std::min(kUploadChunk, count - begin);
      CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_,
                                           static_cast<const char*>(src) + begin * src_size,
                                           n * src_size, cudaMemcpyHostToDevice, stream_));
      CUDA_RETURN_IF_ERROR(cuda::ConvertElements(
          staging_, src_dtype, static_cast<char*>(dst) + begin * stored_size, stored, n, stream_));
    }
    CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // --- dense ----------------------------------------------------------------

  absl::Status DoLinear(const float* x, const WeightView& w, int64_t m, float* y,
                        bool accumulate) override {
    constexpr const char* kOp = "Linear";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    CUDA_RETURN_IF_ERROR(CheckGemm(kOp, w, "m", m));
    // x is already written: only its copy in w's dtype is left to make.
    return LaunchIntoGemm(kOp, w, m, x, y, accumulate, [&](void* converted) {
      if (converted == nullptr) return cudaSuccess;
      return cuda::ConvertElements(x, DType::kF32, converted, w.dtype, m * w.cols, stream_);
    });
  }

  // The norm writes the GEMM's operand (h in the weight's dtype) as it
  // writes h: one pass over the row instead of RmsNorm's and a conversion's.
  absl::Status DoRmsNormLinear(const float* x, const float* norm_weight, int64_t n, int64_t dim,
                               float eps, float* h, const WeightView& w, float* y) override {
    constexpr const char* kOp = "RmsNormLinear";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    CUDA_RETURN_IF_ERROR(CheckGemm(kOp, w, "n", n));
    return LaunchIntoGemm(
        kOp, w, n, h, y, /*accumulate=*/false,
        [&](void* converted) {
          return cuda::RmsNormRows(x, norm_weight, n, dim, eps, h, converted, w.dtype, stream_);
        },
        x, norm_weight, dim, eps);
  }

  absl::Status DoEmbedding(const int32_t* ids, int64_t n, const WeightView& table,
                           float* y) override {
    constexpr const char* kOp = "Embedding";
    CUDA_RETURN_IF_ERROR(CheckNotQ8(kOp, "table", table));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::EmbeddingGather(ids, n, table.data, table.dtype, table.rows, table.cols, y,
                                       error_, stream_);
        },
        ids, n, table.data, table.dtype, table.rows, table.cols, y);
  }

  absl::Status DoRmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                         float* y) override {
    constexpr const char* kOp = "RmsNorm";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::RmsNormRows(x, weight, n, dim, eps, y, /*converted=*/nullptr, DType::kF32,
                                   stream_);
        },
        x, weight, n, dim, eps, y);
  }

  absl::Status DoAdd(float* x, const float* y, int64_t count) override {
    constexpr const char* kOp = "Add";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp, [&] { return cuda::AddInPlace(x, y, count, stream_); }, x, y, count);
  }

  absl::Status DoAddBias(float* x, const float* bias, int64_t n, int64_t dim) override {
    constexpr const char* kOp = "AddBias";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp, [&] { return cuda::AddBiasRows(x, bias, n, dim, stream_); }, x, bias, n, dim);
  }

  absl::Status DoSiluMul(const float* gate_up, int64_t n, int64_t dim, float* out) override {
    constexpr const char* kOp = "SiluMul";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::SiluMulRows(gate_up, n, dim, out, /*converted=*/nullptr, DType::kF32,
                                   stream_);
        },
        gate_up, n, dim, out);
  }

  // As RmsNormLinear: the gate writes the GEMM's operand as it writes act.
  absl::Status DoSiluMulLinear(const float* gate_up, int64_t n, int64_t dim, float* act,
                               const WeightView& w, float* y, bool accumulate) override {
    constexpr const char* kOp = "SiluMulLinear";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    CUDA_RETURN_IF_ERROR(CheckGemm(kOp, w, "n", n));
    return LaunchIntoGemm(
        kOp, w, n, act, y, accumulate,
        [&](void* converted) {
          return cuda::SiluMulRows(gate_up, n, dim, act, converted, w.dtype, stream_);
        },
        gate_up, dim);
  }

  // --- LoRA -----------------------------------------------------------------

  absl::Status DoLoraShrink(const float* x, int64_t in, const LoraSegment* segments,
                            int32_t num_segments, float* t) override {
    constexpr const char* kOp = "LoraShrink";
    // In a step an empty table is still a call: the next step's may not be.
    if (num_segments == 0 && !steps_.in_step()) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    const SegmentStats stats = StatsOf(segments, num_segments);
    absl::StatusOr<const DeviceLoraTable*> table = StageTable(kOp, segments, num_segments);
    if (!table.ok()) return table.status();
    const int32_t grid_pairs = steps_.in_step() ? steps_.max_segments() : stats.pairs;
    const int32_t grid_ranks =
        steps_.in_step()
            ? kStepShrinkRankGroups
            : (stats.max_rank + cuda::kLoraShrinkRankGroup - 1) / cuda::kLoraShrinkRankGroup;
    const bool vectorized = cuda::LoraShrinkVectorizable(x, in, segments, num_segments);
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::LoraShrinkSegments(x, in, *table, LoraDType(), grid_pairs, grid_ranks,
                                          vectorized, t, stream_);
        },
        x, in, static_cast<const void*>(*table), grid_pairs, grid_ranks, vectorized, t);
  }

  absl::Status DoLoraExpand(const float* t, const LoraSegment* segments, int32_t num_segments,
                            int64_t out, float* y, int64_t ldy) override {
    constexpr const char* kOp = "LoraExpand";
    if (num_segments == 0 && !steps_.in_step()) return absl::OkStatus();
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    const SegmentStats stats = StatsOf(segments, num_segments);
    absl::StatusOr<const DeviceLoraTable*> table = StageTable(kOp, segments, num_segments);
    if (!table.ok()) return table.status();
    const int32_t grid_rows = steps_.in_step() ? steps_.max_segments() : stats.rows;
    const bool vectorized = cuda::LoraExpandVectorizable(segments, num_segments, out, y, ldy);
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::LoraExpandSegments(t, *table, LoraDType(), grid_rows, vectorized, out, y,
                                          ldy, stream_);
        },
        t, static_cast<const void*>(*table), grid_rows, vectorized, out, y, ldy);
  }

  absl::Status DoMergeLora(const WeightView& base, const void* a, const void* bt, int32_t rank,
                           float scale, void* out, const float* row_scale) override {
    constexpr const char* kOp = "MergeLora";
    CUDA_RETURN_IF_ERROR(CheckNotQ8(kOp, "base", base));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::MergeLoraWeights(base.data, base.dtype, base.rows, base.cols, a, bt,
                                        LoraDType(), rank, scale, row_scale, out, stream_);
        },
        base.data, base.dtype, base.rows, base.cols, a, bt, rank, scale, out, row_scale);
  }

  // A launch per segment: DoRA steps run op by op (the model does not record
  // them as step graphs), so the segments need no device table.
  absl::Status DoScaleColumns(float* y, int64_t ldy, int64_t cols,
                              const ColumnScaleSegment* segments,
                              int32_t num_segments) override {
    constexpr const char* kOp = "ScaleColumns";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    for (int32_t i = 0; i < num_segments; ++i) {
      const ColumnScaleSegment& seg = segments[i];
      float* rows = y + int64_t{seg.start} * ldy;
      const int64_t n = seg.end - seg.start;
      absl::Status launched = steps_.Launch(
          kOp, [&] { return cuda::ScaleColumnRows(rows, ldy, n, cols, seg.scale, stream_); },
          rows, ldy, n, cols, seg.scale);
      if (!launched.ok()) return launched;
    }
    return absl::OkStatus();
  }

  // --- step graphs ----------------------------------------------------------

 public:
  bool SupportsStepGraphs() const override { return true; }

  absl::Status BeginStep(uint64_t key, int32_t max_segments) override {
    constexpr const char* kOp = "BeginStep";
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep(kOp));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    if (max_segments < 0) {
      return Invalid(kOp, absl::StrCat("max_segments must not be negative, got ", max_segments));
    }
    return steps_.BeginStep(key, max_segments);
  }

  absl::Status EndStep() override {
    constexpr const char* kOp = "EndStep";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.EndStep();
  }

  void AbortStep() override { steps_.AbortStep(); }

  // --- attention ------------------------------------------------------------

 protected:
  absl::Status DoRope(float* q, int64_t q_ld, float* k, int64_t k_ld, const int32_t* positions,
                      int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                      const RopeParams& rope) override {
    constexpr const char* kOp = "Rope";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::RopeInPlace(q, q_ld, k, k_ld, positions, tokens, num_heads, num_kv_heads,
                                   rope.inv_freq, rope.head_dim, rope.attention_scaling, error_,
                                   stream_);
        },
        q, q_ld, k, k_ld, positions, tokens, num_heads, num_kv_heads, rope.inv_freq, rope.head_dim,
        rope.attention_scaling);
  }

  absl::Status DoWriteKv(const float* k, const float* v, int64_t kv_ld, const AttentionBatch& batch,
                         const KvLayout& layout, void* k_cache, void* v_cache) override {
    constexpr const char* kOp = "WriteKv";
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::WriteKvSlots(k, v, kv_ld, batch.slot_mapping, batch.num_tokens,
                                    static_cast<int64_t>(layout.num_kv_heads) * layout.head_dim,
                                    static_cast<int64_t>(layout.num_blocks) * layout.block_size,
                                    layout.dtype, k_cache, v_cache, error_, stream_);
        },
        k, v, kv_ld, batch.slot_mapping, batch.num_tokens, k_cache, v_cache, layout.num_blocks,
        layout.block_size, layout.num_kv_heads, layout.head_dim, layout.dtype);
  }

  absl::Status DoPagedAttention(const float* q, int64_t q_ld, const AttentionBatch& batch,
                                const KvLayout& layout, int32_t num_heads, const void* k_cache,
                                const void* v_cache, float* out) override {
    constexpr const char* kOp = "PagedAttention";
    if (layout.head_dim > cuda::kMaxAttentionHeadDim) {
      return absl::UnimplementedError(absl::StrCat("CudaBackend::PagedAttention: head_dim ",
                                                   layout.head_dim, " is above the supported ",
                                                   cuda::kMaxAttentionHeadDim));
    }
    if (num_heads > 65535) return Invalid(kOp, absl::StrCat("num_heads ", num_heads, " > 65535"));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    return steps_.Launch(
        kOp,
        [&] {
          return cuda::PagedAttentionForward(
              q, q_ld, batch.num_tokens, batch.num_seqs, batch.query_start, batch.context_lens,
              batch.block_tables, batch.max_blocks_per_seq, batch.positions, num_heads,
              layout.num_kv_heads, layout.head_dim, layout.block_size, layout.num_blocks,
              layout.dtype, k_cache, v_cache, out, error_, stream_);
        },
        q, q_ld, batch.num_tokens, batch.num_seqs, batch.query_start, batch.context_lens,
        batch.block_tables, batch.max_blocks_per_seq, batch.positions, num_heads,
        layout.num_kv_heads, layout.head_dim, layout.block_size, layout.num_blocks, layout.dtype,
        k_cache, v_cache, out);
  }

  // --- sampling -------------------------------------------------------------

  // One launch samples every row; the parameters go up and the results come
  // back in one copy each, through one pinned buffer.
  absl::Status DoSample(const float* logits, int64_t rows, int64_t vocab, const SamplingRow* params,
                        SampledToken* out) override {
    constexpr const char* kOp = "Sample";
    if (rows > INT32_MAX) return Invalid(kOp, absl::StrCat("rows ", rows, " > ", INT32_MAX));
    CUDA_RETURN_IF_ERROR(steps_.RefuseInStep(kOp));
    CUDA_RETURN_IF_ERROR(Begin(kOp));
    int64_t num_top = 0;
    for (int64_t row = 0; row < rows; ++row) {
      num_top += std::min<int64_t>(params[row].num_top_logprobs, vocab);
    }
    // Layout of the staging buffers (host and device alike): parameters,
    // then results and top entries, which come back together.
    const size_t params_bytes = rows * sizeof(cuda::DeviceSamplingRow);
    const size_t results_bytes = rows * sizeof(cuda::DeviceSampledRow);
    const size_t back_bytes = results_bytes + num_top * sizeof(cuda::DeviceTopEntry);
    // Sample synchronises before it returns: nothing still uses the staging.
    const size_t staging_bytes = params_bytes + back_bytes;
    CUDA_RETURN_IF_ERROR(sample_staging_.Reserve(staging_bytes));
    auto* host_params = reinterpret_cast<cuda::DeviceSamplingRow*>(sample_staging_.host());
    int64_t offset = 0;
    for (int64_t row = 0; row < rows; ++row) {
      const SamplingRow& p = params[row];
      const int32_t n = static_cast<int32_t>(std::min<int64_t>(p.num_top_logprobs, vocab));
      host_params[row] = {p.temperature, p.top_k, p.top_p, n, p.uniform, offset};
      offset += n;
    }
    char* device = sample_staging_.device();
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device, sample_staging_.host(), params_bytes,
                                         cudaMemcpyHostToDevice, stream_));
    auto* device_results = reinterpret_cast<cuda::DeviceSampledRow*>(device + params_bytes);
    auto* device_top =
        reinterpret_cast<cuda::DeviceTopEntry*>(device + params_bytes + results_bytes);
    CUDA_RETURN_IF_ERROR(cuda::SampleRows(logits, rows, vocab,
                                          reinterpret_cast<const cuda::DeviceSamplingRow*>(device),
                                          device_results, device_top, stream_));
    char* back = sample_staging_.host() + params_bytes;
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(back, device_results, back_bytes, cudaMemcpyDeviceToHost, stream_));
    CUDA_RETURN_IF_ERROR(Synchronize());

    // Logprobs as the reference computes them, from the row's log_z; top
    // entries were collected unordered and are ranked here.
    const auto* results = reinterpret_cast<const cuda::DeviceSampledRow*>(back);
    const auto* top = reinterpret_cast<const cuda::DeviceTopEntry*>(back + results_bytes);
    for (int64_t row = 0; row < rows; ++row) {
      const cuda::DeviceSampledRow& r = results[row];
      SampledToken& token = out[row];
      token.id = r.id;
      token.logprob = static_cast<float>(r.logit - r.log_z);
      std::vector<cuda::DeviceTopEntry> entries(
          top + host_params[row].top_offset,
          top + host_params[row].top_offset + host_params[row].num_top);
      std::sort(entries.begin(), entries.end(),
                [](const cuda::DeviceTopEntry& a, const cuda::DeviceTopEntry& b) {
                  return SamplingOrderBefore(a.logit, a.id, b.logit, b.id);
                });
      token.top_logprobs.clear();
      token.top_logprobs.reserve(entries.size());
      for (const cuda::DeviceTopEntry& e : entries) {
        token.top_logprobs.push_back({e.id, static_cast<float>(e.logit - r.log_z)});
      }
    }
    return absl::OkStatus();
  }

 private:
  // A segment table's pinned host copy and its device twin. `done` marks the
  // end of the upload from `host`; the device copy is reused safely because
  // the next upload into it is queued after the kernels that read it.
  struct SegmentSlot {
    PinnedMirror table;
    cudaEvent_t done = nullptr;
  };

  // Makes this backend's device current on the calling thread.
  absl::Status Begin(const char* op) {
    const cudaError_t error = cudaSetDevice(device_);
    if (error != cudaSuccess) {
      return cuda::CudaStatus(error, absl::StrCat("CudaBackend::", op, ": cudaSetDevice").c_str());
    }
    return absl::OkStatus();
  }

  // A weight and a row count (named `rows_arg` in `op`) cuBLAS can take.
  absl::Status CheckGemm(const char* op, const WeightView& w, const char* rows_arg,
                         int64_t m) const {
    CUDA_RETURN_IF_ERROR(CheckNotQ8(op, "w", w));
    if (m > INT32_MAX || w.rows > INT32_MAX || w.cols > INT32_MAX) {
      return Invalid(op, absl::StrCat("sizes beyond cuBLAS's int: ", rows_arg, " ", m, ", w ",
                                      w.rows, "x", w.cols));
    }
    return absl::OkStatus();
  }

  // Where m rows of a GEMM's input go in w's dtype (cuBLAS wants both
  // operands in one type); null for float32 weights, which take the input as
  // it is. One buffer serves every such call, so its contents are not kept
  // when it grows. Recorded graphs that use the old buffer are never launched
  // again: the signatures of their Linear, RmsNormLinear and SiluMulLinear
  // calls hold its address.
  absl::StatusOr<void*> GemmOperandBuffer(const char* op, const WeightView& w, int64_t m) {
    if (w.dtype == DType::kF32) return nullptr;
    const size_t bytes = m * w.cols * DTypeSize(w.dtype);
    if (bytes > scratch_bytes_) {
      CUDA_RETURN_IF_ERROR(
          steps_.RefuseInStep(absl::StrCat(op, " (growing its conversion buffer)")));
      const size_t grown = std::max(bytes, scratch_bytes_ + scratch_bytes_ / 2);
      CUDA_RETURN_IF_ERROR(cudaFree(scratch_));  // synchronises: earlier users are done
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      CUDA_RETURN_IF_ERROR(cudaMalloc(&scratch_, grown));
      scratch_bytes_ = grown;
    }
    return scratch_;
  }

  // The launch of every GEMM op: `write_rows(converted)` queues what writes
  // n float32 `rows` (a norm or gate kernel; nothing for Linear, whose input
  // is given) and, where `converted` is not null, their copy in w's dtype;
  // the GEMM y = rows · Wᵀ (+ y) then reads that copy (or the rows). `args`
  // are the op's own arguments that shape the launch.
  template <typename WriteRows, typename... Args>
  absl::Status LaunchIntoGemm(const char* op, const WeightView& w, int64_t n, const float* rows,
                              float* y, bool accumulate, WriteRows write_rows,
                              const Args&... args) {
    absl::StatusOr<void*> converted = GemmOperandBuffer(op, w, n);
    if (!converted.ok()) return converted.status();
    return steps_.Launch(
        op,
        [&]() -> absl::Status {
          CUDA_RETURN_IF_ERROR(write_rows(*converted));
          return Gemm(*converted != nullptr ? *converted : rows, w, n, y, accumulate);
        },
        args..., n, rows, w.data, w.dtype, w.rows, w.cols, y, accumulate,
        static_cast<const void*>(*converted));
  }

  // y[m, w.rows] = operand · Wᵀ (+ y when accumulate), queued on stream_;
  // `operand` holds m rows of w.cols elements of w's dtype.
  absl::Status Gemm(const void* operand, const WeightView& w, int64_t m, float* y,
                    bool accumulate) {
    // Column-major view: y[m, n] row-major is yᶜ [n, m] = Wᶜᵀ · xᶜ with
    // Wᶜ = W as [k, n] and xᶜ = x as [k, m].
    const float alpha = 1.0f;
    const float beta = accumulate ? 1.0f : 0.0f;
    const cudaDataType_t type = CudaDataType(w.dtype);
    CUDA_RETURN_IF_ERROR(cublasGemmEx(
        cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.rows), static_cast<int>(m),
        static_cast<int>(w.cols), &alpha, w.data, type, static_cast<int>(w.cols), operand, type,
        static_cast<int>(w.cols), &beta, y, CUDA_R_32F, static_cast<int>(w.rows),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return absl::OkStatus();
  }

  // A segment table in device memory for one LoRA call. Outside a step it
  // goes through a ring of pinned slots, copied asynchronously on the stream;
  // inside a step it takes the next table of the step graphs' arena.
  absl::StatusOr<const DeviceLoraTable*> StageTable(const char* op, const LoraSegment* segments,
                                                    int32_t num_segments) {
    if (steps_.in_step()) {
      if (num_segments > steps_.max_segments()) {
        return Invalid(
            op, absl::StrCat(num_segments, " segments; the step allows ", steps_.max_segments()));
      }
      return steps_.StageTable(op, segments, num_segments);
    }
    SegmentSlot& slot = segment_slots_[next_slot_];
    next_slot_ = (next_slot_ + 1) % kSegmentSlots;
    CUDA_RETURN_IF_ERROR(cudaEventSynchronize(slot.done));  // its last upload has finished
    const size_t bytes = cuda::LoraTableBytes(num_segments);
    CUDA_RETURN_IF_ERROR(slot.table.Reserve(bytes));
    cuda::FillLoraTable(segments, num_segments,
                        reinterpret_cast<DeviceLoraTable*>(slot.table.host()));
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(slot.table.device(), slot.table.host(), bytes,
                                         cudaMemcpyHostToDevice, stream_));
    CUDA_RETURN_IF_ERROR(cudaEventRecord(slot.done, stream_));
    return reinterpret_cast<const DeviceLoraTable*>(slot.table.device());
  }

  const int device_;
  const DType weight_dtype_;
  cudaDeviceProp properties_{};
  cudaStream_t stream_ = nullptr;
  cudaStream_t copy_stream_ = nullptr;  // CopyToDeviceAsync's copies
  char* copy_staging_ = nullptr;        // pinned: kCopyChunks chunks of kCopyChunkBytes
  std::array<cudaEvent_t, kCopyChunks> copy_chunk_done_{};
  int next_copy_chunk_ = 0;
  cudaEvent_t copies_done_ = nullptr;  // the latest CopyToDeviceAsync has landed
  cublasHandle_t cublas_ = nullptr;
  int32_t* error_ = nullptr;       // device: first KernelError of the kernels since last check
  int32_t* error_host_ = nullptr;  // pinned: where Synchronize reads it
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  void* staging_ = nullptr;  // kUploadChunk floats for UploadWeight
  std::array<SegmentSlot, kSegmentSlots> segment_slots_;
  int next_slot_ = 0;
  void* cublas_workspace_ = nullptr;

  StepGraphs steps_;             // BeginStep to EndStep: capture, replay, the LoRA table arena
  PinnedMirror sample_staging_;  // Sample's parameters up, results back
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const CudaBackendOptions& options) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA GPU found (cudaGetDeviceCount: ",
                     error == cudaSuccess
                         ? "0 devices"
                         : absl::StrCat(cudaGetErrorName(error), ": ", cudaGetErrorString(error)),
                     ")"));
  }
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", options.device, " does not exist: ", count, " present"));
  }
  if (options.weight_dtype != DType::kBF16 && options.weight_dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("CudaBackendOptions.weight_dtype must be BF16 or F32, got ",
                     DTypeName(options.weight_dtype)));
  }
  auto backend = std::make_unique<CudaBackend>(options.device, options.weight_dtype);
  if (absl::Status status = backend->Init(); !status.ok()) return status;
  return backend;
}

}  // namespace loraserve::kernels
