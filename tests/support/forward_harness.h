// Runs LlamaModel::Forward directly in tests: a paged KV cache laid out on
// non-adjacent blocks (reversed order, to exercise the block tables) and a
// one-step prefill of whole sequences with logits for every token.
//
// Example:
//   PagedTestCache cache(backend, model->kv_shape(), /*num_seqs=*/2, /*max_tokens=*/40);
//   ForwardInput in = PrefillAll({prompt_a, prompt_b}, cache);
//   in.adapters = {{adapter, 1.0f}, {}};
//   RETURN_IF_ERROR(model->Forward(in, cache.view(), &logits));
#ifndef LORASERVE_TESTS_SUPPORT_FORWARD_HARNESS_H_
#define LORASERVE_TESTS_SUPPORT_FORWARD_HARNESS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/device_adapter.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"

namespace loraserve::test_support {

inline constexpr int32_t kTestBlockSize = 16;

class PagedTestCache {
 public:
  // Blocks for `max_tokens` tokens for each of `num_seqs` sequences.
  PagedTestCache(kernels::Backend* backend, const model::KvShape& shape, int32_t num_seqs,
                 int32_t max_tokens);
  // The block holding positions [i * 16, (i + 1) * 16) of sequence `seq`.
  int32_t Block(int32_t seq, int32_t i) const {
    return view_.layout.num_blocks - 1 - (seq * blocks_per_seq_ + i);
  }
  int32_t blocks_per_seq() const { return blocks_per_seq_; }
  const model::KvCacheView& view() const { return view_; }

 private:
  int32_t blocks_per_seq_;
  std::vector<kernels::DeviceBuffer> buffers_;
  model::KvCacheView view_;
};

// Prefill of whole sequences in one batch, logits for every token.
model::ForwardInput PrefillAll(const std::vector<std::vector<int32_t>>& seqs,
                               const PagedTestCache& cache);

// A decode step: sequence s appends next_tokens[s] at positions[s] (its
// positions before are cached), with logits for every sequence.
model::ForwardInput DecodeOne(const std::vector<int32_t>& next_tokens,
                              const std::vector<int32_t>& positions, const PagedTestCache& cache);

// The shared tiny model (aidreams-260k) and some of its shared adapters, all
// on one backend.
struct SharedModel {
  std::unique_ptr<model::LlamaModel> model;
  std::vector<std::unique_ptr<adapters::DeviceAdapter>> adapters;  // in the order asked for
};

// Names of the shared model's adapter cases, in the order of the goldens.
absl::StatusOr<std::vector<std::string>> SharedAdapterNames();

// Loads the shared model on `backend` with the adapters `adapter_names`
// (adapter cases of the goldens) uploaded to it.
absl::StatusOr<SharedModel> LoadSharedModel(kernels::Backend* backend,
                                            const std::vector<std::string>& adapter_names);

// Largest |a[i] - b[i]|; NaN anywhere gives NaN (which fails any <= check).
float MaxAbsDiff(const float* a, const float* b, size_t n);

}  // namespace loraserve::test_support

#endif  // LORASERVE_TESTS_SUPPORT_FORWARD_HARNESS_H_
