// The rules of one Adapters.Upload stream, apart from its files and its gRPC
// reactor: the first message carries the header (a valid id, 64 hex digits of
// sha256, a positive total_bytes that with the config fits the upload limit),
// every later one a chunk; the chunks' bytes never pass total_bytes and none
// follows the chunk marked last; at the end of the stream exactly total_bytes
// arrived and their sha256 is the header's.
//
// Ownership and threads: a value owned by one stream; Feed and Finish are
// called in order from one thread at a time (the reactor's gRPC thread feeds,
// its worker finishes, never at once).
//
// Example (the reactor writes the files; the assembler decides):
//   UploadAssembler upload(options.max_upload_bytes);
//   RETURN_IF_ERROR(upload.Feed(message));   // each message, in order
//   if (message.has_header()) ...create the directory and the config file...
//   if (message.has_chunk()) ...append message.chunk().data() to the file...
//   RETURN_IF_ERROR(upload.Finish());         // the client closed the stream
#ifndef LORASERVE_SERVER_API_UPLOAD_ASSEMBLER_H_
#define LORASERVE_SERVER_API_UPLOAD_ASSEMBLER_H_

#include <cstdint>

#include "absl/status/status.h"
#include "base/sha256.h"
#include "loraserve/v1/adapters.pb.h"

namespace loraserve::api {

class UploadAssembler {
 public:
  // `max_upload_bytes` bounds header.total_bytes + adapter_config_json.
  explicit UploadAssembler(int64_t max_upload_bytes) : max_upload_bytes_(max_upload_bytes) {}

  // Takes the next message of the stream. InvalidArgument (ResourceExhausted
  // for a header over the limit) says what broke the rules; the stream is
  // then over.
  absl::Status Feed(const v1::UploadAdapterRequest& request);
  // The stream ended: InvalidArgument without a header or with fewer bytes
  // than header.total_bytes, DataLoss when their sha256 is not the header's.
  absl::Status Finish();

  bool has_header() const { return has_header_; }
  // The header as accepted (sha256 in lower case); meaningful once has_header().
  const v1::UploadHeader& header() const { return header_; }
  int64_t received_bytes() const { return received_; }

 private:
  absl::Status Begin(const v1::UploadHeader& header);

  const int64_t max_upload_bytes_;
  v1::UploadHeader header_;
  bool has_header_ = false;
  bool saw_last_ = false;
  int64_t received_ = 0;
  Sha256 hash_;
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_UPLOAD_ASSEMBLER_H_
