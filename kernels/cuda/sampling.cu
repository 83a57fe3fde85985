// The kernel behind kernels/cuda/sampling.h.
#include <cmath>

#include "kernels/cuda/device_common.cuh"
#include "kernels/cuda/sampling.h"

namespace loraserve::kernels::cuda {
namespace {

constexpr int kSampleThreads = 512;

// The logit as the sampler reads it (kernels/sampling.cc): NaN is -inf.
__device__ __forceinline__ float SamplingLogit(float v) { return isnan(v) ? -INFINITY : v; }

// A strict total order over a row's elements, larger = earlier in the
// sampling order: the logit's bits mapped so that unsigned order is float
// order (-0 folded into +0, as in kernels/sampling.cc), above the id
// inverted so that a lower id of an equal logit ranks higher. Every key is
// above 0 (the lowest logit, -inf, maps to 0x007FFFFF), so 0 can mean "none".
struct SamplingKey {
  int id_bits;      // bits that hold vocab - 1
  int32_t last_id;  // vocab - 1

  __device__ __forceinline__ uint64_t operator()(float v, int64_t id) const {
    uint32_t bits = __float_as_uint(SamplingLogit(v));
    if (bits == 0x80000000u) bits = 0;
    bits = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
    return (static_cast<uint64_t>(bits) << id_bits) | static_cast<uint64_t>(last_id - id);
  }
  __device__ __forceinline__ int32_t Id(uint64_t key) const {
    return last_id - static_cast<int32_t>(key & ((uint64_t{1} << id_bits) - 1));
  }
};

// `op` over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the bitwise same result (the warp partials are combined in one
// fixed order), which keeps the searches below in step across the block.
// `scratch` holds 32 eight-byte values.
template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op, uint64_t* scratch) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "scratch holds 8-byte values");
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  T* partials = reinterpret_cast<T*>(scratch);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) partials[warp] = v;
  __syncthreads();
  T result = partials[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w) result = op(result, partials[w]);
  return result;
}

struct MaxOp {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a > b ? a : b; }
};
struct MinOp {
  __device__ uint64_t operator()(uint64_t a, uint64_t b) const { return a < b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// The sum over the block of each of `v`'s N values, in BlockReduce's order:
// every thread gets the bitwise same results. `scratch` holds kWarp * N.
template <typename T, int N>
__device__ void BlockSumEach(T (&v)[N], T* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      v[j] += __shfl_xor_sync(0xffffffffu, v[j], offset);
    }
  }
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) scratch[warp * N + j] = v[j];
  }
  __syncthreads();
  const int warps = static_cast<int>(blockDim.x) / kWarp;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    T result = scratch[j];
    for (int w = 1; w < warps; ++w) result += scratch[w * N + j];
    v[j] = result;
  }
}

// Bits a search pass decides: a 49-bit key (vocab 128K) takes 13 passes over
// the row rather than 49.
constexpr int kDigitBits = 4;
constexpr int kDigits = 1 << kDigitBits;

// The largest key value t (of `bits` bits) for which pred(S(t)) holds, where
// S(t) sums weight(v) over the row's elements with key >= max(t, lowest) and
// pred(S(t)) is monotone (true up to some t, false above it); 0 when it holds
// for no t > 0. Built from the top digit down (the top digit takes what is
// left of `bits`): one pass sums S for every value of the next digit at once.
// Each thread adds its elements in index order, skipping those below a
// candidate (adding 0), so every S is the sum a bit-by-bit search would form,
// and the result is the same. Every thread calls it together (the sums reduce
// over the block). `scratch` holds kWarp * kDigits values.
template <typename W, typename Weight, typename Pred>
__device__ uint64_t LargestKeyWhere(const float* __restrict__ x, int64_t vocab, SamplingKey key,
                                    int bits, uint64_t lowest, Weight weight, Pred pred,
                                    W* scratch) {
  uint64_t t = 0;
  for (int shift = bits; shift > 0;) {
    const int width = shift % kDigitBits == 0 ? kDigitBits : shift % kDigitBits;
    shift -= width;
    // Candidates are t's bits above this digit, then digit d, then zeros.
    const uint64_t prefix = t >> (shift + width);
    W sums[kDigits];
#pragma unroll
    for (int d = 0; d < kDigits; ++d) sums[d] = W{0};
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = x[i];
      const uint64_t k = key(v, i);
      const uint64_t high = k >> (shift + width);
      if (k < lowest || high < prefix) continue;  // below every candidate
      // An element above the prefix is at or above every candidate.
      const int digit =
          high > prefix ? kDigits - 1 : static_cast<int>((k >> shift) & ((1u << width) - 1));
      const W w = weight(v);
#pragma unroll
      for (int d = 0; d < kDigits; ++d) sums[d] += d <= digit ? w : W{0};
    }
    BlockSumEach(sums, scratch);
    // The largest digit where pred holds; 0 keeps t (pred holds there, or t
    // is 0). Unrolled, so that `sums` stays in registers.
    int chosen = 0;
#pragma unroll
    for (int d = kDigits - 1; d > 0; --d) {
      if (chosen == 0 && d < (1 << width) && pred(sums[d])) chosen = d;
    }
    t |= static_cast<uint64_t>(chosen) << shift;
  }
  return t;
}

// The key of the row's k-th element in sampling order (1 <= k <= vocab):
// the largest t with at least k keys >= t (keys are distinct).
__device__ uint64_t KthKey(const float* __restrict__ x, int64_t vocab, SamplingKey key, int bits,
                           int32_t k, uint64_t* scratch) {
  return LargestKeyWhere(
      x, vocab, key, bits, /*lowest=*/0, [](float) { return int32_t{1}; },
      [&](int32_t count) { return count >= k; }, reinterpret_cast<int32_t*>(scratch));
}

// One block per row; see SampleRows. Greedy rows skip the searches.
__global__ void __launch_bounds__(kSampleThreads)
    SampleKernel(const float* __restrict__ logits, int64_t vocab, SamplingKey key, int bits,
                 const DeviceSamplingRow* __restrict__ params, DeviceSampledRow* results,
                 DeviceTopEntry* top) {
  __shared__ uint64_t scratch[kWarp * kDigits];
  __shared__ int32_t top_count;
  const int64_t row = blockIdx.x;
  const float* __restrict__ x = logits + row * vocab;
  const DeviceSamplingRow p = params[row];

  // The first maximum, and log_softmax's normaliser around it.
  uint64_t best = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) best = MaxOp{}(best, key(x[i], i));
  best = BlockReduce(best, MaxOp{}, scratch);
  const int32_t best_id = key.Id(best);
  const float max_logit = SamplingLogit(x[best_id]);
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    sum += exp(static_cast<double>(SamplingLogit(x[i])) - max_logit);
  }
  const double log_z = max_logit + log(BlockReduce(sum, SumOp{}, scratch));

  int32_t chosen = best_id;
  if (p.temperature != 0.0f && p.top_k != 1) {
    // Kept elements are those with key >= floor (0 keeps all).
    uint64_t floor = 0;
    if (p.top_k > 0 && p.top_k < vocab) floor = KthKey(x, vocab, key, bits, p.top_k, scratch);
    const double inv_t = 1.0 / static_cast<double>(p.temperature);
    const double max_scaled = __dmul_rn(max_logit, inv_t);
    // exp(logit / T - max / T) rounded step by step as the reference does
    // (no fused multiply-add; exp itself may differ from glibc's in the last
    // bit, which moves a draw only when it falls that close to a boundary).
    const auto prob = [&](float v) {
      return exp(__dsub_rn(__dmul_rn(SamplingLogit(v), inv_t), max_scaled));
    };
    // Probability mass of the kept elements (key >= floor).
    const auto kept_mass = [&] {
      double m = 0.0;
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (key(v, i) >= floor) m += prob(v);
      }
      return BlockReduce(m, SumOp{}, scratch);
    };
    auto* mass_scratch = reinterpret_cast<double*>(scratch);
    double total = kept_mass();
    if (p.top_p < 1.0f) {
      // The smallest prefix whose normalised mass (each term divided by the
      // total, as the reference sums it) reaches top_p ends at the largest
      // key whose prefix mass does; none (rounding) keeps all.
      const double top_p = p.top_p;
      const double norm = total;
      const uint64_t t = LargestKeyWhere(
          x, vocab, key, bits, floor, [&](float v) { return prob(v) / norm; },
          [&](double mass) { return mass >= top_p; }, mass_scratch);
      if (t > floor) floor = t;
      total = kept_mass();
    }
    // The draw: the first element whose prefix mass exceeds u * total, i.e.
    // the largest key whose prefix mass does; the last kept one if rounding
    // leaves none (or the row's mass is NaN).
    const double target = p.uniform * total;
    uint64_t t = LargestKeyWhere(
        x, vocab, key, bits, floor, prob, [&](double mass) { return mass > target; }, mass_scratch);
    if (t == 0) {
      uint64_t lowest = ~uint64_t{0};
      for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        const uint64_t k = key(x[i], i);
        if (k >= floor) lowest = MinOp{}(lowest, k);
      }
      t = BlockReduce(lowest, MinOp{}, scratch);
    }
    chosen = key.Id(t);
  }

  if (p.num_top > 0) {
    const uint64_t t = p.num_top < vocab ? KthKey(x, vocab, key, bits, p.num_top, scratch) : 0;
    if (threadIdx.x == 0) top_count = 0;
    __syncthreads();
    DeviceTopEntry* out = top + p.top_offset;
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float v = x[i];
      if (key(v, i) >= t) {
        const int32_t slot = atomicAdd(&top_count, 1);
        if (slot < p.num_top) out[slot] = {static_cast<int32_t>(i), SamplingLogit(v)};
      }
    }
  }
  if (threadIdx.x == 0) results[row] = {chosen, SamplingLogit(x[chosen]), log_z};
}

}  // namespace

cudaError_t SampleRows(const float* logits, int64_t rows, int64_t vocab,
                       const DeviceSamplingRow* params, DeviceSampledRow* results,
                       DeviceTopEntry* top, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (vocab < 1 || vocab > INT32_MAX || rows > INT32_MAX) return cudaErrorInvalidValue;
  SamplingKey key{0, static_cast<int32_t>(vocab - 1)};
  while ((int64_t{1} << key.id_bits) < vocab) ++key.id_bits;
  SampleKernel<<<static_cast<unsigned>(rows), kSampleThreads, 0, stream>>>(
      logits, vocab, key, 32 + key.id_bits, params, results, top);
  return cudaGetLastError();
}

}  // namespace loraserve::kernels::cuda
