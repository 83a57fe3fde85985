#include "kernels/backend.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>
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

// Whether `w` takes rows of `dim` elements, for the default fused ops.
absl::Status CheckProjectionWidth(const Backend& backend, const char* op, const WeightView& w,
                                  int64_t dim) {
  if (w.cols == dim) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(backend.name(), ": ", op, ": w has ", w.cols, " columns for rows of ", dim));
}

}  // namespace

absl::Status Backend::RmsNormLinear(const float* x, const float* norm_weight, int64_t n,
                                    int64_t dim, float eps, float* h, const WeightView& w,
                                    float* y) {
  if (absl::Status status = CheckProjectionWidth(*this, "RmsNormLinear", w, dim); !status.ok()) {
    return status;
  }
  if (absl::Status status = RmsNorm(x, norm_weight, n, dim, eps, h); !status.ok()) return status;
  return Linear(h, w, n, y, /*accumulate=*/false);
}

absl::Status Backend::SiluMulLinear(const float* gate_up, int64_t n, int64_t dim, float* act,
                                    const WeightView& w, float* y, bool accumulate) {
  if (absl::Status status = CheckProjectionWidth(*this, "SiluMulLinear", w, dim); !status.ok()) {
    return status;
  }
  if (absl::Status status = SiluMul(gate_up, n, dim, act); !status.ok()) return status;
  return Linear(act, w, n, y, accumulate);
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
