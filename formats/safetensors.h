// Memory-mapped safetensors files, single or sharded.
//
// A SafetensorsFile maps one file read-only and validates its header fully
// before anything is exposed: header length inside the file, valid JSON,
// known dtypes, shapes whose element count matches the byte range, offsets
// inside the data section, no two tensors overlapping. Every error names the
// file, the tensor and what was expected. A Checkpoint is the union of the
// files of a model directory (`model.safetensors`, or the shards listed in
// `model.safetensors.index.json`), with duplicate names refused.
//
// Dtypes: F32, F16 and BF16 tensors are exposed as TensorInfo. The other
// dtypes of the format (BOOL, U8..U64, I8..I64, F64, F8_E4M3, F8_E5M2) are
// accepted in the header and validated like the rest, because some
// checkpoints carry integer buffers nobody needs; they are not exposed:
// Find returns nullptr for them and Get names their dtype in its error. A
// dtype string outside the format is an error at Open.
//
// Ownership: TensorInfo::data points into the mapping and stays valid as long
// as the SafetensorsFile (or Checkpoint) that produced it lives. Objects are
// immutable after Open and may be read from any thread.
//
// Example:
//   ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open("/models/llama"));
//   const TensorInfo* t = ckpt->Find("model.norm.weight");
#ifndef LORASERVE_FORMATS_SAFETENSORS_H_
#define LORASERVE_FORMATS_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"

namespace loraserve::formats {

struct TensorInfo {
  std::string name;
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping; not necessarily aligned
  size_t bytes = 0;
  std::string file;  // path of the file holding it, for messages

  int64_t NumElements() const;
};

class SafetensorsFile {
 public:
  // `read_ahead`: the caller reads every tensor next, so the file is read
  // ahead at once (MADV_WILLNEED); false when only the header is wanted.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path,
                                                               bool read_ahead = true);
  // The same checks on bytes already in memory (an upload), which must
  // outlive the result; `name` stands for the path in messages.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(absl::string_view bytes,
                                                                     std::string name);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when absent (or present with a dtype that is not exposed).
  const TensorInfo* Find(const std::string& name) const;
  // Like Find, but says why there is no tensor: NotFound when absent,
  // InvalidArgument naming the dtype when its dtype is not exposed.
  absl::StatusOr<const TensorInfo*> Get(const std::string& name) const;
  // The values of an I32 tensor (token ids in test goldens, for example).
  absl::StatusOr<std::vector<int32_t>> ReadInt32(const std::string& name) const;
  // The exposed (F32, F16, BF16) tensors.
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  // Names of the tensors that are not exposed, with their dtype strings.
  std::map<std::string, std::string> UnexposedDtypes() const;
  // The "__metadata__" string map of the header (may be empty).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  // Parses the header of the `file_bytes` at `base` (at least 8) and indexes
  // the tensors, whose data then point into `base`.
  absl::Status Index(const uint8_t* base, uint64_t file_bytes);

  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  // Tensors with a dtype that is not exposed.
  struct RawTensor {
    std::string dtype;
    const uint8_t* data = nullptr;
    size_t bytes = 0;
  };
  std::map<std::string, RawTensor> unexposed_;

  friend class Checkpoint;  // reads unexposed_ to find duplicates across shards
};

class Checkpoint {
 public:
  // Opens `dir/model.safetensors` or, when present, the shards named by
  // `dir/model.safetensors.index.json` (a shard listed but missing, or a
  // tensor the index places in a shard that lacks it, is an error).
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  // As SafetensorsFile::Find and ::Get, over all files of the checkpoint.
  const TensorInfo* Find(const std::string& name) const;
  absl::StatusOr<const TensorInfo*> Get(const std::string& name) const;
  // Names of the exposed tensors, sorted.
  std::vector<std::string> Names() const;

 private:
  Checkpoint() = default;
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  // Every tensor name (exposed or not) -> the file holding it.
  std::map<std::string, const SafetensorsFile*> owner_;
};

// A tensor to write: raw little-endian bytes of `dtype` ("F32", "BF16",
// "I32", ...) and `shape`.
struct SerializedTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

// The bytes of a safetensors file holding `tensors` back to back in order
// (header padded to 8 bytes, as the reference writer does).
std::string SerializeSafetensors(const std::vector<SerializedTensor>& tensors,
                                 const std::map<std::string, std::string>& metadata = {});
// Writes SerializeSafetensors(...) to `path`.
absl::Status WriteSafetensors(const std::string& path, const std::vector<SerializedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace loraserve::formats

#endif  // LORASERVE_FORMATS_SAFETENSORS_H_
