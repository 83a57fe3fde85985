// The CPU backend's matrix multiply: y = alpha · x · wᵀ (+ y), batch-invariant.
//
// Every output y[i, j] is summed in one fixed order that depends only on k and
// on the instruction set: lane-wise FMAs of x[i, :] and w[j, :] over k in
// increasing order (a masked step for the tail), then a fixed tree across the
// lanes, then alpha, then the old y. So a row of y never depends on m, on the
// other rows of x, on the thread count or on how the work is split: a
// request's logits are the same alone or in any batch. Tile shapes, cache
// blocking and threading only change which outputs are computed together,
// never the order of one output's sum (partial sums cross cache blocks as
// whole vectors, never reduced early).
//
// Two instruction sets, picked once at run time: AVX-512 where the CPU has it,
// AVX2/FMA otherwise. They sum in different orders (16 lanes against 8), so
// results are batch-invariant per machine, not across machines.
//
// w may be stored as F32, BF16, F16 or kQ8 (kernels/backend.h): its values
// are widened to float32 exactly as they are read, so the product is the
// float32 product over the widened weights, summed in the same order, and a
// narrower dtype only reads fewer bytes. x, y and the sums stay float32.
// The one exception is kQ8 on kAvx512Vnni, which also rounds x to int8 (in
// groups of 128 along k, as the weights; llama.cpp's q8_0 product rounds x
// in groups of 32): four times the multiply-adds an instruction, which is
// what lets a batch of decode steps over int8 weights keep up with memory.
//
// Example:
//   const GemmIsa isa = BestGemmIsa();
//   MatMulTransposed(isa, pool, x, w, DType::kBF16, m, n, k, 1.0f, false, y, n);
#ifndef LORASERVE_KERNELS_CPU_GEMM_H_
#define LORASERVE_KERNELS_CPU_GEMM_H_

#include <cstdint>

#include "kernels/backend.h"
#include "kernels/cpu/thread_pool.h"

namespace loraserve::kernels {

// kAvx512Vnni is kAvx512 for float weights; kQ8 weights then run int8 x
// int8 products with vpdpbusd over activations quantized per row in groups
// of 128 (gemm_q8_vnni.cc) instead of float32 FMAs over dequantized weights.
enum class GemmIsa { kAvx2, kAvx512, kAvx512Vnni };

// The widest instruction set this CPU runs.
GemmIsa BestGemmIsa();
const char* GemmIsaName(GemmIsa isa);

// y[m, 0:n] = alpha · x[m, k] · w[n, k]ᵀ (+ y when accumulate), rows of x k
// floats apart, rows of w WeightRowBytes(w_dtype, k) bytes apart, rows of y
// ldy floats apart; threaded over `pool`. `isa` must be one this CPU runs
// (BestGemmIsa() or kAvx2).
void MatMulTransposed(GemmIsa isa, ThreadPool& pool, const float* x, const void* w, DType w_dtype,
                      int64_t m, int64_t n, int64_t k, float alpha, bool accumulate, float* y,
                      int64_t ldy);

// The same product on the calling thread alone (same summation order), for
// callers that spread many small products over the pool themselves.
void MatMulTransposedSerial(GemmIsa isa, const float* x, const void* w, DType w_dtype, int64_t m,
                            int64_t n, int64_t k, float alpha, bool accumulate, float* y,
                            int64_t ldy);

}  // namespace loraserve::kernels

#endif  // LORASERVE_KERNELS_CPU_GEMM_H_
