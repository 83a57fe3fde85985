#include "adapters/device_cache.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "base/status_macros.h"

namespace loraserve::adapters {

DeviceAdapterCache::DeviceAdapterCache(kernels::Backend* backend, int64_t budget_bytes)
    : backend_(backend), budget_bytes_(budget_bytes) {}

bool DeviceAdapterCache::IsResident(const LoraAdapter& adapter) const {
  return entries_.count(adapter.content_hash()) > 0;
}

std::vector<std::string> DeviceAdapterCache::ResidentHashes() const {
  std::vector<std::string> hashes;
  hashes.reserve(entries_.size());
  for (const auto& [hash, entry] : entries_) hashes.push_back(hash);
  return hashes;
}

bool DeviceAdapterCache::MakeRoom(int64_t bytes) {
  auto it = lru_.end();
  while (it != lru_.begin() && stats_.resident_bytes + bytes > budget_bytes_) {
    --it;
    auto entry = entries_.find(*it);
    if (entry->second.users > 0) continue;
    stats_.resident_bytes -= entry->second.device->bytes();
    --stats_.resident_adapters;
    ++stats_.evictions;
    entries_.erase(entry);
    it = lru_.erase(it);  // the next --it visits the entry before the erased one
  }
  return stats_.resident_bytes + bytes <= budget_bytes_;
}

absl::StatusOr<const DeviceAdapter*> DeviceAdapterCache::Acquire(const LoraAdapter& adapter) {
  const std::string& hash = adapter.content_hash();
  auto it = entries_.find(hash);
  if (it != entries_.end()) {
    ++stats_.hits;
    ++it->second.users;
    lru_.splice(lru_.begin(), lru_, it->second.lru);
    return it->second.device.get();
  }
  const int64_t bytes = DeviceBytes(adapter);
  if (!MakeRoom(bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "adapter device memory: ", bytes, " bytes needed, ", budget_bytes_ - stats_.resident_bytes,
        " free of --adapter-device-bytes=", budget_bytes_, " with the rest in use"));
  }
  const absl::Time start = absl::Now();
  ASSIGN_OR_RETURN(std::unique_ptr<DeviceAdapter> device, DeviceAdapter::Upload(backend_, adapter, base_ ? &*base_ : nullptr));
  stats_.upload_seconds.Observe(absl::ToDoubleSeconds(absl::Now() - start));
  ++stats_.misses;
  ++stats_.resident_adapters;
  stats_.resident_bytes += device->bytes();
  lru_.push_front(hash);
  Entry& entry = entries_[hash];
  entry.device = std::move(device);
  entry.users = 1;
  entry.lru = lru_.begin();
  return entry.device.get();
}

void DeviceAdapterCache::Release(const LoraAdapter& adapter) {
  auto it = entries_.find(adapter.content_hash());
  if (it != entries_.end() && it->second.users > 0) --it->second.users;
}

}  // namespace loraserve::adapters
