// The device tier of adapter residency: adapters uploaded to the backend,
// within a byte budget (--adapter-device-bytes), keyed by content hash so two
// ids with the same tensors share one copy and a replaced adapter never
// reuses the old one's weights.
//
// Acquire makes an adapter resident (uploading it, evicting least recently
// used adapters that no running request holds) and counts a user; Release
// drops the count. An adapter in use is never evicted, so a batch's pointers
// stay valid for the whole step.
//
// Threading: engine thread only. The backend must outlive the cache.
//
// Example:
//   DeviceAdapterCache cache(backend, 512 << 20);
//   ASSIGN_OR_RETURN(const DeviceAdapter* on_device, cache.Acquire(*adapter));
//   ... run steps ...
//   cache.Release(*adapter);
#ifndef LORASERVE_ADAPTERS_DEVICE_CACHE_H_
#define LORASERVE_ADAPTERS_DEVICE_CACHE_H_

#include <cstdint>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/device_adapter.h"
#include "adapters/lora_adapter.h"
#include "base/bucket_counts.h"
#include "kernels/backend.h"

namespace loraserve::adapters {

struct DeviceCacheStats {
  int64_t hits = 0;
  int64_t misses = 0;  // each one an upload
  int64_t evictions = 0;
  int64_t resident_bytes = 0;
  int64_t resident_adapters = 0;
  BucketCounts upload_seconds;  // durations of the uploads
};

class DeviceAdapterCache {
 public:
  DeviceAdapterCache(kernels::Backend* backend, int64_t budget_bytes);

  // The base weights DoRA adapters are uploaded against (the engine gives
  // its model's); without them a DoRA adapter's Acquire fails.
  void set_base_weights(BaseWeights base) { base_ = std::move(base); }

  // ResourceExhausted when the adapter cannot fit even after evicting every
  // adapter not in use.
  absl::StatusOr<const DeviceAdapter*> Acquire(const LoraAdapter& adapter);
  void Release(const LoraAdapter& adapter);

  bool IsResident(const LoraAdapter& adapter) const;
  // Content hashes of the adapters with a device copy, sorted.
  std::vector<std::string> ResidentHashes() const;
  const DeviceCacheStats& stats() const { return stats_; }
  int64_t budget_bytes() const { return budget_bytes_; }
  // The device bytes `adapter` takes once resident.
  int64_t DeviceBytes(const LoraAdapter& adapter) const {
    return DeviceAdapter::UploadBytes(*backend_, adapter);
  }

 private:
  struct Entry {
    std::unique_ptr<DeviceAdapter> device;
    int64_t users = 0;
    std::list<std::string>::iterator lru;  // position in lru_
  };
  // Evicts unused adapters, least recently used first, until `bytes` more fit.
  bool MakeRoom(int64_t bytes);

  kernels::Backend* backend_;
  int64_t budget_bytes_;
  std::optional<BaseWeights> base_;
  std::map<std::string, Entry> entries_;  // content hash -> entry
  std::list<std::string> lru_;            // most recently used at the front
  DeviceCacheStats stats_;
};

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_DEVICE_CACHE_H_
