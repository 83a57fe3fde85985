#include "server/engine/kv_cache.h"

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace loraserve::engine {

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(kernels::Backend* backend,
                                                         const model::KvShape& shape,
                                                         int32_t block_size,
                                                         int64_t budget_bytes) {
  if (block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV block size must be > 0, got ", block_size));
  }
  // One block of one layer's pool, then K and V of every layer.
  kernels::KvLayout layout{1, block_size, static_cast<int32_t>(shape.num_kv_heads),
                           static_cast<int32_t>(shape.head_dim), backend->KvCacheDType()};
  const int64_t block_bytes = int64_t{2} * shape.num_layers * kernels::KvPoolBytes(layout);
  const int64_t num_blocks = budget_bytes / block_bytes;
  if (num_blocks < 1) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "KV cache budget of ", budget_bytes, " bytes holds no block of ", block_size,
        " tokens (", block_bytes, " bytes each); raise --kv-cache-bytes"));
  }
  auto cache = std::unique_ptr<KvCache>(new KvCache());
  cache->block_size_ = block_size;
  layout.num_blocks = static_cast<int32_t>(num_blocks);
  cache->layout_ = layout;
  const auto pool_bytes = static_cast<size_t>(kernels::KvPoolBytes(layout));
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    ASSIGN_OR_RETURN(kernels::DeviceBuffer k, backend->Allocate(pool_bytes));
    ASSIGN_OR_RETURN(kernels::DeviceBuffer v, backend->Allocate(pool_bytes));
    cache->k_pools_.push_back(std::move(k));
    cache->v_pools_.push_back(std::move(v));
  }
  cache->bytes_ = block_bytes * num_blocks;
  cache->refs_.assign(num_blocks, 0);
  cache->block_hash_.assign(num_blocks, 0);
  cache->lru_position_.resize(num_blocks);
  cache->free_.reserve(num_blocks);
  // Lowest ids on top of the stack: allocation order is easy to follow in tests.
  for (int64_t b = num_blocks - 1; b >= 0; --b) cache->free_.push_back(static_cast<int32_t>(b));
  return cache;
}

int32_t KvCache::TakeBlock() {
  int32_t block;
  if (!free_.empty()) {
    block = free_.back();
    free_.pop_back();
  } else {
    block = cached_free_.front();
    cached_free_.pop_front();
    cached_.erase(block_hash_[block]);
    block_hash_[block] = 0;
  }
  refs_[block] = 1;
  return block;
}

absl::Status KvCache::Reserve(std::vector<int32_t>& blocks, int64_t tokens) {
  const int32_t needed = BlocksFor(tokens) - static_cast<int32_t>(blocks.size());
  if (needed <= 0) return absl::OkStatus();
  if (needed > free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache: ", needed, " blocks needed, ",
                                                     free_blocks(), " free of ", num_blocks()));
  }
  for (int32_t i = 0; i < needed; ++i) blocks.push_back(TakeBlock());
  return absl::OkStatus();
}

void KvCache::Release(std::vector<int32_t>& blocks) {
  // Later blocks first: a sequence's tail is the least likely to be shared,
  // so it is the first to be reused.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    const int32_t block = *it;
    if (--refs_[block] > 0) continue;
    if (block_hash_[block] != 0) {
      cached_free_.push_back(block);
      lru_position_[block] = std::prev(cached_free_.end());
    } else {
      free_.push_back(block);
    }
  }
  blocks.clear();
}

std::vector<uint64_t> KvCache::BlockHashes(const std::string& adapter_key,
                                           const std::vector<int32_t>& tokens) const {
  std::vector<uint64_t> hashes;
  uint64_t h = std::hash<std::string>()(adapter_key) | 1;
  for (size_t start = 0; start + block_size_ <= tokens.size(); start += block_size_) {
    for (size_t i = start; i < start + block_size_; ++i) {
      // FNV-style mixing of each token into the chain.
      h = (h ^ static_cast<uint64_t>(static_cast<uint32_t>(tokens[i]))) * 0x100000001B3ull;
      h ^= h >> 29;
    }
    hashes.push_back(h | 1);  // never 0: 0 marks "no contents"
  }
  return hashes;
}

std::vector<int32_t> KvCache::MatchPrefix(const std::vector<uint64_t>& hashes) {
  std::vector<int32_t> blocks;
  for (uint64_t h : hashes) {
    auto it = cached_.find(h);
    if (it == cached_.end()) break;
    const int32_t block = it->second;
    if (refs_[block]++ == 0) cached_free_.erase(lru_position_[block]);
    blocks.push_back(block);
  }
  prefix_hits_ += static_cast<int64_t>(blocks.size());
  return blocks;
}

void KvCache::Register(const std::vector<int32_t>& blocks, const std::vector<uint64_t>& hashes) {
  for (size_t i = 0; i < hashes.size() && i < blocks.size(); ++i) {
    if (block_hash_[blocks[i]] != 0 || cached_.count(hashes[i])) continue;
    block_hash_[blocks[i]] = hashes[i];
    cached_[hashes[i]] = blocks[i];
  }
}

model::KvCacheView KvCache::View() {
  model::KvCacheView view;
  view.layout = layout_;
  for (size_t l = 0; l < k_pools_.size(); ++l) {
    view.k.push_back(k_pools_[l].data());
    view.v.push_back(v_pools_[l].data());
  }
  return view;
}

}  // namespace loraserve::engine
