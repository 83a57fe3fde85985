// The AVX-512 instantiation of the GEMM kernel (see gemm_kernel.h). This file
// alone is compiled with AVX-512 flags; gemm.cc calls into it only on CPUs
// that have AVX-512F/VL/BW/DQ.

#include <immintrin.h>

#include <cstdint>

#include "kernels/cpu/avx512_sum.h"
#include "kernels/cpu/gemm_kernel.h"

#if !defined(__AVX512F__) || !defined(__AVX512VL__) || !defined(__AVX512BW__) || \
    !defined(__AVX512DQ__)
#error "gemm_avx512.cc must be compiled with -mavx512f -mavx512vl -mavx512bw -mavx512dq"
#endif

namespace loraserve::kernels::gemm_internal {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  // 8 · 2 accumulators + 8 x vectors + 1 w vector of the 32 registers; each
  // step of 16 floats loads 10 vectors for 16 FMAs. Eight rows make a decode
  // batch of 8 one tile, so w streams from memory exactly once.
  static constexpr int kTileCols = 2;
  // 8 · 2 accumulators + 2 x vectors + 1 w vector: 8 rows of w stream at
  // once in a decode step of one or two requests.
  static constexpr int kDecodeTileCols = 8;
  static constexpr int kTileRows = 8;

  static V Zero() { return _mm512_setzero_ps(); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadTail(const float* p, int64_t count) { return _mm512_maskz_loadu_ps(Mask(count), p); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V Fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V Set1(float f) { return _mm512_set1_ps(f); }
  static V Bf16ToFloats(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  static __mmask16 Mask(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
  static V LoadBf16(const uint16_t* p) {
    return Bf16ToFloats(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V LoadBf16Tail(const uint16_t* p, int64_t count) {
    return Bf16ToFloats(_mm256_maskz_loadu_epi16(Mask(count), p));
  }
  static V LoadF16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V LoadF16Tail(const uint16_t* p, int64_t count) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(Mask(count), p));
  }
  // q + 128 with the top bit flipped is q as a signed byte; lanes past a
  // tail read as 0x80, q = 0.
  static V Q8ToFloats(__m128i bytes) {
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_xor_si128(bytes, _mm_set1_epi8(static_cast<char>(0x80)))));
  }
  static V LoadQ8(const uint8_t* p) {
    return Q8ToFloats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V LoadQ8Tail(const uint8_t* p, int64_t count) {
    return Q8ToFloats(_mm_mask_loadu_epi8(_mm_set1_epi8(static_cast<char>(0x80)), Mask(count), p));
  }
  static float Sum(V v) { return Avx512LaneSum(v); }
};

}  // namespace

void GemmColumnsAvx512(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch) {
  GemmColumnsOfDType<Avx512>(p, j0, j1, scratch);
}

bool PackAllXAvx512(const Problem& p, float* out) { return PackAllX<Avx512>(p, out); }

}  // namespace loraserve::kernels::gemm_internal
