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
//   kDecodeTileCols           rows of w of the tile over one or two rows of
//                             x read in place (2 · kDecodeTileCols + 3 fit)
//   Zero(), Load(p), LoadTail(p, count) (lanes >= count read as 0),
//   Store(p, v), Fma(a, b, c) = a · b + c, Mul(a, b), Set1(f),
//   Sum(v) (a fixed tree over lanes), and kLanes elements widened to floats
//   exactly: LoadBf16(p), LoadF16(p), LoadQ8(p) (kQ8 bytes q + 128 to
//   float(q)), each with a Tail(p, count) form as LoadTail.
// Traits types live in an unnamed namespace, so every template here is
// instantiated with internal linkage: no AVX-512 code can leak into the AVX2
// translation unit through the linker.
//
// Weights of every storage dtype are widened to float32 as they are read
// (in registers when the kernel reads w in place, into the packed copy
// otherwise), and every product is then the float32 one over the widened
// values in the same order: a narrower dtype changes what is read from
// memory, never how an output is summed.
#ifndef LORASERVE_KERNELS_CPU_GEMM_KERNEL_H_
#define LORASERVE_KERNELS_CPU_GEMM_KERNEL_H_

#include <xmmintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/quantization.h"

namespace loraserve::kernels::gemm_internal {

// The whole product: y[m, 0:n] = alpha · x[m, k] · w[n, k]ᵀ (+ y).
struct Problem {
  const float* x;
  const void* w;  // rows of w_dtype, WeightRowBytes(w_dtype, k) bytes apart
  DType w_dtype;
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
// Products smaller than this many multiply-adds run on the calling thread:
// waking the pool costs more than it saves.
constexpr int64_t kParallelMinMacs = int64_t{1} << 17;
// The decode tiles (one or two rows of x, kDecodeTileCols rows of w) are
// short, so they prefetch further ahead (this many tiles), into L2 rather
// than L1, which the lines would leave before their turn: side by side on
// the 2-core VM, w 11264 x 2048 read from memory at one row of x, bf16
// 14.6 ms against 16.4 ms as the other tiles prefetch, float32 26.2 against
// 31.3. (The other tiles lose with it: at 8 rows, 52.7 ms against 45.4.)
constexpr int64_t kDecodePrefetchTiles = 4;

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
// (The row bytes of w are WeightRowBytes(p.w_dtype, p.k).)
void GemmColumnsAvx2(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch);
void GemmColumnsAvx512(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch);

// The whole product `p` for kQ8 weights on AVX-512 VNNI (gemm_q8_vnni.cc),
// threaded over `pool`, or on the calling thread when it is null.
void MatMulQ8Vnni(const Problem& p, ThreadPool* pool);

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

// Copies rows [0, rows) x columns [0, len) of a float matrix with rows `ld`
// floats apart to `packed` as [ceil(len / lanes)][rows][lanes], zero-padded,
// so that a tile reads them as one stream. Rows of x and w are often a
// multiple of 4 KiB apart (hidden sizes are powers of two): read in place, a
// tile's rows would all compete for the same L1 sets.
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

// Readers of one weight storage dtype: the columns [c, c + lanes) of a row as
// floats (Load), the columns [c, c + count) with the rest 0 (LoadTail), and
// the address of column c, to prefetch (At). kElementBytes is what one column
// takes in the row's stream.
//
// A dtype of plain elements T, widened by Isa's `load` and `load_tail`.
template <class Isa, typename T, typename Isa::V (*load)(const T*),
          typename Isa::V (*load_tail)(const T*, int64_t)>
struct ElementReader {
  static constexpr int64_t kElementBytes = sizeof(T);
  explicit ElementReader(int64_t k) {}
  typename Isa::V Load(const char* row, int64_t c) const {
    return load(reinterpret_cast<const T*>(row) + c);
  }
  typename Isa::V LoadTail(const char* row, int64_t c, int64_t count) const {
    return load_tail(reinterpret_cast<const T*>(row) + c, count);
  }
  const char* At(const char* row, int64_t c) const { return row + c * kElementBytes; }
};

template <class Isa>
using F32Reader = ElementReader<Isa, float, &Isa::Load, &Isa::LoadTail>;
template <class Isa>
using Bf16Reader = ElementReader<Isa, uint16_t, &Isa::LoadBf16, &Isa::LoadBf16Tail>;
template <class Isa>
using F16Reader = ElementReader<Isa, uint16_t, &Isa::LoadF16, &Isa::LoadF16Tail>;

// kQ8: float(q) · scale of the column's group, the dequantized weight
// exactly. A vector never straddles two groups (kQ8GroupSize is a multiple
// of the lanes, and vectors start at multiples of the lanes).
template <class Isa>
struct Q8Reader {
  static_assert(kQ8GroupSize % Isa::kLanes == 0, "a vector must lie within one group");
  static constexpr int64_t kElementBytes = 1;
  explicit Q8Reader(int64_t k) : scales_offset(Q8RowLayout::For(k).scales_offset) {}
  float Scale(const char* row, int64_t c) const {
    float scale;
    std::memcpy(&scale, row + scales_offset + c / kQ8GroupSize * int64_t{sizeof(float)},
                sizeof(scale));
    return scale;
  }
  typename Isa::V Load(const char* row, int64_t c) const {
    return Isa::Mul(Isa::LoadQ8(reinterpret_cast<const uint8_t*>(row) + c),
                    Isa::Set1(Scale(row, c)));
  }
  typename Isa::V LoadTail(const char* row, int64_t c, int64_t count) const {
    return Isa::Mul(Isa::LoadQ8Tail(reinterpret_cast<const uint8_t*>(row) + c, count),
                    Isa::Set1(Scale(row, c)));
  }
  const char* At(const char* row, int64_t c) const { return row + c; }
  int64_t scales_offset;
};

// Rows [0, rows) x columns [c0, c0 + len) of w (rows `row_bytes` apart, read
// by `reader`) widened to floats in `packed`, laid out as Pack lays them.
template <class Isa, class Reader>
inline void PackW(const Reader& reader, const char* w, int64_t row_bytes, int rows, int64_t c0,
                  int64_t len, float* packed) {
  constexpr int64_t kLanes = Isa::kLanes;
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes) {
    for (int i = 0; i < rows; ++i, packed += kLanes) {
      Isa::Store(packed, reader.Load(w + i * row_bytes, c0 + c));
    }
  }
  if (c < len) {
    for (int i = 0; i < rows; ++i, packed += kLanes) {
      Isa::Store(packed, reader.LoadTail(w + i * row_bytes, c0 + c, len - c));
    }
  }
}

// The w of one register tile over one k block, packed (PackW): vector s of
// row r at w + (s · rows + r) · lanes, zero-padded.
template <class Isa>
struct PackedTileW {
  const float* w;
  int64_t step;  // rows · lanes
  typename Isa::V Load(int r, int64_t s) const { return Isa::Load(w + s * step + r * Isa::kLanes); }
  typename Isa::V LoadTail(int r, int64_t s, int64_t count) const { return Load(r, s); }
  void Prefetch(int r, int64_t s) const {}
};

// The w of one register tile over one k block, read in place: vector s of row
// r covers columns c0 + s · lanes.. of the row at w + r · row_bytes. `next`
// (laid out as w, or null) is the w of a later tile, prefetched as this one
// runs: w streams from memory in runs of one row, which the hardware
// prefetcher alone follows late.
template <class Isa, class Reader, int kHint = _MM_HINT_T0>
struct InPlaceTileW {
  const Reader* reader;
  const char* w;
  int64_t row_bytes;
  int64_t c0;
  const char* next;
  // Steps of s per cache line of a row: one prefetch each.
  static constexpr int64_t kStepsPerLine = 64 / (Isa::kLanes * Reader::kElementBytes) > 0
                                               ? 64 / (Isa::kLanes * Reader::kElementBytes)
                                               : 1;

  typename Isa::V Load(int r, int64_t s) const {
    return reader->Load(w + r * row_bytes, c0 + s * Isa::kLanes);
  }
  typename Isa::V LoadTail(int r, int64_t s, int64_t count) const {
    return reader->LoadTail(w + r * row_bytes, c0 + s * Isa::kLanes, count);
  }
  void Prefetch(int r, int64_t s) const {
    if (next != nullptr && s % kStepsPerLine == 0) {
      _mm_prefetch(reader->At(next + r * row_bytes, c0 + s * Isa::kLanes),
                   static_cast<_mm_hint>(kHint));
    }
  }
};

// One register tile over one k block of `len` floats (a multiple of the lanes
// except in the last block); its w comes separately (PackedTileW or
// InPlaceTileW).
struct TileArgs {
  const float* x;  // M rows of x over this k block, packed (see Pack)
  int64_t len;     // floats of this k block
  float* acc;  // lanes of output (i, j); (i + a, j + b) at acc + (a · acc_ld + b) · lanes
  int64_t acc_ld;
  bool first;  // start from zero instead of acc
  bool last;   // finish into y instead of acc
  float* y;    // y[i, j]
  int64_t ldy;
  float alpha;
  bool accumulate;
};

template <class Isa, int R, int M, class W>
inline void Tile(const TileArgs& t, const W& w) {
  using V = typename Isa::V;
  constexpr int kLanes = Isa::kLanes;
  V a[R][M];
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < M; ++i) {
      a[r][i] = t.first ? Isa::Zero() : Isa::Load(t.acc + (i * t.acc_ld + r) * kLanes);
    }
  }
  const float* x = t.x;
  const int64_t full_steps = t.len / kLanes;
  for (int64_t s = 0; s < full_steps; ++s, x += M * kLanes) {
    V xv[M];
    for (int i = 0; i < M; ++i) xv[i] = Isa::Load(x + i * kLanes);
    for (int r = 0; r < R; ++r) w.Prefetch(r, s);
    for (int r = 0; r < R; ++r) {
      const V wv = w.Load(r, s);
      for (int i = 0; i < M; ++i) a[r][i] = Isa::Fma(wv, xv[i], a[r][i]);
    }
  }
  if (const int64_t tail = t.len - full_steps * kLanes; tail > 0) {
    // x is zero-padded; w is masked, as it may be read in place.
    V xv[M];
    for (int i = 0; i < M; ++i) xv[i] = Isa::Load(x + i * kLanes);
    for (int r = 0; r < R; ++r) {
      const V wv = w.LoadTail(r, full_steps, tail);
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
template <class Isa, int R, int M = Isa::kTileRows, class W>
inline void TileOfRows(int rows, const TileArgs& t, const W& w) {
  if constexpr (M > 1) {
    if (rows < M) return TileOfRows<Isa, R, M - 1>(rows, t, w);
  }
  Tile<Isa, R, M>(t, w);
}

// Tile<Isa, cols, rows> for 1 <= cols <= R and 1 <= rows <= M.
template <class Isa, int R = Isa::kTileCols, int M = Isa::kTileRows, class W>
inline void TileOf(int cols, int rows, const TileArgs& t, const W& w) {
  if constexpr (R > 1) {
    if (cols < R) return TileOf<Isa, R - 1, M>(cols, rows, t, w);
  }
  TileOfRows<Isa, R, M>(rows, t, w);
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

template <class Isa, class Reader>
void GemmColumns(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch) {
  constexpr int64_t kLanes = Isa::kLanes;
  constexpr int64_t kRows = Isa::kTileRows;
  constexpr int64_t kCols = Isa::kTileCols;
  static_assert(kLanes <= kMaxLanes && kBlockK % kLanes == 0, "k blocks must hold whole vectors");
  static_assert(kRows <= kMaxTileRows, "a packed row tile must fit Scratch::packed_x");
  static_assert(kBlockCols % kCols == 0 && 4 % kCols == 0, "column blocks must be whole tiles");
  const bool pack_w = PacksW<Isa>(p.m);
  const int64_t cols_total = j1 - j0;
  const Reader reader(p.k);
  const int64_t row_bytes = WeightRowBytes(p.w_dtype, p.k);
  const char* w_rows = static_cast<const char*>(p.w);
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
        PackW<Isa>(reader, w_rows + j * row_bytes, row_bytes, cols, c0, len,
                   packed_w(c0, j, steps));
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
        if (pack_w) {
          for (int64_t j = j0; j < j1; j += kCols) {
            const int cols = static_cast<int>(j1 - j < kCols ? j1 - j : kCols);
            t.acc = scratch.acc + ((i - i0) * t.acc_ld + (j - j0)) * kLanes;
            t.y = p.y + i * p.ldy + j;
            TileOf<Isa>(cols, rows, t, PackedTileW<Isa>{packed_w(c0, j, steps), cols * kLanes});
          }
          continue;
        }
        // In place, tiles of `tile_cols` rows of w (a compile-time constant)
        // over at most `max_rows` rows of x; whole k, so no partial sums.
        // It prefetches w `ahead` tiles ahead with `hint`.
        const auto in_place = [&](auto tile_cols, auto max_rows, int64_t ahead, auto hint) {
          constexpr int64_t kTile = decltype(tile_cols)::value;
          for (int64_t j = j0; j < j1; j += kTile) {
            const int cols = static_cast<int>(j1 - j < kTile ? j1 - j : kTile);
            t.y = p.y + i * p.ldy + j;
            const int64_t j_next = j + ahead * kTile;
            const char* next = j_next + kTile <= p.n ? w_rows + j_next * row_bytes : nullptr;
            TileOf<Isa, kTile, decltype(max_rows)::value>(
                cols, rows, t,
                InPlaceTileW<Isa, Reader, decltype(hint)::value>{&reader, w_rows + j * row_bytes,
                                                                 row_bytes, c0, next});
          }
        };
        // One or two rows of x (a decode step of one or two requests) run
        // wider tiles: more rows of w stream at once, and more independent
        // sums hide the FMA latency that a short tile waits on.
        if (rows <= 2) {
          in_place(std::integral_constant<int64_t, Isa::kDecodeTileCols>(),
                   std::integral_constant<int, 2>(), kDecodePrefetchTiles,
                   std::integral_constant<int, _MM_HINT_T1>());
        } else {
          in_place(std::integral_constant<int64_t, kCols>(), std::integral_constant<int, kRows>(),
                   kPrefetchTiles, std::integral_constant<int, _MM_HINT_T0>());
        }
      }
    }
  }
}

// GemmColumns for the reader of p.w_dtype.
template <class Isa>
void GemmColumnsOfDType(const Problem& p, int64_t j0, int64_t j1, const Scratch& scratch) {
  switch (p.w_dtype) {
    case DType::kF32:
      return GemmColumns<Isa, F32Reader<Isa>>(p, j0, j1, scratch);
    case DType::kBF16:
      return GemmColumns<Isa, Bf16Reader<Isa>>(p, j0, j1, scratch);
    case DType::kF16:
      return GemmColumns<Isa, F16Reader<Isa>>(p, j0, j1, scratch);
    case DType::kQ8:
      return GemmColumns<Isa, Q8Reader<Isa>>(p, j0, j1, scratch);
  }
}

}  // namespace loraserve::kernels::gemm_internal

#endif  // LORASERVE_KERNELS_CPU_GEMM_KERNEL_H_
