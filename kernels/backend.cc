#include "kernels/backend.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/quantization.h"

namespace loraserve::kernels {

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kQ8:
      return 1;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kQ8:
      return "Q8";
  }
  return "?";
}

bool IsKnownDType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
    case DType::kQ8:
      return true;
  }
  return false;
}

int64_t WeightRowBytes(DType dtype, int64_t cols) {
  if (dtype != DType::kQ8) return cols * static_cast<int64_t>(DTypeSize(dtype));
  return Q8RowLayout::For(cols).row_bytes;
}

int64_t WeightBytes(DType dtype, int64_t rows, int64_t cols) {
  return rows * WeightRowBytes(dtype, cols);
}

int64_t KvPoolBytes(const KvLayout& layout) {
  return int64_t{layout.num_blocks} * layout.block_size * layout.num_kv_heads * layout.head_dim *
         static_cast<int64_t>(DTypeSize(layout.dtype));
}

namespace {

float BF16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {  // infinity or NaN
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    std::memcpy(&bits, &magnitude, sizeof(bits));
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

}  // namespace

void ConvertToFloat32(const void* src, DType src_dtype, int64_t count, float* dst) {
  switch (src_dtype) {
    case DType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(count) * sizeof(float));
      return;
    case DType::kBF16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = BF16ToFloat(in[i]);
      return;
    }
    case DType::kF16: {
      const auto* in = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < count; ++i) dst[i] = F16ToFloat(in[i]);
      return;
    }
    case DType::kQ8:
      DequantizeQ8Row(src, count, dst);
      return;
  }
}

void ConvertFloat32ToBf16(const float* src, int64_t count, uint16_t* dst) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &src[i], sizeof(bits));
    if (std::isnan(src[i])) {
      dst[i] = static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet, sign kept
      continue;
    }
    // Adding 0x7FFF plus the kept part's lowest bit carries into the kept
    // half exactly when the dropped half is over one half, or is one half
    // and the kept part is odd; an overflow to infinity is the right result.
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    dst[i] = static_cast<uint16_t>(bits >> 16);
  }
}

void ConvertFloat32ToF16(const float* src, int64_t count, uint16_t* dst) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound));
  }
  if (i < count) {
    float padded[8] = {};
    uint16_t out[8];
    std::memcpy(padded, src + i, static_cast<size_t>(count - i) * sizeof(float));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm256_cvtps_ph(_mm256_loadu_ps(padded), kRound));
    std::memcpy(dst + i, out, static_cast<size_t>(count - i) * sizeof(uint16_t));
  }
}

int64_t LoraIntermediateSize(const LoraSegment* segments, int32_t num_segments) {
  int64_t floats = 0;
  for (int32_t s = 0; s < num_segments; ++s) {
    floats += static_cast<int64_t>(segments[s].end - segments[s].start) * segments[s].rank;
  }
  return floats;
}

namespace {

// The checks of one call of an operation, in order; the first that fails is
// the call's status and the later ones are skipped. Messages name the backend
// and the op: "cpu: Linear: x is null".
class ArgumentCheck {
 public:
  ArgumentCheck(const Backend& backend, const char* op) : backend_(backend), op_(op) {}

  bool ok() const { return status_.ok(); }
  const absl::Status& status() const { return status_; }

  // Fails with `what` (the text after the op's name) unless `condition`.
  template <typename... Parts>
  ArgumentCheck& That(bool condition, const Parts&... what) {
    if (status_.ok() && !condition) {
      status_ = absl::InvalidArgumentError(absl::StrCat(backend_.name(), ": ", op_, ": ", what...));
    }
    return *this;
  }
  ArgumentCheck& NotNull(const char* arg, const void* p) {
    return That(p != nullptr, arg, " is null");
  }
  ArgumentCheck& NonNegative(const char* arg, int64_t value) {
    return That(value >= 0, arg, " must not be negative, got ", value);
  }
  ArgumentCheck& Positive(const char* arg, int64_t value) {
    return That(value > 0, arg, " must be positive, got ", value);
  }
  // A row stride must hold a row: `ld` >= `row_floats`.
  ArgumentCheck& RowStride(const char* arg, int64_t ld, int64_t row_floats) {
    return That(ld >= row_floats, arg, " is ", ld, ", less than a row of ", row_floats, " floats");
  }
  ArgumentCheck& Weight(const char* arg, const WeightView& w) {
    NotNull(arg, w.data);
    That(IsKnownDType(w.dtype), arg, " has unknown dtype ", static_cast<int>(w.dtype));
    Positive("weight rows", w.rows);
    return Positive("weight cols", w.cols);
  }
  // Whether `w` takes rows of `dim` elements (the fused norm and gate ops).
  ArgumentCheck& ProjectionWidth(const WeightView& w, int64_t dim) {
    return That(w.cols == dim, "w has ", w.cols, " columns for rows of ", dim);
  }
  ArgumentCheck& Layout(const KvLayout& layout) {
    Positive("layout.num_blocks", layout.num_blocks);
    Positive("layout.block_size", layout.block_size);
    Positive("layout.num_kv_heads", layout.num_kv_heads);
    Positive("layout.head_dim", layout.head_dim);
    return That(IsKnownDType(layout.dtype) && layout.dtype != DType::kQ8, "layout.dtype ",
                static_cast<int>(layout.dtype), " is not an element type");
  }
  ArgumentCheck& Segments(const LoraSegment* segments, int32_t num_segments) {
    NonNegative("num_segments", num_segments);
    if (num_segments > 0) NotNull("segments", segments);
    for (int32_t i = 0; ok() && i < num_segments; ++i) {
      const LoraSegment& seg = segments[i];
      That(seg.start >= 0 && seg.end >= seg.start, "segment ", i, " has rows [", seg.start, ", ",
           seg.end, "); expected 0 <= start <= end");
      That(seg.rank > 0 && seg.a != nullptr && seg.bt != nullptr, "segment ", i,
           " needs rank > 0 (got ", seg.rank, ") and non-null a and bt");
    }
    return *this;
  }
  // The host-side fields of an attention batch with `num_tokens` > 0.
  ArgumentCheck& AttentionSequences(const AttentionBatch& batch) {
    That(batch.num_seqs > 0, "batch has ", batch.num_tokens, " tokens but no sequences");
    Positive("batch.max_blocks_per_seq", batch.max_blocks_per_seq);
    NotNull("batch.query_start", batch.query_start);
    NotNull("batch.context_lens", batch.context_lens);
    NotNull("batch.block_tables", batch.block_tables);
    return NotNull("batch.positions", batch.positions);
  }

 private:
  const Backend& backend_;
  const char* op_;
  absl::Status status_;
};

// The checks of the copies: both pointers, where there are bytes to copy.
absl::Status CheckCopy(const Backend& backend, const char* op, void* dst, const void* src) {
  ArgumentCheck check(backend, op);
  return check.NotNull("dst", dst).NotNull("src", src).status();
}

}  // namespace

absl::Status Backend::CopyToDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (absl::Status s = CheckCopy(*this, "CopyToDevice", dst, src); !s.ok()) return s;
  return DoCopyToDevice(dst, src, bytes);
}

absl::Status Backend::CopyToDeviceAsync(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (absl::Status s = CheckCopy(*this, "CopyToDeviceAsync", dst, src); !s.ok()) return s;
  return DoCopyToDeviceAsync(dst, src, bytes);
}

absl::Status Backend::CopyToHost(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (absl::Status s = CheckCopy(*this, "CopyToHost", dst, src); !s.ok()) return s;
  return DoCopyToHost(dst, src, bytes);
}

absl::Status Backend::CopyOnDevice(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  if (absl::Status s = CheckCopy(*this, "CopyOnDevice", dst, src); !s.ok()) return s;
  return DoCopyOnDevice(dst, src, bytes);
}

absl::Status Backend::UploadWeight(void* dst, const void* src, DType src_dtype, int64_t rows,
                                   int64_t cols) {
  ArgumentCheck check(*this, "UploadWeight");
  check.NonNegative("rows", rows).NonNegative("cols", cols);
  check.That(src_dtype == DType::kF32 || src_dtype == DType::kF16 || src_dtype == DType::kBF16,
             "src_dtype must be F32, F16 or BF16, got ", DTypeName(src_dtype));
  if (!check.ok() || rows == 0 || cols == 0) return check.status();
  if (!check.NotNull("dst", dst).NotNull("src", src).ok()) return check.status();
  return DoUploadWeight(dst, src, src_dtype, rows, cols);
}

absl::Status Backend::Linear(const float* x, const WeightView& w, int64_t m, float* y,
                             bool accumulate) {
  ArgumentCheck check(*this, "Linear");
  if (!check.Weight("w", w).NonNegative("m", m).ok() || m == 0) return check.status();
  if (!check.NotNull("x", x).NotNull("y", y).ok()) return check.status();
  return DoLinear(x, w, m, y, accumulate);
}

absl::Status Backend::Embedding(const int32_t* ids, int64_t n, const WeightView& table, float* y) {
  ArgumentCheck check(*this, "Embedding");
  if (!check.Weight("table", table).NonNegative("n", n).ok() || n == 0) return check.status();
  if (!check.NotNull("ids", ids).NotNull("y", y).ok()) return check.status();
  return DoEmbedding(ids, n, table, y);
}

absl::Status Backend::RmsNorm(const float* x, const float* weight, int64_t n, int64_t dim,
                              float eps, float* y) {
  ArgumentCheck check(*this, "RmsNorm");
  if (!check.NonNegative("n", n).Positive("dim", dim).ok() || n == 0) return check.status();
  if (!check.NotNull("x", x).NotNull("weight", weight).NotNull("y", y).ok()) {
    return check.status();
  }
  return DoRmsNorm(x, weight, n, dim, eps, y);
}

absl::Status Backend::RmsNormLinear(const float* x, const float* norm_weight, int64_t n,
                                    int64_t dim, float eps, float* h, const WeightView& w,
                                    float* y) {
  ArgumentCheck check(*this, "RmsNormLinear");
  check.Weight("w", w).NonNegative("n", n).Positive("dim", dim).ProjectionWidth(w, dim);
  if (!check.ok() || n == 0) return check.status();
  check.NotNull("x", x).NotNull("norm_weight", norm_weight).NotNull("h", h).NotNull("y", y);
  if (!check.ok()) return check.status();
  return DoRmsNormLinear(x, norm_weight, n, dim, eps, h, w, y);
}

absl::Status Backend::SiluMulLinear(const float* gate_up, int64_t n, int64_t dim, float* act,
                                    const WeightView& w, float* y, bool accumulate) {
  ArgumentCheck check(*this, "SiluMulLinear");
  check.Weight("w", w).NonNegative("n", n).Positive("dim", dim).ProjectionWidth(w, dim);
  if (!check.ok() || n == 0) return check.status();
  if (!check.NotNull("gate_up", gate_up).NotNull("act", act).NotNull("y", y).ok()) {
    return check.status();
  }
  return DoSiluMulLinear(gate_up, n, dim, act, w, y, accumulate);
}

absl::Status Backend::Add(float* x, const float* y, int64_t count) {
  ArgumentCheck check(*this, "Add");
  if (!check.NonNegative("count", count).ok() || count == 0) return check.status();
  if (!check.NotNull("x", x).NotNull("y", y).ok()) return check.status();
  return DoAdd(x, y, count);
}

absl::Status Backend::AddBias(float* x, const float* bias, int64_t n, int64_t dim) {
  ArgumentCheck check(*this, "AddBias");
  if (!check.NonNegative("n", n).Positive("dim", dim).ok() || n == 0) return check.status();
  if (!check.NotNull("x", x).NotNull("bias", bias).ok()) return check.status();
  return DoAddBias(x, bias, n, dim);
}

absl::Status Backend::SiluMul(const float* gate_up, int64_t n, int64_t dim, float* out) {
  ArgumentCheck check(*this, "SiluMul");
  if (!check.NonNegative("n", n).Positive("dim", dim).ok() || n == 0) return check.status();
  if (!check.NotNull("gate_up", gate_up).NotNull("out", out).ok()) return check.status();
  return DoSiluMul(gate_up, n, dim, out);
}

absl::Status Backend::LoraShrink(const float* x, int64_t in, const LoraSegment* segments,
                                 int32_t num_segments, float* t) {
  ArgumentCheck check(*this, "LoraShrink");
  check.Segments(segments, num_segments);
  if (num_segments > 0) check.NotNull("x", x).NotNull("t", t).Positive("in", in);
  if (!check.ok()) return check.status();
  return DoLoraShrink(x, in, segments, num_segments, t);
}

absl::Status Backend::LoraExpand(const float* t, const LoraSegment* segments, int32_t num_segments,
                                 int64_t out, float* y, int64_t ldy) {
  ArgumentCheck check(*this, "LoraExpand");
  check.Segments(segments, num_segments);
  if (num_segments > 0) {
    check.NotNull("t", t).NotNull("y", y).Positive("out", out);
    check.That(ldy >= out, "ldy (", ldy, ") must be >= out (", out, ")");
  }
  if (!check.ok()) return check.status();
  return DoLoraExpand(t, segments, num_segments, out, y, ldy);
}

absl::Status Backend::MergeLora(const WeightView& base, const void* a, const void* bt, int32_t rank,
                                float scale, void* out, const float* row_scale) {
  ArgumentCheck check(*this, "MergeLora");
  check.Weight("base", base).NotNull("a", a).NotNull("bt", bt).NotNull("out", out);
  if (!check.Positive("rank", rank).ok()) return check.status();
  return DoMergeLora(base, a, bt, rank, scale, out, row_scale);
}

absl::Status Backend::ScaleColumns(float* y, int64_t ldy, int64_t cols,
                                   const ColumnScaleSegment* segments, int32_t num_segments) {
  ArgumentCheck check(*this, "ScaleColumns");
  check.Positive("cols", cols).NotNull("y", y);
  check.That(ldy >= cols, "ldy (", ldy, ") must be >= cols (", cols, ")");
  check.That(num_segments >= 0 && (num_segments == 0 || segments != nullptr),
             "segments must hold num_segments (", num_segments, ") entries");
  for (int32_t i = 0; check.ok() && i < num_segments; ++i) {
    check.That(segments[i].start >= 0 && segments[i].end >= segments[i].start,
               "segment ", i, " has rows [", segments[i].start, ", ", segments[i].end, ")");
    check.NotNull("segment scale", segments[i].scale);
  }
  if (!check.ok()) return check.status();
  if (num_segments == 0) return absl::OkStatus();
  return DoScaleColumns(y, ldy, cols, segments, num_segments);
}

absl::Status Backend::Rope(float* q, int64_t q_ld, float* k, int64_t k_ld, const int32_t* positions,
                           int64_t tokens, int32_t num_heads, int32_t num_kv_heads,
                           const RopeParams& rope) {
  ArgumentCheck check(*this, "Rope");
  check.NonNegative("tokens", tokens)
      .Positive("num_heads", num_heads)
      .Positive("num_kv_heads", num_kv_heads)
      .That(rope.head_dim > 0 && rope.head_dim % 2 == 0,
            "rope.head_dim must be positive and even, got ", rope.head_dim)
      .RowStride("q_ld", q_ld, int64_t{num_heads} * rope.head_dim)
      .RowStride("k_ld", k_ld, int64_t{num_kv_heads} * rope.head_dim);
  if (!check.ok() || tokens == 0) return check.status();
  check.NotNull("q", q).NotNull("k", k).NotNull("positions", positions);
  if (!check.NotNull("rope.inv_freq", rope.inv_freq).ok()) return check.status();
  return DoRope(q, q_ld, k, k_ld, positions, tokens, num_heads, num_kv_heads, rope);
}

absl::Status Backend::WriteKv(const float* k, const float* v, int64_t kv_ld,
                              const AttentionBatch& batch, const KvLayout& layout, void* k_cache,
                              void* v_cache) {
  ArgumentCheck check(*this, "WriteKv");
  check.Layout(layout).RowStride("kv_ld", kv_ld, int64_t{layout.num_kv_heads} * layout.head_dim);
  check.NonNegative("batch.num_tokens", batch.num_tokens);
  if (!check.ok() || batch.num_tokens == 0) return check.status();
  check.NotNull("k", k).NotNull("v", v).NotNull("k_cache", k_cache).NotNull("v_cache", v_cache);
  if (!check.NotNull("batch.slot_mapping", batch.slot_mapping).ok()) return check.status();
  return DoWriteKv(k, v, kv_ld, batch, layout, k_cache, v_cache);
}

absl::Status Backend::PagedAttention(const float* q, int64_t q_ld, const AttentionBatch& batch,
                                     const KvLayout& layout, int32_t num_heads, const void* k_cache,
                                     const void* v_cache, float* out) {
  ArgumentCheck check(*this, "PagedAttention");
  check.Layout(layout).Positive("num_heads", num_heads);
  if (!check.ok()) return check.status();
  check.That(num_heads % layout.num_kv_heads == 0, "num_heads (", num_heads,
             ") must be a multiple of layout.num_kv_heads (", layout.num_kv_heads, ")");
  check.RowStride("q_ld", q_ld, int64_t{num_heads} * layout.head_dim);
  check.NonNegative("batch.num_seqs", batch.num_seqs);
  check.NonNegative("batch.num_tokens", batch.num_tokens);
  if (!check.ok() || batch.num_tokens == 0) return check.status();
  check.AttentionSequences(batch).NotNull("q", q).NotNull("k_cache", k_cache);
  if (!check.NotNull("v_cache", v_cache).NotNull("out", out).ok()) return check.status();
  return DoPagedAttention(q, q_ld, batch, layout, num_heads, k_cache, v_cache, out);
}

absl::Status Backend::Sample(const float* logits, int64_t rows, int64_t vocab,
                             const SamplingRow* params, SampledToken* out) {
  ArgumentCheck check(*this, "Sample");
  check.NonNegative("rows", rows).Positive("vocab", vocab);
  check.That(vocab <= std::numeric_limits<int32_t>::max(), "vocab must fit token ids (int32), got ",
             vocab);
  if (!check.ok() || rows == 0) return check.status();
  check.NotNull("logits", logits).NotNull("params", params).NotNull("out", out);
  for (int64_t row = 0; check.ok() && row < rows; ++row) {
    const absl::Status status = ValidateSamplingRow(params[row], row);
    check.That(status.ok(), status.message());
  }
  if (!check.ok()) return check.status();
  return DoSample(logits, rows, vocab, params, out);
}

// Already checked: the unfused ops' implementations run on the same
// arguments.
absl::Status Backend::DoRmsNormLinear(const float* x, const float* norm_weight, int64_t n,
                                      int64_t dim, float eps, float* h, const WeightView& w,
                                      float* y) {
  if (absl::Status status = DoRmsNorm(x, norm_weight, n, dim, eps, h); !status.ok()) {
    return status;
  }
  return DoLinear(h, w, n, y, /*accumulate=*/false);
}

absl::Status Backend::DoSiluMulLinear(const float* gate_up, int64_t n, int64_t dim, float* act,
                                      const WeightView& w, float* y, bool accumulate) {
  if (absl::Status status = DoSiluMul(gate_up, n, dim, act); !status.ok()) return status;
  return DoLinear(act, w, n, y, accumulate);
}

absl::Status Backend::BeginStep(uint64_t key, int32_t max_segments) {
  return absl::UnimplementedError(absl::StrCat(name(), " does not record step graphs"));
}

absl::Status Backend::EndStep() {
  return absl::FailedPreconditionError(absl::StrCat(name(), ": EndStep without a step"));
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    backend_ = std::exchange(other.backend_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (backend_ != nullptr && data_ != nullptr) backend_->Free(data_, bytes_);
  backend_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

}  // namespace loraserve::kernels
