#include "server/api/upload_assembler.h"

#include <limits>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/status_matchers.h"

namespace loraserve::api {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kLimit = 1000;

v1::UploadAdapterRequest Header(const std::string& id, absl::string_view data,
                                const std::string& config = "{}") {
  v1::UploadAdapterRequest request;
  request.mutable_header()->set_id(id);
  request.mutable_header()->set_adapter_config_json(config);
  request.mutable_header()->set_sha256(Sha256Hex(data));
  request.mutable_header()->set_total_bytes(static_cast<int64_t>(data.size()));
  return request;
}

v1::UploadAdapterRequest Chunk(const std::string& data, bool last) {
  v1::UploadAdapterRequest request;
  request.mutable_chunk()->set_data(data);
  request.mutable_chunk()->set_last(last);
  return request;
}

TEST(UploadAssemblerTest, AcceptsAHeaderAndItsChunks) {
  UploadAssembler upload(kLimit);
  EXPECT_FALSE(upload.has_header());
  v1::UploadAdapterRequest header = Header("acme/x", "hello world");
  header.mutable_header()->set_sha256(absl::AsciiStrToUpper(header.header().sha256()));
  ASSERT_OK(upload.Feed(header));
  EXPECT_TRUE(upload.has_header());
  EXPECT_EQ(upload.header().sha256(), Sha256Hex("hello world"));  // lower-cased
  ASSERT_OK(upload.Feed(Chunk("hello ", false)));
  ASSERT_OK(upload.Feed(Chunk("world", true)));
  EXPECT_EQ(upload.received_bytes(), 11);
  EXPECT_OK(upload.Finish());
}

TEST(UploadAssemblerTest, RefusesMessagesOutOfOrder) {
  UploadAssembler no_header(kLimit);
  EXPECT_THAT(no_header.Feed(Chunk("a", true)).message(), HasSubstr("must carry header"));
  UploadAssembler empty(kLimit);
  EXPECT_THAT(empty.Feed(v1::UploadAdapterRequest()).message(), HasSubstr("header or chunk"));
  UploadAssembler twice(kLimit);
  ASSERT_OK(twice.Feed(Header("x", "ab")));
  EXPECT_THAT(twice.Feed(Header("x", "ab")).message(), HasSubstr("sent twice"));
  UploadAssembler after_last(kLimit);
  ASSERT_OK(after_last.Feed(Header("x", "ab")));
  ASSERT_OK(after_last.Feed(Chunk("a", true)));
  EXPECT_THAT(after_last.Feed(Chunk("b", false)).message(),
              HasSubstr("after the chunk marked last"));
  UploadAssembler nothing(kLimit);
  EXPECT_THAT(nothing.Finish().message(), HasSubstr("sent no messages"));
}

TEST(UploadAssemblerTest, RefusesBadHeaders) {
  UploadAssembler bad_id(kLimit);
  EXPECT_TRUE(absl::IsInvalidArgument(bad_id.Feed(Header("bad id", "ab"))));
  v1::UploadAdapterRequest short_hash = Header("x", "ab");
  short_hash.mutable_header()->set_sha256("abc");
  UploadAssembler hash(kLimit);
  EXPECT_THAT(hash.Feed(short_hash).message(), HasSubstr("64 hex digits"));
  UploadAssembler empty(kLimit);
  EXPECT_THAT(empty.Feed(Header("x", "")).message(), HasSubstr("must be positive"));
  UploadAssembler big(kLimit);
  EXPECT_TRUE(
      absl::IsResourceExhausted(big.Feed(Header("x", std::string(kLimit - 1, 'a'), "{ }"))));
}

// Found by tests/fuzz (upload_stream): total_bytes near INT64_MAX plus the
// config's size overflowed int64_t before the limit was checked.
TEST(UploadAssemblerTest, RefusesATotalNearTheInt64Limit) {
  v1::UploadAdapterRequest header = Header("x", "ab", "{}");
  header.mutable_header()->set_total_bytes(std::numeric_limits<int64_t>::max());
  UploadAssembler upload(kLimit);
  const absl::Status status = upload.Feed(header);
  EXPECT_TRUE(absl::IsResourceExhausted(status)) << status;
  EXPECT_THAT(status.message(), HasSubstr("9223372036854775809 bytes"));
}

TEST(UploadAssemblerTest, CountsAndHashesTheBytes) {
  UploadAssembler past(kLimit);
  ASSERT_OK(past.Feed(Header("x", "abc")));
  EXPECT_THAT(past.Feed(Chunk("abcd", true)).message(), HasSubstr("1 bytes past"));
  UploadAssembler short_stream(kLimit);
  ASSERT_OK(short_stream.Feed(Header("x", "abc")));
  ASSERT_OK(short_stream.Feed(Chunk("ab", false)));
  EXPECT_THAT(short_stream.Finish().message(), HasSubstr("ended after 2 of"));
  UploadAssembler wrong(kLimit);
  ASSERT_OK(wrong.Feed(Header("x", "abc")));
  ASSERT_OK(wrong.Feed(Chunk("abd", true)));
  EXPECT_TRUE(absl::IsDataLoss(wrong.Finish()));
}

}  // namespace
}  // namespace loraserve::api
