// The CPU backend: our own batch-invariant GEMM (kernels/cpu/gemm.h, AVX-512
// or AVX2 picked at run time) and AVX2/FMA loops for everything else,
// threaded over a small persistent pool. OpenBLAS only merges LoRA weights, a
// one-off outside the step.
//
// Weights are stored in the one dtype the options name (CpuBackendOptions::
// weight_dtype), converted once at load; the GEMM widens them to float32 as
// it reads them. Activations, norms, attention, the KV cache and sampling
// are float32 whatever the weights are.

#include <cblas.h>
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/quantization.h"
#include "kernels/sampling.h"

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels/cpu needs AVX2, FMA and F16C: compile with -march=x86-64-v3 or newer"
#endif

namespace loraserve::kernels {
namespace {

constexpr size_t kAlignment = 64;
constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kHugePageMinBytes = 2 * kHugePage;
constexpr int kLanes = 8;

// Loops over fewer elements than this run on one thread: waking the pool
// costs more than it saves.
constexpr int64_t kParallelMinElements = 1 << 15;

// ---- validation -----------------------------------------------------------
// The arguments were checked by Backend (kernels/backend.cc); what is left
// here is this backend's own limit (an F32 KV cache) and the indices it reads
// from device memory, which is host memory here.

absl::Status CheckF32Cache(const char* op, const KvLayout& layout) {
  if (layout.dtype == DType::kF32) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("CpuBackend::", op, ": layout.dtype is ",
                                                 DTypeName(layout.dtype),
                                                 "; this backend's KV cache is F32"));
}

// ---- AVX2 helpers ---------------------------------------------------------

// Lanes [0, count) set, for loads and stores of a partial vector.
inline __m256i TailMask(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + kLanes), _mm256_loadu_ps(b + i + kLanes), acc1);
  }
  for (; i < n; i += kLanes) {
    const __m256i mask = TailMask(n - i);
    acc0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, mask), _mm256_maskload_ps(b + i, mask), acc0);
  }
  return HorizontalSum(_mm256_add_ps(acc0, acc1));
}

// y += alpha * x
inline void Axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  if (i < n) {
    const __m256i mask = TailMask(n - i);
    _mm256_maskstore_ps(
        y + i, mask,
        _mm256_fmadd_ps(a, _mm256_maskload_ps(x + i, mask), _mm256_maskload_ps(y + i, mask)));
  }
}

// acc[:n] += Σ_r weights[r] * rows[r * row_stride :][:n] for r < count,
// holding 32 floats of acc in registers across all rows.
inline void WeightedRowSum(const float* weights, const float* rows, int64_t row_stride,
                           int64_t count, float* acc, int64_t n) {
  constexpr int64_t kBlock = 4 * kLanes;
  int64_t c = 0;
  for (; c + kBlock <= n; c += kBlock) {
    __m256 a0 = _mm256_loadu_ps(acc + c), a1 = _mm256_loadu_ps(acc + c + kLanes),
           a2 = _mm256_loadu_ps(acc + c + 2 * kLanes), a3 = _mm256_loadu_ps(acc + c + 3 * kLanes);
    const float* row = rows + c;
    for (int64_t r = 0; r < count; ++r, row += row_stride) {
      const __m256 w = _mm256_broadcast_ss(weights + r);
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + kLanes), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 2 * kLanes), a2);
      a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 3 * kLanes), a3);
    }
    _mm256_storeu_ps(acc + c, a0);
    _mm256_storeu_ps(acc + c + kLanes, a1);
    _mm256_storeu_ps(acc + c + 2 * kLanes, a2);
    _mm256_storeu_ps(acc + c + 3 * kLanes, a3);
  }
  for (; c < n; c += kLanes) {
    const __m256i mask = TailMask(n - c);
    __m256 a = _mm256_maskload_ps(acc + c, mask);
    const float* row = rows + c;
    for (int64_t r = 0; r < count; ++r, row += row_stride) {
      a = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + r), _mm256_maskload_ps(row, mask), a);
    }
    _mm256_maskstore_ps(acc + c, mask, a);
  }
}

// x *= alpha
inline void Scale(float alpha, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

// exp(x) to about 1 ulp (Cephes' expf: x = n ln2 + r, polynomial in r). Inputs
// are clamped to where the result is a normal float, so very negative inputs
// give ~1e-38 instead of 0: harmless for softmax and SiLU, which add 1 or a
// maximum of 1 to it.
inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365448f)),
                    _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so that n * ln2_hi is exact.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// s[i] = exp(s[i] - max) over [0, n); returns the sum.
inline float ExpShiftedSum(float* s, int64_t n, float max) {
  const __m256 m = _mm256_set1_ps(max);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {
    const __m256i mask = TailMask(n - i);
    const __m256 e = _mm256_and_ps(Exp(_mm256_sub_ps(_mm256_maskload_ps(s + i, mask), m)),
                                   _mm256_castsi256_ps(mask));
    _mm256_maskstore_ps(s + i, mask, e);
    sum = _mm256_add_ps(sum, e);
  }
  return HorizontalSum(sum);
}

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up, for 8 lanes.
inline __m256 SiluMul8(__m256 gate, __m256 up) {
  const __m256 denom =
      _mm256_add_ps(_mm256_set1_ps(1.0f), Exp(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
  return _mm256_mul_ps(_mm256_div_ps(gate, denom), up);
}

// ---- dtype conversion -----------------------------------------------------

// F16C's vcvtph2ps is exact for every half, subnormals, infinities and NaNs
// included; the tail goes through a padded vector so it takes the same path.
void F16ToF32(const uint16_t* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  if (i < count) {
    uint16_t padded[kLanes] = {};
    std::memcpy(padded, src + i, (count - i) * sizeof(uint16_t));
    _mm256_maskstore_ps(dst + i, TailMask(count - i),
                        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(padded))));
  }
}

// bfloat16 is the top half of a float32.
inline float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

void Bf16ToF32(const uint16_t* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(src[i]);
}

// One row of `cols` weights stored as `dtype` (at `row`), widened to float32.
void WidenRow(const void* row, DType dtype, int64_t cols, float* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, row, static_cast<size_t>(cols) * sizeof(float));
      return;
    case DType::kF16:
      return F16ToF32(static_cast<const uint16_t*>(row), dst, cols);
    case DType::kBF16:
      return Bf16ToF32(static_cast<const uint16_t*>(row), dst, cols);
    case DType::kQ8:
      return DequantizeQ8Row(row, cols, dst);
  }
}

// `rows` rows of `cols` floats stored as `dtype` at `dst` (WeightRowBytes
// apart): exact for F32, rounded to nearest even for BF16 and F16, quantized
// for kQ8 (which refuses a non-finite weight).
absl::Status NarrowRows(const float* src, int64_t rows, int64_t cols, DType dtype, void* dst) {
  const int64_t count = rows * cols;
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      return absl::OkStatus();
    case DType::kBF16:
      ConvertFloat32ToBf16(src, count, static_cast<uint16_t*>(dst));
      return absl::OkStatus();
    case DType::kF16:
      ConvertFloat32ToF16(src, count, static_cast<uint16_t*>(dst));
      return absl::OkStatus();
    case DType::kQ8:
      return QuantizeQ8Rows(src, rows, cols, dst);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("CpuBackend: cannot store weights as dtype ", static_cast<int>(dtype)));
}

// ---- attention ------------------------------------------------------------

// Cache positions per attention work item: a decode over a long context is
// split in chunks of this many positions so that all threads share it.
constexpr int32_t kAttentionChunk = 256;

// One token's attention over the cache positions [begin, end) of its
// sequence; `partial` indexes its slot for merging, or is -1 when the chunk is
// the token's whole context.
struct AttentionItem {
  int32_t token;
  int32_t seq;
  int32_t begin;
  int32_t end;
  int32_t partial;
};

// ---- the backend ----------------------------------------------------------

class CpuBackend final : public Backend {
 public:
  CpuBackend(int num_threads, DType weight_dtype)
      : pool_(num_threads), gemm_isa_(BestGemmIsa()), weight_dtype_(weight_dtype) {}

  std::string name() const override { return "cpu"; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    // Large buffers (weights, KV cache) are streamed through: back them with
    // huge pages where the kernel allows, sparing TLB misses (costly in VMs).
    const size_t alignment = bytes >= kHugePageMinBytes ? kHugePage : kAlignment;
    // aligned_alloc wants a multiple of the alignment; never hand out null.
    const size_t rounded = std::max(alignment, (bytes + alignment - 1) / alignment * alignment);
    void* data = std::aligned_alloc(alignment, rounded);
    if (data == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("CpuBackend::Allocate: out of host memory allocating ", bytes, " bytes"));
    }
    // Only a hint: failure (e.g. THP disabled) leaves ordinary pages.
    if (alignment == kHugePage) madvise(data, rounded, MADV_HUGEPAGE);
    return DeviceBuffer(this, data, bytes);
  }

  absl::Status Synchronize() override { return absl::OkStatus(); }

  void Free(void* data, size_t bytes) override { std::free(data); }

  DType WeightDType(DType source) const override { return weight_dtype_; }

  // Adapters in bf16 beside narrowed weights (half the bytes a LoRA segment
  // reads every step; bf16 has float32's range, so no adapter overflows),
  // float32 beside float32 weights (exact comparisons with references).
  DType LoraDType() const override {
    return weight_dtype_ == DType::kF32 ? DType::kF32 : DType::kBF16;
  }

 protected:
  // Device memory is host memory: every copy is a memcpy.
  absl::Status DoCopyToDevice(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::Status DoCopyToHost(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::Status DoCopyOnDevice(void* dst, const void* src, size_t bytes) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }

  absl::Status DoUploadWeight(void* dst, const void* src, DType src_dtype, int64_t rows,
                              int64_t cols) override {
    const int64_t src_row_bytes = cols * static_cast<int64_t>(DTypeSize(src_dtype));
    if (src_dtype == weight_dtype_) {
      std::memcpy(dst, src, static_cast<size_t>(rows * src_row_bytes));
      return absl::OkStatus();
    }
    // Rows in chunks over the pool, each widened to float32 and stored.
    const int64_t dst_row_bytes = WeightRowBytes(weight_dtype_, cols);
    const int64_t rows_per_chunk = std::max<int64_t>(1, kParallelMinElements / cols);
    const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    std::vector<absl::Status> statuses(chunks);
    pool_.ParallelFor(chunks, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> wide;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t r0 = chunk * rows_per_chunk;
        const int64_t n = std::min(rows_per_chunk, rows - r0);
        wide.resize(static_cast<size_t>(n * cols));
        for (int64_t r = 0; r < n; ++r) {
          WidenRow(static_cast<const char*>(src) + (r0 + r) * src_row_bytes, src_dtype, cols,
                   wide.data() + r * cols);
        }
        statuses[chunk] = NarrowRows(wide.data(), n, cols, weight_dtype_,
                                     static_cast<char*>(dst) + r0 * dst_row_bytes);
      }
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (!statuses[chunk].ok()) {
        return absl::InvalidArgumentError(absl::StrCat("CpuBackend::UploadWeight: rows from ",
                                                       chunk * rows_per_chunk, ": ",
                                                       statuses[chunk].message()));
      }
    }
    return absl::OkStatus();
  }

  absl::Status DoLinear(const float* x, const WeightView& w, int64_t m, float* y,
                        bool accumulate) override {
    MatMulTransposed(x, w.data, w.dtype, m, w.rows, w.cols, 1.0f, accumulate, y, w.rows);
    return absl::OkStatus();
  }

  absl::Status DoLoraShrink(const float* x, int64_t in, const LoraSegment* segments,
                            int32_t num_segments, float* t) override {
    ForEachSegment(segments, num_segments,
                   [&](const LoraSegment& seg, int64_t offset, bool serial) {
                     Product(serial, x + seg.start * in, seg.a, LoraDType(), seg.end - seg.start,
                             seg.rank, in, 1.0f, false, t + offset, seg.rank);
                   });
    return absl::OkStatus();
  }

  absl::Status DoLoraExpand(const float* t, const LoraSegment* segments, int32_t num_segments,
                            int64_t out, float* y, int64_t ldy) override {
    if (num_segments == 0) return absl::OkStatus();  // no graphs to record on the CPU
    // One work item per token row: y_row += scale · Σ_r t[r] · bt[r, :], the
    // sum over r taken in order for every output (batch-invariant) as
    // vectorised axpys over contiguous rows of bt, no horizontal sums.
    struct Row {
      const LoraSegment* segment;
      int64_t token;
      int64_t t_offset;  // of this row's rank floats in the packed t
    };
    std::vector<Row> rows;
    int64_t offset = 0;
    for (int32_t i = 0; i < num_segments; ++i) {
      for (int64_t token = segments[i].start; token < segments[i].end; ++token) {
        rows.push_back({&segments[i], token, offset});
        offset += segments[i].rank;
      }
    }
    // A token that several segments cover (a sequence's adapter and the
    // correction for merged weights) is one work item whose terms are added
    // in segment order: no two threads update one row.
    std::stable_sort(rows.begin(), rows.end(),
                     [](const Row& a, const Row& b) { return a.token < b.token; });
    std::vector<size_t> token_starts;  // index of each token's first Row, then rows.size()
    for (size_t i = 0; i < rows.size(); ++i) {
      if (i == 0 || rows[i].token != rows[i - 1].token) token_starts.push_back(i);
    }
    token_starts.push_back(rows.size());
    const int64_t row_work = std::max<int64_t>(1, out * segments[0].rank);
    const bool lora_bf16 = LoraDType() == DType::kBF16;
    pool_.ParallelFor(static_cast<int64_t>(token_starts.size() - 1),
                      std::max<int64_t>(1, kParallelMinElements / row_work),
                      [&](int64_t begin, int64_t end) {
                        for (size_t i = token_starts[begin]; i < token_starts[end]; ++i) {
                          ExpandRow(t + rows[i].t_offset, *rows[i].segment, out,
                                    y + rows[i].token * ldy, lora_bf16);
                        }
                      });
    return absl::OkStatus();
  }

  absl::Status DoMergeLora(const WeightView& base, const void* a, const void* bt, int32_t rank,
                           float scale, void* out, const float* row_scale) override {
    // A and Bᵀ in float32, whatever LoraDType holds them in.
    std::vector<float> a_wide(static_cast<size_t>(rank * base.cols));
    std::vector<float> bt_wide(static_cast<size_t>(rank * base.rows));
    WidenRow(a, LoraDType(), rank * base.cols, a_wide.data());
    WidenRow(bt, LoraDType(), rank * base.rows, bt_wide.data());
    // In blocks of rows: the base rows widened to float32 (in `out` itself
    // for F32), += scale · bt[:, rows]ᵀ · a, then stored in base's dtype
    // (rounded, or quantized again with the merged rows' own scales).
    const int64_t row_bytes = WeightRowBytes(base.dtype, base.cols);
    const int64_t block_rows = std::max<int64_t>(1, (int64_t{1} << 20) / base.cols);
    std::vector<float> block;
    for (int64_t r0 = 0; r0 < base.rows; r0 += block_rows) {
      const int64_t n = std::min(block_rows, base.rows - r0);
      float* rows = static_cast<float*>(out) + r0 * base.cols;
      if (base.dtype != DType::kF32) {
        block.resize(static_cast<size_t>(n * base.cols));
        rows = block.data();
      }
      for (int64_t r = 0; r < n; ++r) {
        WidenRow(static_cast<const char*>(base.data) + (r0 + r) * row_bytes, base.dtype, base.cols,
                 rows + r * base.cols);
      }
      // rows[n, cols] += scale · bt[rank, r0:r0+n]ᵀ · a[rank, cols]
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(n),
                  static_cast<blasint>(base.cols), rank, scale, bt_wide.data() + r0,
                  static_cast<blasint>(base.rows), a_wide.data(), static_cast<blasint>(base.cols),
                  1.0f, rows, static_cast<blasint>(base.cols));
      if (row_scale != nullptr) {
        for (int64_t r = 0; r < n; ++r) {
          for (int64_t c = 0; c < base.cols; ++c) rows[r * base.cols + c] *= row_scale[r0 + r];
        }
      }
      if (base.dtype == DType::kF32) continue;
      if (absl::Status s =
              NarrowRows(rows, n, base.cols, base.dtype, static_cast<char*>(out) + r0 * row_bytes);
          !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("CpuBackend::MergeLora: ", s.message()));
      }
    }
    return absl::OkStatus();
  }

  absl::Status DoScaleColumns(float* y, int64_t ldy, int64_t cols,
                              const ColumnScaleSegment* segments,
                              int32_t num_segments) override {
    for (int32_t i = 0; i < num_segments; ++i) {
      const ColumnScaleSegment& seg = segments[i];
      for (int64_t row = seg.start; row < seg.end; ++row) {
        float* yr = y + row * ldy;
        for (int64_t c = 0; c < cols; ++c) yr[c] *= seg.scale[c];
      }
    }
    return absl::OkStatus();
  }

  absl::Status DoEmbedding(const int32_t* ids, int64_t n, const WeightView& table,
                           float* y) override {
    for (int64_t i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] >= table.rows) {
        return absl::OutOfRangeError(
            absl::StrCat("CpuBackend::Embedding: token id ", ids[i], " at index ", i,
                         " is outside the vocabulary [0, ", table.rows, ")"));
      }
    }
    const int64_t row_bytes = WeightRowBytes(table.dtype, table.cols);
    for (int64_t i = 0; i < n; ++i) {
      WidenRow(static_cast<const char*>(table.data) + ids[i] * row_bytes, table.dtype, table.cols,
               y + i * table.cols);
    }
    return absl::OkStatus();
  }

  absl::Status DoRmsNorm(const float* x, const float* weight, int64_t n, int64_t dim, float eps,
                         float* y) override {
    ParallelRows(n, dim, [&](int64_t row) {
      const float* xr = x + row * dim;
      float* yr = y + row * dim;
      // As Hugging Face's LlamaRMSNorm in float32: weight * (x * rsqrt(mean(x²) + eps)).
      const float inv_rms = 1.0f / std::sqrt(Dot(xr, xr, dim) / static_cast<float>(dim) + eps);
      for (int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * inv_rms);
    });
    return absl::OkStatus();
  }

  absl::Status DoAdd(float* x, const float* y, int64_t count) override {
    pool_.ParallelFor(count, kParallelMinElements, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) x[i] += y[i];
    });
    return absl::OkStatus();
  }

  absl::Status DoAddBias(float* x, const float* bias, int64_t n, int64_t dim) override {
    ParallelRows(n, dim, [&](int64_t row) {
      float* xr = x + row * dim;
      for (int64_t i = 0; i < dim; ++i) xr[i] += bias[i];
    });
    return absl::OkStatus();
  }

  absl::Status DoSiluMul(const float* gate_up, int64_t n, int64_t dim, float* out) override {
    ParallelRows(n, 2 * dim, [&](int64_t row) {
      const float* gate = gate_up + row * 2 * dim;
      const float* up = gate + dim;
      float* o = out + row * dim;
      int64_t i = 0;
      for (; i + kLanes <= dim; i += kLanes) {
        _mm256_storeu_ps(o + i, SiluMul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
      }
      if (i < dim) {
        const __m256i mask = TailMask(dim - i);
        _mm256_maskstore_ps(
            o + i, mask,
            SiluMul8(_mm256_maskload_ps(gate + i, mask), _mm256_maskload_ps(up + i, mask)));
      }
    });
    return absl::OkStatus();
  }

  absl::Status DoRope(float* q, int64_t q_ld, float* k, int64_t k_ld, const int32_t* positions,
                      int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                      const RopeParams& rope) override {
    for (int64_t t = 0; t < tokens; ++t) {
      if (positions[t] < 0) {
        return absl::OutOfRangeError(absl::StrCat("CpuBackend::Rope: positions[", t, "] is ",
                                                  positions[t], ", expected >= 0"));
      }
    }
    const int64_t head_dim = rope.head_dim;
    const int64_t half = head_dim / 2;
    const int64_t row_floats = (num_heads + num_kv_heads) * head_dim;
    pool_.ParallelFor(tokens, std::max<int64_t>(1, kParallelMinElements / row_floats),
                      [&](int64_t begin, int64_t end) {
                        thread_local std::vector<float> cos_sin;
                        cos_sin.resize(2 * half);
                        float* cos = cos_sin.data();
                        float* sin = cos + half;
                        for (int64_t t = begin; t < end; ++t) {
                          // As Hugging Face: the angle is rounded to float32 before cos and sin.
                          const float position = static_cast<float>(positions[t]);
                          for (int64_t i = 0; i < half; ++i) {
                            const float angle = rope.inv_freq[i] * position;
                            cos[i] = std::cos(angle) * rope.attention_scaling;
                            sin[i] = std::sin(angle) * rope.attention_scaling;
                          }
                          RotateHeads(q + t * q_ld, num_heads, half, cos, sin);
                          RotateHeads(k + t * k_ld, num_kv_heads, half, cos, sin);
                        }
                      });
    return absl::OkStatus();
  }

  absl::Status DoWriteKv(const float* k, const float* v, int64_t kv_ld, const AttentionBatch& batch,
                         const KvLayout& layout, void* k_cache_data, void* v_cache_data) override {
    if (absl::Status s = CheckF32Cache("WriteKv", layout); !s.ok()) return s;
    float* k_cache = static_cast<float*>(k_cache_data);
    float* v_cache = static_cast<float*>(v_cache_data);
    const int64_t token_floats = static_cast<int64_t>(layout.num_kv_heads) * layout.head_dim;
    const int64_t num_slots = static_cast<int64_t>(layout.num_blocks) * layout.block_size;
    for (int32_t t = 0; t < batch.num_tokens; ++t) {
      const int32_t slot = batch.slot_mapping[t];
      if (slot == kPaddingSlot) continue;
      if (slot < 0 || slot >= num_slots) {
        return absl::OutOfRangeError(absl::StrCat("CpuBackend::WriteKv: slot_mapping[", t, "] is ",
                                                  slot, ", outside the cache's ", num_slots,
                                                  " slots"));
      }
    }
    for (int32_t t = 0; t < batch.num_tokens; ++t) {
      const int64_t slot = batch.slot_mapping[t];
      if (slot == kPaddingSlot) continue;
      std::memcpy(k_cache + slot * token_floats, k + t * kv_ld, token_floats * sizeof(float));
      std::memcpy(v_cache + slot * token_floats, v + t * kv_ld, token_floats * sizeof(float));
    }
    return absl::OkStatus();
  }

  absl::Status DoPagedAttention(const float* q, int64_t q_ld, const AttentionBatch& batch,
                                const KvLayout& layout, int32_t num_heads, const void* k_cache_data,
                                const void* v_cache_data, float* out) override {
    if (absl::Status s = CheckF32Cache("PagedAttention", layout); !s.ok()) return s;
    const float* k_cache = static_cast<const float*>(k_cache_data);
    const float* v_cache = static_cast<const float*>(v_cache_data);
    absl::StatusOr<std::vector<int32_t>> token_seq = SequenceOfEachToken(batch, layout);
    if (!token_seq.ok()) return token_seq.status();

    // Work items are (token, chunk of its context). Each reads whole cache
    // slots (all kv heads) in order, which the prefetcher and TLB handle far
    // better than one head's slice of every slot; chunking gives a long
    // decode several items to run in parallel. A token of several chunks
    // gets partial results (unnormalised output, max and sum per head) that
    // are merged afterwards, as in flash-decoding.
    const int64_t head_dim = layout.head_dim;
    const int64_t partial_floats = num_heads * (head_dim + 2);
    std::vector<AttentionItem> items;
    int32_t num_partials = 0;
    for (int32_t t = 0; t < batch.num_tokens; ++t) {
      const int32_t context = batch.positions[t] + 1;
      const bool split = context > kAttentionChunk;
      for (int32_t begin = 0; begin < context; begin += kAttentionChunk) {
        items.push_back({t, (*token_seq)[t], begin, std::min(context, begin + kAttentionChunk),
                         split ? num_partials++ : -1});
      }
    }
    partials_.resize(static_cast<size_t>(num_partials) * partial_floats);
    pool_.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const AttentionItem& item = items[i];
        const float* q_token = q + static_cast<int64_t>(item.token) * q_ld;
        if (item.partial < 0) {
          float* acc = out + static_cast<int64_t>(item.token) * num_heads * head_dim;
          float* stats = Scratch<kStatsScratch>(2 * num_heads);  // [max | sum] per head
          AttendChunk(q_token, batch, layout, num_heads, item, k_cache, v_cache, acc, stats,
                      stats + num_heads);
          for (int32_t h = 0; h < num_heads; ++h) {
            Scale(1.0f / stats[num_heads + h], acc + h * head_dim, head_dim);
          }
        } else {
          float* acc = partials_.data() + item.partial * partial_floats;
          float* maxes = acc + num_heads * head_dim;
          AttendChunk(q_token, batch, layout, num_heads, item, k_cache, v_cache, acc, maxes,
                      maxes + num_heads);
        }
      }
    });
    if (num_partials == 0) return absl::OkStatus();
    // Tokens of one context chunk are final already; merge the others.
    std::vector<std::pair<int32_t, int32_t>> splits;  // (token, first partial)
    for (const AttentionItem& item : items) {
      if (item.partial >= 0 && item.begin == 0) splits.emplace_back(item.token, item.partial);
    }
    pool_.ParallelFor(static_cast<int64_t>(splits.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto [token, first] = splits[i];
        const int32_t chunks = (batch.positions[token] + kAttentionChunk) / kAttentionChunk;
        MergePartials(partials_.data() + first * partial_floats, chunks, num_heads, head_dim,
                      out + static_cast<int64_t>(token) * num_heads * head_dim);
      }
    });
    return absl::OkStatus();
  }

  // --- sampling -------------------------------------------------------------

  absl::Status DoSample(const float* logits, int64_t rows, int64_t vocab, const SamplingRow* params,
                        SampledToken* out) override {
    // Device memory is host memory here: the reference runs in place, one
    // row per work item (rows are independent, so threads change nothing).
    pool_.ParallelFor(rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        out[row] = SampleRow(logits + row * vocab, vocab, params[row]);
      }
    });
    return absl::OkStatus();
  }

 private:
  // y[m, 0:n] = alpha · x[m, k] · w[n, k]ᵀ (+ y), rows of y ldy floats apart;
  // batch-invariant (see kernels/cpu/gemm.h).
  void MatMulTransposed(const float* x, const void* w, DType w_dtype, int64_t m, int64_t n,
                        int64_t k, float alpha, bool accumulate, float* y, int64_t ldy) {
    kernels::MatMulTransposed(gemm_isa_, pool_, x, w, w_dtype, m, n, k, alpha, accumulate, y, ldy);
  }

  // y[0:out] += scale · Σ_r t[r] · bt[r, 0:out] (bt of LoraDType: float32,
  // or bf16 when `bf16`), in chunks that stay in registers; the sum over r
  // runs in order for every output.
  static void ExpandRow(const float* t, const LoraSegment& seg, int64_t out, float* y, bool bf16) {
    if (bf16) return ExpandRowOf(t, seg, static_cast<const uint16_t*>(seg.bt), out, y);
    ExpandRowOf(t, seg, static_cast<const float*>(seg.bt), out, y);
  }
  static float Widen(float v) { return v; }
  static float Widen(uint16_t bf16) { return Bf16ToFloat(bf16); }
  template <typename T>
  static void ExpandRowOf(const float* t, const LoraSegment& seg, const T* bt, int64_t out,
                          float* y) {
    constexpr int64_t kChunk = 64;
    for (int64_t j0 = 0; j0 < out; j0 += kChunk) {
      const int64_t len = std::min(kChunk, out - j0);
      float acc[kChunk] = {};
      for (int32_t r = 0; r < seg.rank; ++r) {
        const float tr = t[r];
        const T* row = bt + r * out + j0;
        for (int64_t j = 0; j < len; ++j) acc[j] = std::fma(tr, Widen(row[j]), acc[j]);
      }
      for (int64_t j = 0; j < len; ++j) y[j0 + j] = std::fma(seg.scale, acc[j], y[j0 + j]);
    }
  }

  // A product on this thread alone (`serial`) or threaded over the pool.
  void Product(bool serial, const float* x, const void* w, DType w_dtype, int64_t m, int64_t n,
               int64_t k, float alpha, bool accumulate, float* y, int64_t ldy) {
    if (serial) {
      kernels::MatMulTransposedSerial(gemm_isa_, x, w, w_dtype, m, n, k, alpha, accumulate, y, ldy);
    } else {
      MatMulTransposed(x, w, w_dtype, m, n, k, alpha, accumulate, y, ldy);
    }
  }

  // Calls fn(segment, offset of its packed intermediate, serial) for every
  // segment. Many segments (decode: one or a few tokens each) are spread over
  // the pool, each computed by one thread; few are each threaded inside.
  // The sums are the same either way.
  template <typename Fn>
  void ForEachSegment(const LoraSegment* segments, int32_t num_segments, Fn fn) {
    std::vector<int64_t> offsets(num_segments + 1, 0);
    for (int32_t i = 0; i < num_segments; ++i) {
      offsets[i + 1] =
          offsets[i] + static_cast<int64_t>(segments[i].end - segments[i].start) * segments[i].rank;
    }
    if (num_segments >= pool_.num_threads()) {
      pool_.ParallelFor(num_segments, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) fn(segments[i], offsets[i], /*serial=*/true);
      });
      return;
    }
    for (int32_t i = 0; i < num_segments; ++i) fn(segments[i], offsets[i], /*serial=*/false);
  }

  // Runs fn(row) for rows [0, n) of `row_floats` floats each, threaded when
  // the rows are many enough to pay for waking the pool.
  template <typename Fn>
  void ParallelRows(int64_t n, int64_t row_floats, Fn fn) {
    pool_.ParallelFor(n, std::max<int64_t>(1, kParallelMinElements / row_floats),
                      [&](int64_t begin, int64_t end) {
                        for (int64_t row = begin; row < end; ++row) fn(row);
                      });
  }

  // Rotate-half on `heads` heads of 2 * half floats each:
  // out[i] = x[i] cos - x[i + half] sin, out[i + half] = x[i + half] cos + x[i] sin.
  static void RotateHeads(float* x, int64_t heads, int64_t half, const float* cos,
                          const float* sin) {
    for (int64_t h = 0; h < heads; ++h) {
      float* x1 = x + h * 2 * half;
      float* x2 = x1 + half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = x1[i];
        const float b = x2[i];
        x1[i] = a * cos[i] - b * sin[i];
        x2[i] = b * cos[i] + a * sin[i];
      }
    }
  }

  // Checks the indices PagedAttention reads from the batch (query starts,
  // context lengths, block tables, positions), and returns the sequence of
  // each token.
  static absl::StatusOr<std::vector<int32_t>> SequenceOfEachToken(const AttentionBatch& batch,
                                                                  const KvLayout& layout) {
    if (batch.query_start[0] != 0 || batch.query_start[batch.num_seqs] != batch.num_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CpuBackend::PagedAttention: batch.query_start must run from 0 to num_tokens (",
          batch.num_tokens, "), got ", batch.query_start[0], " .. ",
          batch.query_start[batch.num_seqs]));
    }
    const int64_t max_context = static_cast<int64_t>(batch.max_blocks_per_seq) * layout.block_size;
    std::vector<int32_t> token_seq(batch.num_tokens);
    for (int32_t s = 0; s < batch.num_seqs; ++s) {
      const int32_t first = batch.query_start[s];
      const int32_t last = batch.query_start[s + 1];
      if (last < first) {
        return absl::InvalidArgumentError(
            absl::StrCat("CpuBackend::PagedAttention: batch.query_start decreases at sequence ", s,
                         " (", first, " -> ", last, ")"));
      }
      const int32_t context = batch.context_lens[s];
      if (context < last - first || context > max_context) {
        return absl::OutOfRangeError(
            absl::StrCat("CpuBackend::PagedAttention: batch.context_lens[", s, "] is ", context,
                         ", expected at least its ", last - first, " query tokens and at most ",
                         max_context, " (max_blocks_per_seq * block_size)"));
      }
      const int32_t* table =
          batch.block_tables + static_cast<int64_t>(s) * batch.max_blocks_per_seq;
      for (int32_t b = 0; b * layout.block_size < context; ++b) {
        if (table[b] < 0 || table[b] >= layout.num_blocks) {
          return absl::OutOfRangeError(
              absl::StrCat("CpuBackend::PagedAttention: block_tables[", s, "][", b, "] is ",
                           table[b], ", outside the cache's ", layout.num_blocks, " blocks"));
        }
      }
      for (int32_t t = first; t < last; ++t) {
        if (batch.positions[t] < 0 || batch.positions[t] >= context) {
          return absl::OutOfRangeError(
              absl::StrCat("CpuBackend::PagedAttention: positions[", t, "] is ", batch.positions[t],
                           ", beyond the context of sequence ", s, " (", context, " tokens)"));
        }
        token_seq[t] = s;
      }
    }
    return token_seq;
  }

  // For every head h of one token and the cache positions [item.begin,
  // item.end) of its sequence: with s_j = q_h · k_j / sqrt(head_dim),
  // max[h] = max_j s_j, sum[h] = Σ_j exp(s_j - max[h]) and
  // acc[h, :] = Σ_j exp(s_j - max[h]) v_j.
  static void AttendChunk(const float* q,  // [num_heads, head_dim] of the token
                          const AttentionBatch& batch, const KvLayout& layout, int32_t num_heads,
                          const AttentionItem& item, const float* k_cache, const float* v_cache,
                          float* acc,    // [num_heads, head_dim]
                          float* max,    // [num_heads]
                          float* sum) {  // [num_heads]
    const int64_t head_dim = layout.head_dim;
    const int64_t group = num_heads / layout.num_kv_heads;
    const int64_t slot_floats = static_cast<int64_t>(layout.num_kv_heads) * head_dim;
    const int64_t len = item.end - item.begin;
    const int32_t* table =
        batch.block_tables + static_cast<int64_t>(item.seq) * batch.max_blocks_per_seq;
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

    // Calls fn(j, slots, run) for runs of `run` consecutive positions
    // j .. j + run - 1 of the chunk that share a block; `slots` points at the
    // kv_heads * head_dim floats of position j in `cache`, the next positions
    // following at slot_floats strides.
    const auto for_each_run = [&](const float* cache, auto fn) {
      for (int64_t j = 0; j < len;) {
        const int64_t position = item.begin + j;
        const int64_t offset = position % layout.block_size;
        const float* slots =
            cache + (static_cast<int64_t>(table[position / layout.block_size]) * layout.block_size +
                     offset) *
                        slot_floats;
        const int64_t run = std::min(len - j, layout.block_size - offset);
        fn(j, slots, run);
        j += run;
      }
    };

    float* scores = Scratch<kScoresScratch>(num_heads * len);  // [num_heads, len]
    // Heads are walked as (kv head, head of its group): no division per slot.
    for_each_run(k_cache, [&](int64_t j, const float* slots, int64_t run) {
      for (int64_t r = 0; r < run; ++r) {
        const float* keys = slots + r * slot_floats;
        for (int64_t kv = 0, h = 0; kv < layout.num_kv_heads; ++kv) {
          for (int64_t g = 0; g < group; ++g, ++h) {
            scores[h * len + j + r] = Dot(q + h * head_dim, keys + kv * head_dim, head_dim) * scale;
          }
        }
      }
    });
    for (int64_t h = 0; h < num_heads; ++h) {
      float* s = scores + h * len;
      max[h] = *std::max_element(s, s + len);
      sum[h] = ExpShiftedSum(s, len, max[h]);
    }
    std::fill(acc, acc + num_heads * head_dim, 0.0f);
    for_each_run(v_cache, [&](int64_t j, const float* slots, int64_t run) {
      for (int64_t kv = 0, h = 0; kv < layout.num_kv_heads; ++kv) {
        for (int64_t g = 0; g < group; ++g, ++h) {
          WeightedRowSum(scores + h * len + j, slots + kv * head_dim, slot_floats, run,
                         acc + h * head_dim, head_dim);
        }
      }
    });
  }

  // Combines `chunks` consecutive partial results of one token (each
  // [num_heads, head_dim] acc, [num_heads] max, [num_heads] sum) into its
  // normalised output.
  static void MergePartials(const float* partials, int32_t chunks, int32_t num_heads,
                            int64_t head_dim, float* out) {  // [num_heads, head_dim]
    const int64_t partial_floats = num_heads * (head_dim + 2);
    for (int32_t h = 0; h < num_heads; ++h) {
      float max = -std::numeric_limits<float>::infinity();
      for (int32_t c = 0; c < chunks; ++c) {
        max = std::max(max, partials[c * partial_floats + num_heads * head_dim + h]);
      }
      float* o = out + h * head_dim;
      std::fill(o, o + head_dim, 0.0f);
      float sum = 0;
      for (int32_t c = 0; c < chunks; ++c) {
        const float* partial = partials + c * partial_floats;
        const float weight = std::exp(partial[num_heads * head_dim + h] - max);
        sum += weight * partial[num_heads * head_dim + num_heads + h];
        Axpy(weight, partial + h * head_dim, o, head_dim);
      }
      Scale(1.0f / sum, o, head_dim);
    }
  }

  // Per-thread scratch space, one buffer per `Tag`, reused across calls.
  template <int Tag>
  static float* Scratch(int64_t floats) {
    thread_local std::vector<float> buffer;
    if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
    return buffer.data();
  }
  static constexpr int kScoresScratch = 0;
  static constexpr int kStatsScratch = 1;

  ThreadPool pool_;
  const GemmIsa gemm_isa_;
  const DType weight_dtype_;
  // Partial attention results of split tokens; kept to avoid reallocating.
  std::vector<float> partials_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCpuBackend(const CpuBackendOptions& options) {
  if (options.num_threads < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CreateCpuBackend: num_threads must be >= 0 (0 = all cores), got ", options.num_threads));
  }
  const int num_threads = options.num_threads > 0
                              ? options.num_threads
                              : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  // The GEMM reads weights stored in every dtype.
  if (!IsKnownDType(options.weight_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("CreateCpuBackend: unknown weight_dtype ",
                                                   static_cast<int>(options.weight_dtype)));
  }
  // OpenBLAS's thread count (MergeLora) is process-wide; its GEMMs and our
  // loops never run at the same time, so both use the same cores.
  openblas_set_num_threads(num_threads);
  return std::make_unique<CpuBackend>(num_threads, options.weight_dtype);
}

}  // namespace loraserve::kernels
