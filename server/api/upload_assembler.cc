#include "server/api/upload_assembler.h"

#include <string>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "adapters/registry.h"
#include "base/status_macros.h"

namespace loraserve::api {
namespace {

bool IsHexDigest(const std::string& s) {
  if (s.size() != 2 * Sha256::kDigestBytes) return false;
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

absl::Status UploadAssembler::Feed(const v1::UploadAdapterRequest& request) {
  switch (request.part_case()) {
    case v1::UploadAdapterRequest::kHeader:
      if (has_header_) return absl::InvalidArgumentError("header: sent twice");
      has_header_ = true;
      return Begin(request.header());
    case v1::UploadAdapterRequest::kChunk: {
      if (!has_header_) {
        return absl::InvalidArgumentError("chunk: the first message must carry header");
      }
      if (saw_last_) {
        return absl::InvalidArgumentError("chunk: received after the chunk marked last");
      }
      const std::string& data = request.chunk().data();
      const int64_t total = header_.total_bytes();
      if (received_ + static_cast<int64_t>(data.size()) > total) {
        return absl::InvalidArgumentError(
            absl::StrCat("chunk: ", received_ + static_cast<int64_t>(data.size()) - total,
                         " bytes past header.total_bytes=", total));
      }
      hash_.Update(data);
      received_ += static_cast<int64_t>(data.size());
      saw_last_ = request.chunk().last();
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError("part: set header or chunk");
  }
}

absl::Status UploadAssembler::Begin(const v1::UploadHeader& header) {
  header_ = header;
  RETURN_IF_ERROR(adapters::CanonicalAdapterId(header.id(), "default").status());
  if (!IsHexDigest(header.sha256())) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.sha256: expected 64 hex digits, got \"", header.sha256(), "\""));
  }
  header_.set_sha256(absl::AsciiStrToLower(header.sha256()));
  if (header.total_bytes() <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.total_bytes: must be positive, got ", header.total_bytes()));
  }
  // Both are at least 0 here, so neither the difference nor the unsigned sum
  // can overflow (total_bytes may be near INT64_MAX).
  const int64_t config_bytes = static_cast<int64_t>(header.adapter_config_json().size());
  if (header.total_bytes() > max_upload_bytes_ - config_bytes) {
    const uint64_t size = static_cast<uint64_t>(header.total_bytes()) + config_bytes;
    return absl::ResourceExhaustedError(
        absl::StrCat("upload of ", header.id(), ": ", size,
                     " bytes (header.total_bytes + adapter_config_json) exceed "
                     "--max-upload-bytes=",
                     max_upload_bytes_));
  }
  return absl::OkStatus();
}

absl::Status UploadAssembler::Finish() {
  if (!has_header_) return absl::InvalidArgumentError("header: the upload sent no messages");
  if (received_ != header_.total_bytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("upload of ", header_.id(), " ended after ", received_,
                     " of header.total_bytes=", header_.total_bytes(), " bytes"));
  }
  const std::string digest = hash_.HexDigest();
  if (digest != header_.sha256()) {
    return absl::DataLossError(absl::StrCat("upload of ", header_.id(), ": the bytes have sha256 ",
                                            digest, ", header.sha256 is ", header_.sha256()));
  }
  return absl::OkStatus();
}

}  // namespace loraserve::api
