// The CUDA backend's sampler: every row of a logits matrix sampled in one
// launch, as kernels::SampleRow samples a row on the host. A plain entry
// point: raw device pointers, sizes and a stream; it returns the launch's
// error (cudaGetLastError), never aborts.
#ifndef LORASERVE_KERNELS_CUDA_SAMPLING_H_
#define LORASERVE_KERNELS_CUDA_SAMPLING_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace loraserve::kernels::cuda {

// One row's sampling parameters as SampleRows reads them (device memory).
struct DeviceSamplingRow {
  float temperature;   // 0 = greedy
  int32_t top_k;       // 0 = off
  float top_p;         // 1 = off
  int32_t num_top;     // top entries to collect: min(num_top_logprobs, vocab)
  double uniform;      // the row's draw in [0, 1)
  int64_t top_offset;  // first entry of this row in SampleRows' `top`
};

// What SampleRows finds for one row; the host turns it into logprobs.
struct DeviceSampledRow {
  int32_t id;    // the chosen token
  float logit;   // its logit (NaN read as -inf)
  double log_z;  // logsumexp of the row (NaN read as -inf), in double
};

// One of a row's most likely tokens.
struct DeviceTopEntry {
  int32_t id;
  float logit;  // NaN read as -inf
};

// Samples every row of `logits` as kernels::SampleRow does (one block per
// row, one launch): token ids are ranked by a 64-bit key (the order-preserving
// bits of the logit above the inverted id), and the top-k, top-p, draw and
// top-n thresholds are found by building a key bit by bit with block
// reductions (counts, or probability mass in double), so nothing is sorted.
// Each row's num_top entries land in top[top_offset, top_offset + num_top),
// in no particular order. `vocab` must be in [1, 2^31).
cudaError_t SampleRows(const float* logits,  // [rows, vocab]
                       int64_t rows, int64_t vocab,
                       const DeviceSamplingRow* params,  // [rows] device
                       DeviceSampledRow* results,        // [rows] device
                       DeviceTopEntry* top,              // [Σ num_top] device
                       cudaStream_t stream);

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_SAMPLING_H_
