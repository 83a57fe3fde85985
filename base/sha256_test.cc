#include "base/sha256.h"

#include <string>

#include "gtest/gtest.h"

namespace loraserve {
namespace {

// Test vectors of FIPS 180-4 (NIST CSRC example values for SHA-256).
TEST(Sha256Test, EmptyMessage) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Sha256Test, Abc) {
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256Test, TwoBlockMessage) {
  // 448 bits: padding needs a second block.
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256Test, OneMillionA) {
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256Test, StreamingInAnyChunkingEqualsOneShot) {
  std::string message;
  for (int i = 0; i < 1000; ++i) message.push_back(static_cast<char>(i * 7 + 3));
  const std::string expected = Sha256Hex(message);
  for (size_t chunk : {1, 3, 55, 56, 63, 64, 65, 127, 999}) {
    Sha256 hash;
    for (size_t pos = 0; pos < message.size(); pos += chunk) {
      hash.Update(absl::string_view(message).substr(pos, chunk));
    }
    EXPECT_EQ(hash.HexDigest(), expected) << "chunk " << chunk;
  }
}

TEST(Sha256Test, FinalResetsForTheNextMessage) {
  Sha256 hash;
  hash.Update("something else");
  hash.HexDigest();
  hash.Update("abc");
  EXPECT_EQ(hash.HexDigest(), Sha256Hex("abc"));
}

}  // namespace
}  // namespace loraserve
