#include "kernels/cpu/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/gemm_kernel.h"

namespace loraserve::kernels {
namespace gemm_internal {
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  // 4 · 3 accumulators + 3 x vectors + 1 w vector: all 16 registers.
  static constexpr int kTileCols = 4;
  // 4 · 2 accumulators + 2 x vectors + 1 w vector.
  static constexpr int kDecodeTileCols = 4;
  static constexpr int kTileRows = 3;

  static V Zero() { return _mm256_setzero_ps(); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static V LoadTail(const float* p, int64_t count) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_ps(p, mask);
  }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V Mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V Set1(float f) { return _mm256_set1_ps(f); }
  static V LoadBf16(const uint16_t* p) {
    const __m256i wide =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static V LoadF16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // q + 128 with the top bit flipped is q as a signed byte.
  static V LoadQ8(const uint8_t* p) {
    const __m128i q = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)),
                                    _mm_set1_epi8(static_cast<char>(0x80)));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  }
  // Tails go through a padded copy (AVX2 has no masked 8- or 16-bit loads);
  // `fill` is the element that widens to 0.
  template <typename T>
  static V LoadTailOf(const T* p, int64_t count, V (*load)(const T*), T fill = 0) {
    T padded[kLanes];
    std::fill(padded, padded + kLanes, fill);
    std::memcpy(padded, p, static_cast<size_t>(count) * sizeof(T));
    return load(padded);
  }
  static V LoadBf16Tail(const uint16_t* p, int64_t count) { return LoadTailOf(p, count, LoadBf16); }
  static V LoadF16Tail(const uint16_t* p, int64_t count) { return LoadTailOf(p, count, LoadF16); }
  static V LoadQ8Tail(const uint8_t* p, int64_t count) {
    return LoadTailOf(p, count, LoadQ8, Q8Byte(0));
  }
  // Halves added pairwise down to one lane, always in this order.
  static float Sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

}  // namespace

void GemmColumnsAvx2(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch) {
  GemmColumnsOfDType<Avx2>(p, j0, j1, scratch);
}

bool PackAllXAvx2(const Problem& p, float* out) { return PackAllX<Avx2>(p, out); }

}  // namespace gemm_internal

namespace {

// The calling thread's scratch for the kernels, packed w sized for k, and
// room for all of x when it has few rows (PackAllX*) after the kernels' part.
gemm_internal::Scratch ThreadScratch(int64_t k, float** all_x) {
  using gemm_internal::kMaxLanes;
  constexpr int64_t kAccFloats = gemm_internal::kBlockRows * gemm_internal::kBlockCols * kMaxLanes;
  constexpr int64_t kPackedXFloats = gemm_internal::kMaxTileRows * gemm_internal::kBlockK;
  constexpr int64_t kAlignFloats = 64 / sizeof(float);
  const int64_t packed_w_floats =
      gemm_internal::ColumnsPerCall(k) * ((k + kMaxLanes - 1) / kMaxLanes * kMaxLanes);
  thread_local std::vector<float> buffer;
  const int64_t all_x_floats = gemm_internal::PackedAllXFloats(2 * gemm_internal::kMaxTileRows, k);
  const auto floats = static_cast<size_t>(kAccFloats + kPackedXFloats + packed_w_floats +
                                          all_x_floats + kAlignFloats);
  if (buffer.size() < floats) buffer.resize(floats);
  const auto address = reinterpret_cast<uintptr_t>(buffer.data());
  float* aligned = buffer.data() + (-address / sizeof(float)) % kAlignFloats;
  *all_x = aligned + kAccFloats + kPackedXFloats + packed_w_floats;
  return {aligned, aligned + kAccFloats, aligned + kAccFloats + kPackedXFloats};
}

// `p` with x packed once into `all_x` when the kernels read w in place.
gemm_internal::Problem WithPackedX(GemmIsa isa, gemm_internal::Problem p, float* all_x) {
  const bool packed = isa != GemmIsa::kAvx2 ? gemm_internal::PackAllXAvx512(p, all_x)
                                            : gemm_internal::PackAllXAvx2(p, all_x);
  if (packed) p.packed_x = all_x;
  return p;
}

}  // namespace

GemmIsa BestGemmIsa() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  if (!avx512) return GemmIsa::kAvx2;
  return __builtin_cpu_supports("avx512vnni") ? GemmIsa::kAvx512Vnni : GemmIsa::kAvx512;
}

const char* GemmIsaName(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::kAvx2:
      return "avx2";
    case GemmIsa::kAvx512:
      return "avx512";
    case GemmIsa::kAvx512Vnni:
      return "avx512-vnni";
  }
  return "?";
}

void MatMulTransposedSerial(GemmIsa isa, const float* x, const void* w, DType w_dtype, int64_t m,
                            int64_t n, int64_t k, float alpha, bool accumulate, float* y,
                            int64_t ldy) {
  if (m <= 0 || n <= 0) return;
  const gemm_internal::Problem p{x, w, w_dtype, m, n, k, alpha, accumulate, y, ldy};
  if (w_dtype == DType::kQ8 && isa == GemmIsa::kAvx512Vnni) {
    return gemm_internal::MatMulQ8Vnni(p, nullptr);
  }
  const auto columns =
      isa != GemmIsa::kAvx2 ? gemm_internal::GemmColumnsAvx512 : gemm_internal::GemmColumnsAvx2;
  const int64_t block = gemm_internal::ColumnsPerCall(k);
  float* all_x = nullptr;
  const gemm_internal::Scratch scratch = ThreadScratch(k, &all_x);
  const gemm_internal::Problem packed = WithPackedX(isa, p, all_x);
  for (int64_t j = 0; j < n; j += block) columns(packed, j, std::min(j + block, n), scratch);
}

void MatMulTransposed(GemmIsa isa, ThreadPool& pool, const float* x, const void* w, DType w_dtype,
                      int64_t m, int64_t n, int64_t k, float alpha, bool accumulate, float* y,
                      int64_t ldy) {
  if (m <= 0 || n <= 0) return;
  const gemm_internal::Problem p{x, w, w_dtype, m, n, k, alpha, accumulate, y, ldy};
  if (w_dtype == DType::kQ8 && isa == GemmIsa::kAvx512Vnni) {
    return gemm_internal::MatMulQ8Vnni(p, &pool);
  }
  const auto columns =
      isa != GemmIsa::kAvx2 ? gemm_internal::GemmColumnsAvx512 : gemm_internal::GemmColumnsAvx2;
  // Threads split the rows of w (each streams its share of w once and reuses
  // it for every row of x), in blocks that fit the packed-w budget.
  const int64_t block = gemm_internal::ColumnsPerCall(k);
  const int64_t blocks = (n + block - 1) / block;
  const int64_t block_macs = m * std::min(n, block) * k;
  pool.ParallelFor(blocks, std::max<int64_t>(1, gemm_internal::kParallelMinMacs / block_macs),
                   [&](int64_t begin, int64_t end) {
                     float* all_x = nullptr;
                     const gemm_internal::Scratch scratch = ThreadScratch(k, &all_x);
                     const gemm_internal::Problem packed = WithPackedX(isa, p, all_x);
                     for (int64_t b = begin; b < end; ++b) {
                       columns(packed, b * block, std::min((b + 1) * block, n), scratch);
                     }
                   });
}

}  // namespace loraserve::kernels
