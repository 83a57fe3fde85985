// Internals of kernels/cpu/gemm.h: the blocked, register-tiled kernel, written
// once over an instruction-set traits type and compiled in one translation
// unit per instruction set (gemm.cc for AVX2, gemm_avx512.cc with AVX-512
// flags). Only gemm*.cc include this file.
//
// A traits type `Isa` provides:
//   V, kLanes                 the vector type and its floats
//   kTileCols, kTileRows      the register tile: kTileCols rows of w times
//                             kTileRows rows of x, kTileCols · kTileRows
//                             accumulators plus kTileRows x vectors and one w
//                             vector fit the register file
//   Zero(), Load(p), LoadTail(p, count) (lanes >= count read as 0),
//   Store(p, v), Fma(a, b, c) = a · b + c, Sum(v) (a fixed tree over lanes)
// Traits types live in an unnamed namespace, so every template here is
// instantiated with internal linkage: no AVX-512 code can leak into the AVX2
// translation unit through the linker.
#ifndef LORASERVE_KERNELS_CPU_GEMM_KERNEL_H_
#define LORASERVE_KERNELS_CPU_GEMM_KERNEL_H_

#include <xmmintrin.h>

#include <cstdint>

namespace loraserve::kernels::gemm_internal {

// The whole product: y[m, 0:n] = alpha · x[m, k] · w[n, k]ᵀ (+ y).
struct Problem {
  const float* x;
  const float* w;
  int64_t m;
  int64_t n;
  int64_t k;
  float alpha;
  bool accumulate;
  float* y;
  int64_t ldy;
  // x packed for all of k (PackAllX) when the kernel reads w in place, or
  // null: then each call packs x block by block itself.
  const float* packed_x = nullptr;
};

// Rows of x whose partial sums are kept between k blocks; the lanes of the
// partial sums of kBlockRows x kBlockCols outputs take kBlockRows ·
// kBlockCols · kMaxLanes floats.
constexpr int64_t kBlockRows = 48;
// Rows of w per call of a kernel at most, a multiple of every kTileCols.
constexpr int64_t kBlockCols = 64;
// Floats of packed w per call of a kernel at most (unless a single tile of
// rows needs more): half of a 1 MiB L2, where it stays while every row of x
// meets it.
constexpr int64_t kPackedWBudget = int64_t{128} << 10;
// Floats of k per cache block: a row tile of x (kTileRows · kBlockK floats)
// stays in L1 while it meets every column tile of the block.
constexpr int64_t kBlockK = 512;
constexpr int64_t kMaxLanes = 16;
constexpr int64_t kMaxTileRows = 8;
// Tiles ahead whose w is prefetched when w is read in place: w streams from
// memory in runs of one row, which the hardware prefetcher alone follows
// late.
constexpr int64_t kPrefetchTiles = 2;

// Rows of w per call of a kernel for a given k: as many as fit the packed-w
// budget, a multiple of kTileCols.
inline int64_t ColumnsPerCall(int64_t k) {
  const int64_t padded_k = (k + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
  const int64_t cols = kPackedWBudget / padded_k / 4 * 4;
  return cols < 4 ? 4 : cols > kBlockCols ? kBlockCols : cols;
}

// Per-thread scratch of a kernel call, 64-byte aligned.
struct Scratch {
  // kBlockRows · kBlockCols · kMaxLanes floats (see kBlockRows).
  float* acc;
  // One row tile of x over one k block, packed (see Pack):
  // kMaxTileRows · kBlockK floats.
  float* packed_x;
  // The rows of w of the call over all of k, packed tile by tile and k block
  // by k block (see Pack): ColumnsPerCall(k) · k rounded up to kMaxLanes.
  float* packed_w;
};

// Computes y[0:m, j0:j1] of `p`. Requires j1 - j0 <= ColumnsPerCall(p.k).
void GemmColumnsAvx2(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch);
void GemmColumnsAvx512(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch);

// Floats PackAllX may write for m rows of k.
inline int64_t PackedAllXFloats(int64_t m, int64_t k) {
  return m * ((k + kMaxLanes - 1) / kMaxLanes * kMaxLanes);
}
// When the kernel reads w in place (few rows of x: decode), packs all of x
// once to `out` (PackedAllXFloats) and returns true, so that the calls of one
// thread share it instead of each packing x again between its tiles, which
// stalls the stream of w. Returns false (and writes nothing) otherwise.
bool PackAllXAvx2(const Problem& p, float* out);
bool PackAllXAvx512(const Problem& p, float* out);

// Copies rows [0, rows) x columns [0, len) of a matrix with rows `ld` floats
// apart to `packed` as [ceil(len / lanes)][rows][lanes], zero-padded, so that
// a tile reads them as one stream. Rows of x and w are often a multiple of
// 4 KiB apart (hidden sizes are powers of two): read in place, a tile's rows
// would all compete for the same L1 sets.
template <class Isa>
inline void Pack(const float* src, int64_t ld, int rows, int64_t len, float* packed) {
  constexpr int64_t kLanes = Isa::kLanes;
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes) {
    for (int i = 0; i < rows; ++i, packed += kLanes) {
      Isa::Store(packed, Isa::Load(src + i * ld + c));
    }
  }
  if (c < len) {
    for (int i = 0; i < rows; ++i, packed += kLanes) {
      Isa::Store(packed, Isa::LoadTail(src + i * ld + c, len - c));
    }
  }
}

// One register tile over one k block of `len` floats (a multiple of the lanes
// except in the last block).
struct TileArgs {
  const float* x;  // M rows of x over this k block, packed (see Pack)
  const float* w;  // R rows of w over this k block: row r, floats c.. at
  int64_t w_row;   //   w + r · w_row + c / lanes · w_step
  int64_t w_step;
  const float* w_next;  // w of a later tile to prefetch (laid out as w), or null
  int64_t len;          // floats of this k block
  float* acc;  // lanes of output (i, j); (i + a, j + b) at acc + (a · acc_ld + b) · lanes
  int64_t acc_ld;
  bool first;  // start from zero instead of acc
  bool last;   // finish into y instead of acc
  float* y;    // y[i, j]
  int64_t ldy;
  float alpha;
  bool accumulate;
};

template <class Isa, int R, int M>
inline void Tile(const TileArgs& t) {
  using V = typename Isa::V;
  constexpr int kLanes = Isa::kLanes;
  V a[R][M];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < M; ++i) {
      a[r][i] = t.first ? Isa::Zero() : Isa::Load(t.acc + (i * t.acc_ld + r) * kLanes);
    }
  }
  const float* x = t.x;
  const float* w = t.w;
  const float* w_next = t.w_next;
  const int64_t full_steps = t.len / kLanes;
  for (int64_t s = 0; s < full_steps; ++s, x += M * kLanes, w += t.w_step) {
    V xv[M];
    for (int i = 0; i < M; ++i) xv[i] = Isa::Load(x + i * kLanes);
    if (w_next != nullptr) {
      for (int r = 0; r < R; ++r) _mm_prefetch(w_next + r * t.w_row, _MM_HINT_T0);
      w_next += t.w_step;
    }
    for (int r = 0; r < R; ++r) {
      const V wv = Isa::Load(w + r * t.w_row);
      for (int i = 0; i < M; ++i) a[r][i] = Isa::Fma(wv, xv[i], a[r][i]);
    }
  }
  if (const int64_t tail = t.len - full_steps * kLanes; tail > 0) {
    // x is zero-padded; w is masked, as it may be read in place.
    V xv[M];
    for (int i = 0; i < M; ++i) xv[i] = Isa::Load(x + i * kLanes);
    for (int r = 0; r < R; ++r) {
      const V wv = Isa::LoadTail(w + r * t.w_row, tail);
      for (int i = 0; i < M; ++i) a[r][i] = Isa::Fma(wv, xv[i], a[r][i]);
    }
  }
  if (!t.last) {
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < M; ++i) Isa::Store(t.acc + (i * t.acc_ld + r) * kLanes, a[r][i]);
    }
    return;
  }
  for (int i = 0; i < M; ++i) {
    for (int r = 0; r < R; ++r) {
      // One explicit fused multiply-add: left to the compiler, `y + alpha *
      // sum` would be contracted into one in some tile shapes only.
      const float sum = Isa::Sum(a[r][i]);
      float& out = t.y[i * t.ldy + r];
      out = t.accumulate ? __builtin_fmaf(t.alpha, sum, out) : t.alpha * sum;
    }
  }
}

// Tile<Isa, R, rows> for 1 <= rows <= M.
template <class Isa, int R, int M = Isa::kTileRows>
inline void TileOfRows(int rows, const TileArgs& t) {
  if constexpr (M > 1) {
    if (rows < M) return TileOfRows<Isa, R, M - 1>(rows, t);
  }
  Tile<Isa, R, M>(t);
}

// Tile<Isa, cols, rows> for 1 <= cols <= R.
template <class Isa, int R = Isa::kTileCols>
inline void TileOf(int cols, int rows, const TileArgs& t) {
  if constexpr (R > 1) {
    if (cols < R) return TileOf<Isa, R - 1>(cols, rows, t);
  }
  TileOfRows<Isa, R>(rows, t);
}

// With one or two row tiles each element of w is used once or twice:
// reading it in place beats copying it. With more, w is packed once and
// reused by all rows.
template <class Isa>
bool PacksW(int64_t m) {
  return m > 2 * Isa::kTileRows;
}

// Row tile i of x (a multiple of kTileRows) packed over all of k starts at
// out + i · padded k; its k block at c0 then starts c0 · rows floats later.
template <class Isa>
bool PackAllX(const Problem& p, float* out) {
  if (PacksW<Isa>(p.m)) return false;
  const int64_t padded_k = PackedAllXFloats(1, p.k);
  for (int64_t i = 0; i < p.m; i += Isa::kTileRows) {
    const int rows = static_cast<int>(p.m - i < Isa::kTileRows ? p.m - i : Isa::kTileRows);
    Pack<Isa>(p.x + i * p.k, p.k, rows, p.k, out + i * padded_k);
  }
  return true;
}

template <class Isa>
void GemmColumns(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch) {
  constexpr int64_t kLanes = Isa::kLanes;
  constexpr int64_t kRows = Isa::kTileRows;
  constexpr int64_t kCols = Isa::kTileCols;
  static_assert(kLanes <= kMaxLanes && kBlockK % kLanes == 0, "k blocks must hold whole vectors");
  static_assert(kRows <= kMaxTileRows, "a packed row tile must fit Scratch::packed_x");
  static_assert(kBlockCols % kCols == 0 && 4 % kCols == 0, "column blocks must be whole tiles");
  const bool pack_w = PacksW<Isa>(p.m);
  const int64_t cols_total = j1 - j0;
  // Packed w of column tile j in the k block at c0.
  const auto packed_w = [&](int64_t c0, int64_t j, int64_t steps) {
    return scratch.packed_w + c0 * cols_total + (j - j0) * steps * kLanes;
  };
  if (pack_w) {
    for (int64_t c0 = 0; c0 < p.k; c0 += kBlockK) {
      const int64_t len = p.k - c0 < kBlockK ? p.k - c0 : kBlockK;
      const int64_t steps = (len + kLanes - 1) / kLanes;
      for (int64_t j = j0; j < j1; j += kCols) {
        const int cols = static_cast<int>(j1 - j < kCols ? j1 - j : kCols);
        Pack<Isa>(p.w + j * p.k + c0, p.k, cols, len, packed_w(c0, j, steps));
      }
    }
  }
  // With w read in place (few rows of x, all of x packed), a tile runs over
  // all of k at once: each row of w then streams from memory in one run and
  // the accumulators never leave the registers. x (a few rows) stays in L2.
  // Measured on the 2-core VM, m = 8, w 11264 x 2048: 6.2 ms against 7.6 ms
  // in k blocks of kBlockK. The summation order is the same either way.
  const int64_t block_k = p.packed_x != nullptr ? p.k : kBlockK;
  for (int64_t i0 = 0; i0 < p.m; i0 += kBlockRows) {
    const int64_t i1 = p.m - i0 < kBlockRows ? p.m : i0 + kBlockRows;
    for (int64_t c0 = 0; c0 < p.k; c0 += block_k) {
      TileArgs t;
      t.len = p.k - c0 < block_k ? p.k - c0 : block_k;
      const int64_t steps = (t.len + kLanes - 1) / kLanes;
      t.acc_ld = cols_total;
      t.first = c0 == 0;
      t.last = c0 + t.len == p.k;
      t.ldy = p.ldy;
      t.alpha = p.alpha;
      t.accumulate = p.accumulate;
      for (int64_t i = i0; i < i1; i += kRows) {
        const int rows = static_cast<int>(i1 - i < kRows ? i1 - i : kRows);
        if (p.packed_x != nullptr) {
          t.x = p.packed_x + i * PackedAllXFloats(1, p.k) + c0 * rows;
        } else {
          Pack<Isa>(p.x + i * p.k + c0, p.k, rows, t.len, scratch.packed_x);
          t.x = scratch.packed_x;
        }
        for (int64_t j = j0; j < j1; j += kCols) {
          const int cols = static_cast<int>(j1 - j < kCols ? j1 - j : kCols);
          if (pack_w) {
            t.w = packed_w(c0, j, steps);
            t.w_row = kLanes;
            t.w_step = cols * kLanes;
            t.w_next = nullptr;
          } else {
            t.w = p.w + j * p.k + c0;
            t.w_row = p.k;
            t.w_step = kLanes;
            const int64_t j_next = j + kPrefetchTiles * kCols;
            t.w_next = j_next + kCols <= p.n ? p.w + j_next * p.k + c0 : nullptr;
          }
          t.acc = scratch.acc + ((i - i0) * t.acc_ld + (j - j0)) * kLanes;
          t.y = p.y + i * p.ldy + j;
          TileOf<Isa>(cols, rows, t);
        }
      }
    }
  }
}

}  // namespace loraserve::kernels::gemm_internal

#endif  // LORASERVE_KERNELS_CPU_GEMM_KERNEL_H_
