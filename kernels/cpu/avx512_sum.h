// The fixed tree over the 16 lanes of a __m512 that every AVX-512 GEMM kernel
// finishes an output with (halves added pairwise down to one lane, always in
// this order), so the float and int8 kernels sum lanes alike. Only
// translation units compiled with AVX-512 flags include this file.
#ifndef LORASERVE_KERNELS_CPU_AVX512_SUM_H_
#define LORASERVE_KERNELS_CPU_AVX512_SUM_H_

#include <immintrin.h>

namespace loraserve::kernels::gemm_internal {

inline float Avx512LaneSum(__m512 v) {
  const __m256 s8 = _mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4);
}

}  // namespace loraserve::kernels::gemm_internal

#endif  // LORASERVE_KERNELS_CPU_AVX512_SUM_H_
