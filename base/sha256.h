// SHA-256 (FIPS 180-4), streaming.
//
// Used for content hashes: anything keyed by an adapter (prefix cache, merged
// weights) is keyed by the sha256 of its config and tensors, never by its name.
// Not constant-time; not meant for secrets.
//
// Thread safety: one Sha256 object per thread; the class holds no shared state.
//
// Example:
//   Sha256 hash;
//   hash.Update("ab");
//   hash.Update("c");
//   std::string hex = hash.HexDigest();  // "ba7816bf..."
#ifndef LORASERVE_BASE_SHA256_H_
#define LORASERVE_BASE_SHA256_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace loraserve {

class Sha256 {
 public:
  static constexpr size_t kDigestBytes = 32;
  using Digest = std::array<uint8_t, kDigestBytes>;

  Sha256();

  void Update(const void* data, size_t bytes);
  void Update(absl::string_view data) { Update(data.data(), data.size()); }

  // Pads and returns the digest. The object is reset afterwards, ready for a
  // new message.
  Digest Final();
  // Final() as 64 lowercase hex digits.
  std::string HexDigest();

 private:
  void Reset();
  void Compress(const uint8_t* block);  // one 64-byte block

  std::array<uint32_t, 8> state_;
  std::array<uint8_t, 64> buffer_;
  size_t buffered_ = 0;       // bytes in buffer_
  uint64_t total_bytes_ = 0;  // message length so far
};

// One-shot helper: hex sha256 of `data`.
std::string Sha256Hex(absl::string_view data);

}  // namespace loraserve

#endif  // LORASERVE_BASE_SHA256_H_
