// The Adapters.Upload stream's rules (UploadAssembler) on a sequence of
// messages decoded from the input. Each record is a tag byte, a 2-byte
// little-endian length and that many payload bytes; by tag % 4:
//   0: the payload parsed as an UploadAdapterRequest (ParseFromArray);
//   1: a header with the payload as id, whose total_bytes and sha256 are
//      those of all type-2 payloads of the input (so a well-formed stream can
//      pass), bit 2 of the tag adds 1 to total_bytes, bit 3 upper-cases the
//      digest, bit 4 puts the payload in adapter_config_json as well, bit 5
//      takes total_bytes from the payload's first 8 bytes (little-endian; the
//      id is the rest);
//   2: a chunk with the payload as data, `last` from bit 2 of the tag;
//   3: a message with neither header nor chunk.
// Feed stops at the first error, as the reactor does; then Finish. An
// accepted stream must have delivered exactly its header's bytes.
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "base/sha256.h"
#include "server/api/upload_assembler.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

using loraserve::v1::UploadAdapterRequest;

struct Record {
  uint8_t tag;
  absl::string_view payload;
};

std::vector<Record> Records(absl::string_view input) {
  std::vector<Record> records;
  while (input.size() >= 3) {
    const uint8_t tag = static_cast<uint8_t>(input[0]);
    const size_t length =
        static_cast<uint8_t>(input[1]) | (static_cast<size_t>(static_cast<uint8_t>(input[2])) << 8);
    input.remove_prefix(3);
    const absl::string_view payload = input.substr(0, length);
    input.remove_prefix(payload.size());
    records.push_back({tag, payload});
  }
  return records;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve;
  const std::vector<Record> records = Records(fuzz::AsText(data, size));
  std::string all_chunks;
  for (const Record& record : records) {
    if (record.tag % 4 == 2) all_chunks.append(record.payload.data(), record.payload.size());
  }
  const std::string digest = Sha256Hex(all_chunks);
  constexpr int64_t kLimit = 1 << 20;
  api::UploadAssembler upload(kLimit);
  std::string received;  // what the reactor would write
  bool failed = false;
  for (const Record& record : records) {
    UploadAdapterRequest request;
    switch (record.tag % 4) {
      case 0:
        if (!request.ParseFromArray(record.payload.data(),
                                    static_cast<int>(record.payload.size()))) {
          continue;
        }
        break;
      case 1: {
        v1::UploadHeader* header = request.mutable_header();
        absl::string_view id = record.payload;
        int64_t total = static_cast<int64_t>(all_chunks.size()) + ((record.tag >> 2) & 1);
        if ((record.tag & 32) && id.size() >= 8) {
          uint64_t raw = 0;
          for (int i = 7; i >= 0; --i) raw = raw << 8 | static_cast<uint8_t>(id[i]);
          total = static_cast<int64_t>(raw);
          id.remove_prefix(8);
        }
        header->set_id(std::string(id));
        header->set_total_bytes(total);
        header->set_sha256((record.tag & 8) ? absl::AsciiStrToUpper(digest) : digest);
        if (record.tag & 16) header->set_adapter_config_json(std::string(record.payload));
        break;
      }
      case 2:
        request.mutable_chunk()->set_data(std::string(record.payload));
        request.mutable_chunk()->set_last((record.tag >> 2) & 1);
        break;
      default:
        break;
    }
    if (!upload.Feed(request).ok()) {
      failed = true;
      break;
    }
    FUZZ_CHECK(upload.has_header());
    if (request.has_chunk()) received += request.chunk().data();
    FUZZ_CHECK(upload.received_bytes() == static_cast<int64_t>(received.size()));
    FUZZ_CHECK(upload.received_bytes() <= upload.header().total_bytes());
  }
  if (failed || !upload.Finish().ok()) return 0;
  const v1::UploadHeader& header = upload.header();
  FUZZ_CHECK(header.total_bytes() > 0 &&
             header.total_bytes() == static_cast<int64_t>(received.size()));
  FUZZ_CHECK(header.total_bytes() + static_cast<int64_t>(header.adapter_config_json().size()) <=
             kLimit);
  FUZZ_CHECK(header.sha256() == Sha256Hex(received));
  return 0;
}
