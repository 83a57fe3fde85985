// The kQ8 GEMM on AVX-512 VNNI (see gemm.h, GemmIsa::kAvx512Vnni): int8
// weights times int8 activations with vpdpbusd, 64 multiply-adds an
// instruction against 16 for a float32 FMA over dequantized weights.
//
// x is quantized per row in groups of kQ8GroupSize columns, as the weights
// are: x_q = round(x / sx) with sx = max|x| / 127 over the group. Weights are
// stored as u = q + 128 (kernels/quantization.h), vpdpbusd's unsigned
// operand, so each 32-bit lane sums u · x_q = q · x_q + 128 · x_q over its
// columns; the second term is taken off by starting each group's sum at
// -128 · Σ x_q of the lane's columns (computed once per row of x). A group's
// integer sum is exact; it is then scaled by sw · sx and added to a float32
// lane sum in group order, and the lanes are added by a fixed tree: every
// output is summed in one order that depends only on k, whatever m, the row
// tiles or the threads (batch-invariant, as the float kernels).
//
// This file alone is compiled with AVX-512 VNNI flags; gemm.cc calls it only
// on CPUs that have it.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/avx512_sum.h"
#include "kernels/cpu/gemm_kernel.h"
#include "kernels/quantization.h"

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "gemm_q8_vnni.cc must be compiled with -mavx512f -mavx512bw -mavx512vnni"
#endif

namespace loraserve::kernels::gemm_internal {
namespace {

constexpr int64_t kChunk = 64;  // bytes of k one vpdpbusd takes
constexpr int64_t kChunksPerGroup = kQ8GroupSize / kChunk;
static_assert(kQ8GroupSize % kChunk == 0, "a group must be whole chunks");

// A grow-only buffer of T whose data is 64-byte aligned: every 64-byte load
// of it then takes one cache line, not two.
template <typename T>
class AlignedBuffer {
 public:
  T* Resize(int64_t count) {
    storage_.resize(static_cast<size_t>(count) + 64 / sizeof(T));
    const auto address = reinterpret_cast<uintptr_t>(storage_.data());
    data_ = storage_.data() + (-address % 64) / sizeof(T);
    return data_;
  }
  const T* data() const { return data_; }

 private:
  std::vector<T> storage_;
  T* data_ = nullptr;
};

// x quantized: per row, `chunks` chunks of 64 int8 (zero past k), and per
// group its scale and the 16 lanes of -128 · Σ x_q of each lane's columns.
struct QuantizedX {
  int64_t chunks = 0;
  int64_t groups = 0;
  AlignedBuffer<int8_t> values;    // [m, chunks * 64]
  std::vector<float> scales;       // [m, groups]
  AlignedBuffer<int32_t> offsets;  // [m, groups, 16]
  const int8_t* Row(int64_t i) const { return values.data() + i * chunks * kChunk; }
};

// Floats [c, c + count) of a row, the rest of the vector 0.
inline __m512 LoadFloats(const float* row, int64_t c, int64_t count) {
  if (count >= 16) return _mm512_loadu_ps(row + c);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), row + c);
}

void QuantizeX(const float* x, int64_t m, int64_t k, QuantizedX* q) {
  q->chunks = (k + kChunk - 1) / kChunk;
  q->groups = (k + kQ8GroupSize - 1) / kQ8GroupSize;
  const int64_t row_bytes = q->chunks * kChunk;
  int8_t* values = q->values.Resize(m * row_bytes);
  q->scales.resize(static_cast<size_t>(m * q->groups));
  int32_t* offsets = q->offsets.Resize(m * q->groups * 16);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t i = 0; i < m; ++i) {
    const float* row = x + i * k;
    int8_t* out = values + i * row_bytes;
    std::memset(out + k, 0, static_cast<size_t>(row_bytes - k));  // past k: x_q = 0
    for (int64_t g = 0; g < q->groups; ++g) {
      const int64_t begin = g * kQ8GroupSize;
      const int64_t end = std::min(k, begin + kQ8GroupSize);
      __m512 max_abs = _mm512_setzero_ps();
      for (int64_t c = begin; c < end; c += 16) {
        max_abs = _mm512_max_ps(max_abs, _mm512_andnot_ps(sign, LoadFloats(row, c, end - c)));
      }
      const float scale = _mm512_reduce_max_ps(max_abs) / 127.0f;
      q->scales[i * q->groups + g] = scale;
      int32_t* group_offsets = offsets + (i * q->groups + g) * 16;
      if (!(scale > 0.0f)) {  // all zero (or NaN): x_q = 0
        std::memset(out + begin, 0, static_cast<size_t>(end - begin));
        std::fill(group_offsets, group_offsets + 16, 0);
        continue;
      }
      // round(x / scale): the default rounding (to nearest even) of
      // vcvtps2dq, in [-127, 127] by the choice of scale.
      const __m512 inverse = _mm512_set1_ps(1.0f / scale);
      for (int64_t c = begin; c < end; c += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(LoadFloats(row, c, end - c), inverse));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtsepi32_epi8(v));
      }
      // Lane l of vpdpbusd sums bytes 4l .. 4l + 3 of each chunk: the same
      // product with bytes of 1 gives each lane's Σ x_q.
      __m512i sums = _mm512_setzero_si512();
      for (int64_t c = begin; c < end; c += kChunk) {
        sums = _mm512_dpbusd_epi32(sums, _mm512_set1_epi8(1), _mm512_loadu_si512(out + c));
      }
      _mm512_storeu_si512(group_offsets, _mm512_mullo_epi32(sums, _mm512_set1_epi32(-128)));
    }
  }
}

// Group g (its first C chunks) of R rows of w times M rows of x, added to
// the lane sums `acc`. Every w chunk and scale of the group is loaded once
// and stays in a register while each row of x meets it; the loops are
// unrolled so that acc stays in registers too (GCC keeps it in memory
// otherwise, and every FMA waits on a store).
template <int R, int M, int C, int kHint>
__attribute__((always_inline)) inline void Group(const char* w, int64_t row_bytes,
                                                 int64_t scales_offset, const QuantizedX& qx,
                                                 int64_t i0, int64_t g, const char* next,
                                                 __m512 (&acc)[R][M]) {
  const int64_t c0 = g * kChunksPerGroup;
  __m512i wv[R][C];
  __m512 sw[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const char* row = w + r * row_bytes;
    float w_scale;
    std::memcpy(&w_scale, row + scales_offset + g * int64_t{sizeof(float)}, sizeof(w_scale));
    sw[r] = _mm512_set1_ps(w_scale);
    for (int c = 0; c < C; ++c) {
      wv[r][c] = _mm512_loadu_si512(row + (c0 + c) * kChunk);
      if (next != nullptr) {
        _mm_prefetch(next + r * row_bytes + (c0 + c) * kChunk, static_cast<_mm_hint>(kHint));
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < M; ++i) {
    const int64_t xi = i0 + i;
    const __m512i offset = _mm512_loadu_si512(qx.offsets.data() + (xi * qx.groups + g) * 16);
    const __m512 sx = _mm512_set1_ps(qx.scales[xi * qx.groups + g]);
    const int8_t* xr = qx.Row(xi) + c0 * kChunk;
    __m512i xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_si512(xr + c * kChunk);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512i sum = offset;
      for (int c = 0; c < C; ++c) sum = _mm512_dpbusd_epi32(sum, wv[r][c], xv[c]);
      acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(sw[r], sx), acc[r][i]);
    }
  }
}

// R rows of w (from `w`, rows `row_bytes` apart) times M rows of x (from row
// `i0` of `qx`) over every group, into y.
template <int R, int M, int kHint>
void Tile(const char* w, int64_t row_bytes, int64_t scales_offset, const QuantizedX& qx, int64_t i0,
          const char* next, float alpha, bool accumulate, float* y, int64_t ldy) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < M; ++i) acc[r][i] = _mm512_setzero_ps();
  }
  const int64_t full_groups = qx.chunks / kChunksPerGroup;
  for (int64_t g = 0; g < full_groups; ++g) {
    Group<R, M, kChunksPerGroup, kHint>(w, row_bytes, scales_offset, qx, i0, g, next, acc);
  }
  if (full_groups < qx.groups) {  // a last group of one chunk
    static_assert(kChunksPerGroup == 2, "a partial group is one chunk");
    Group<R, M, 1, kHint>(w, row_bytes, scales_offset, qx, i0, full_groups, next, acc);
  }
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      const float sum = Avx512LaneSum(acc[r][i]);
      float& out = y[i * ldy + r];
      out = accumulate ? __builtin_fmaf(alpha, sum, out) : alpha * sum;
    }
  }
}

// Tile<cols, rows> for 1 <= cols <= R, 1 <= rows <= M.
template <int R, int M, int kHint>
void TileOf(int cols, int rows, const char* w, int64_t row_bytes, int64_t scales_offset,
            const QuantizedX& qx, int64_t i0, const char* next, float alpha, bool accumulate,
            float* y, int64_t ldy) {
  if constexpr (M > 1) {
    if (rows < M) {
      return TileOf<R, M - 1, kHint>(cols, rows, w, row_bytes, scales_offset, qx, i0, next, alpha,
                                     accumulate, y, ldy);
    }
  }
  if constexpr (R > 1) {
    if (cols < R) {
      return TileOf<R - 1, M, kHint>(cols, rows, w, row_bytes, scales_offset, qx, i0, next, alpha,
                                     accumulate, y, ldy);
    }
  }
  Tile<R, M, kHint>(w, row_bytes, scales_offset, qx, i0, next, alpha, accumulate, y, ldy);
}

// Rows [j0, j1) of w against every row of x: tiles of kRows rows of w (8
// when x has one or two rows, so that 8 rows stream at once) times up to 4
// or 2 rows of x, w read in place (int8 needs no packing; a tile's rows stay
// in L1 while every row block of x meets them).
void Columns(const Problem& p, const QuantizedX& qx, int64_t j0, int64_t j1) {
  const Q8RowLayout layout = Q8RowLayout::For(p.k);
  const char* w = static_cast<const char*>(p.w);
  // Tiles of kCols rows of w and kRows of x, prefetching w `ahead` tiles
  // ahead with `hint` (kDecodePrefetchTiles and L2 for the decode tiles, as
  // the float kernel).
  const auto run = [&](auto tile_cols, auto tile_rows, int64_t ahead, auto hint) {
    constexpr int kCols = decltype(tile_cols)::value;
    constexpr int kRows = decltype(tile_rows)::value;
    constexpr int kHint = decltype(hint)::value;
    for (int64_t j = j0; j < j1; j += kCols) {
      const int cols = static_cast<int>(std::min<int64_t>(kCols, j1 - j));
      const int64_t j_next = j + ahead * kCols;
      const char* next = j_next + kCols <= p.n ? w + j_next * layout.row_bytes : nullptr;
      for (int64_t i = 0; i < p.m; i += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, p.m - i));
        TileOf<kCols, kRows, kHint>(cols, rows, w + j * layout.row_bytes, layout.row_bytes,
                                    layout.scales_offset, qx, i, i == 0 ? next : nullptr, p.alpha,
                                    p.accumulate, p.y + i * p.ldy + j, p.ldy);
      }
    }
  };
  if (p.m <= 8) {
    run(std::integral_constant<int, 8>(), std::integral_constant<int, 2>(), kDecodePrefetchTiles,
        std::integral_constant<int, _MM_HINT_T1>());
  } else {
    run(std::integral_constant<int, 4>(), std::integral_constant<int, 4>(), kPrefetchTiles,
        std::integral_constant<int, _MM_HINT_T0>());
  }
}

}  // namespace

void MatMulQ8Vnni(const Problem& p, ThreadPool* pool) {
  // The calling thread's buffer; the pool's threads reach it through this
  // pointer (a lambda names a thread_local of its own thread, never captures).
  thread_local QuantizedX buffer;
  const QuantizedX* const quantized = &buffer;
  QuantizeX(p.x, p.m, p.k, &buffer);
  // Rows of w in blocks of 64 (whole tiles): one thread streams its share.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (p.n + kBlock - 1) / kBlock;
  const auto blocks_fn = [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Columns(p, *quantized, b * kBlock, std::min((b + 1) * kBlock, p.n));
    }
  };
  if (pool == nullptr) return blocks_fn(0, blocks);
  const int64_t block_macs = p.m * std::min(p.n, kBlock) * p.k;
  pool->ParallelFor(blocks, std::max<int64_t>(1, kParallelMinMacs / block_macs), blocks_fn);
}

}  // namespace loraserve::kernels::gemm_internal
