// The paged KV cache: per layer, one K pool and one V pool of fixed-size
// blocks ([num_blocks, block_size, kv_heads, head_dim] elements of the
// backend's KvCacheDType),
// and a free list of block ids shared by all layers.
//
// A sequence owns a list of blocks (its block table); block b of the table
// holds its positions [b * block_size, (b + 1) * block_size). Blocks come from
// the pool as a sequence grows and go back when it finishes or is preempted.
//
// Prefix caching (optional): a full block's contents are identified by a
// chain hash of (adapter key, the previous block's hash, the block's
// tokens). The adapter key is the adapter's content hash and scale, never its
// name, so a replaced adapter never reuses stale KV. Blocks are refcounted; a
// released block with a hash stays cached (and matchable) until the pool
// needs it, least recently released first.
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
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
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
  // Drops this holder's reference to every block of `blocks` and clears it.
  void Release(std::vector<int32_t>& blocks);

  // Prefix caching. Hashes of the full blocks of `tokens` under `adapter_key`.
  std::vector<uint64_t> BlockHashes(const std::string& adapter_key,
                                    const std::vector<int32_t>& tokens) const;
  // The longest run of cached blocks matching `hashes` from the start, each
  // with a reference taken for the caller (who appends them to its table).
  std::vector<int32_t> MatchPrefix(const std::vector<uint64_t>& hashes);
  // Records that blocks[i] holds the contents hashed by hashes[i].
  void Register(const std::vector<int32_t>& blocks, const std::vector<uint64_t>& hashes);
  int64_t prefix_hits() const { return prefix_hits_; }  // blocks reused

  int32_t BlocksFor(int64_t tokens) const {
    return static_cast<int32_t>((tokens + block_size_ - 1) / block_size_);
  }
  int32_t block_size() const { return layout_.block_size; }
  int32_t num_blocks() const { return layout_.num_blocks; }
  // Blocks no request holds (cached prefix blocks included: they are reusable).
  int32_t free_blocks() const {
    return static_cast<int32_t>(free_.size() + cached_free_.size());
  }
  int64_t bytes() const { return bytes_; }
  model::KvCacheView View();

 private:
  KvCache() = default;
  kernels::KvLayout layout_;
  int32_t block_size_ = 0;
  int64_t bytes_ = 0;
  std::vector<kernels::DeviceBuffer> k_pools_;  // one per layer
  std::vector<kernels::DeviceBuffer> v_pools_;
  std::vector<int32_t> free_;  // stack of free block ids, no contents
  // Takes a block for a new holder: a free one, else the least recently
  // released cached block (forgetting its contents).
  int32_t TakeBlock();

  std::vector<int32_t> refs_;                     // per block: holders
  std::vector<uint64_t> block_hash_;              // per block: contents (0 = none)
  std::unordered_map<uint64_t, int32_t> cached_;  // hash -> block
  std::list<int32_t> cached_free_;                // unheld cached blocks, oldest first
  std::vector<std::list<int32_t>::iterator> lru_position_;  // per block, valid when in cached_free_
  int64_t prefix_hits_ = 0;
};

}  // namespace loraserve::engine

#endif  // LORASERVE_SERVER_ENGINE_KV_CACHE_H_
