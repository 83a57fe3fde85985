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
// Ownership: TensorInfo::data points into the mapping and stays valid as long
// as the SafetensorsFile (or Checkpoint) that produced it lives. Objects are
// immutable after Open and may be read from any thread.
//
// Example:
//   ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open("/models/llama"));
//   const TensorInfo* t = ckpt->Find("model.norm.weight");
#ifndef LORASERVE_SERVER_MODEL_SAFETENSORS_H_
#define LORASERVE_SERVER_MODEL_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"

namespace loraserve::model {

struct TensorInfo {
  std::string name;
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping
  size_t bytes = 0;
  std::string file;  // path of the file holding it, for messages

  int64_t NumElements() const;
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // nullptr when absent.
  const TensorInfo* Find(const std::string& name) const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  // The "__metadata__" string map of the header (may be empty).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

class Checkpoint {
 public:
  // Opens `dir/model.safetensors` or, when present, the shards named by
  // `dir/model.safetensors.index.json` (a shard listed but missing, or a
  // tensor the index places in a shard that lacks it, is an error).
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const TensorInfo* Find(const std::string& name) const;
  std::vector<std::string> Names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

}  // namespace loraserve::model

#endif  // LORASERVE_SERVER_MODEL_SAFETENSORS_H_
