// The paged KV cache: per layer, one K pool and one V pool of fixed-size
// blocks ([num_blocks, block_size, kv_heads, head_dim] floats on the backend),
// and a free list of block ids shared by all layers.
//
// A sequence owns a list of blocks (its block table); block b of the table
// holds its positions [b * block_size, (b + 1) * block_size). Blocks come from
// the pool as a sequence grows and go back when it finishes or is preempted.
//
// Ownership and threading: the KvCache owns the device memory; it is used by
// the engine loop thread only. The backend must outlive it.
//
// Example:
//   ASSIGN_OR_RETURN(auto cache, KvCache::Create(backend, shape, 1 << 30));
//   std::vector<int32_t> blocks;
//   RETURN_IF_ERROR(cache->Reserve(blocks, /*tokens=*/37));
//   cache->Release(blocks);
#ifndef LORASERVE_SERVER_ENGINE_KV_CACHE_H_
#define LORASERVE_SERVER_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"

namespace loraserve::engine {

class KvCache {
 public:
  // Allocates as many blocks of `block_size` tokens as fit in `budget_bytes`
  // (ResourceExhausted when not even one block fits).
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(kernels::Backend* backend,
                                                         const model::KvShape& shape,
                                                         int32_t block_size,
                                                         int64_t budget_bytes);

  // Grows `blocks` so that it covers `tokens` positions. ResourceExhausted
  // (and `blocks` unchanged) when the pool has too few free blocks.
  absl::Status Reserve(std::vector<int32_t>& blocks, int64_t tokens);
  // Returns every block of `blocks` to the pool and clears it.
  void Release(std::vector<int32_t>& blocks);

  int32_t BlocksFor(int64_t tokens) const {
    return static_cast<int32_t>((tokens + block_size_ - 1) / block_size_);
  }
  int32_t block_size() const { return layout_.block_size; }
  int32_t num_blocks() const { return layout_.num_blocks; }
  int32_t free_blocks() const { return static_cast<int32_t>(free_.size()); }
  int64_t bytes() const { return bytes_; }
  model::KvCacheView View();

 private:
  KvCache() = default;
  kernels::KvLayout layout_;
  int32_t block_size_ = 0;
  int64_t bytes_ = 0;
  std::vector<kernels::DeviceBuffer> k_pools_;  // one per layer
  std::vector<kernels::DeviceBuffer> v_pools_;
  std::vector<int32_t> free_;  // stack of free block ids
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_KV_CACHE_H_
