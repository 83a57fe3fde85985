#include "formats/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "base/json_depth.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace loraserve::formats {
namespace {

using json = nlohmann::json;
using kernels::DType;

// The reference implementation refuses headers above 100 MB; a larger length
// means a corrupt or hostile file, and refusing it early bounds the parse.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

// Every dtype of the safetensors format; `exposed` is set for the ones the
// kernels take.
struct DTypeSpec {
  const char* name;
  size_t size;
  std::optional<DType> exposed;
};
constexpr DTypeSpec kDTypes[] = {
    {"F32", 4, DType::kF32},   {"F16", 2, DType::kF16},      {"BF16", 2, DType::kBF16},
    {"F64", 8, std::nullopt},  {"I64", 8, std::nullopt},     {"U64", 8, std::nullopt},
    {"I32", 4, std::nullopt},  {"U32", 4, std::nullopt},     {"I16", 2, std::nullopt},
    {"U16", 2, std::nullopt},  {"I8", 1, std::nullopt},      {"U8", 1, std::nullopt},
    {"BOOL", 1, std::nullopt}, {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt},
};

const DTypeSpec* FindDType(const std::string& name) {
  for (const DTypeSpec& spec : kDTypes) {
    if (name == spec.name) return &spec;
  }
  return nullptr;
}

// One validated header entry, before it is turned into a TensorInfo.
struct Entry {
  std::string name;
  const DTypeSpec* dtype = nullptr;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

absl::Status Invalid(const std::string& path, const std::string& tensor, const std::string& what) {
  return absl::InvalidArgumentError(
      absl::StrCat("safetensors file ", path, ": tensor '", tensor, "': ", what));
}

// Reads a non-negative JSON integer that must fit in int64_t.
absl::StatusOr<uint64_t> NonNegative(const std::string& path, const std::string& tensor,
                                     const std::string& field, const json& value) {
  if (value.is_number_unsigned()) {
    uint64_t v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) {
      return Invalid(path, tensor, absl::StrCat(field, " ", v, " is too large"));
    }
    return v;
  }
  if (value.is_number_integer()) {
    return Invalid(path, tensor,
                   absl::StrCat(field, " is ", value.dump(), "; expected a non-negative integer"));
  }
  return Invalid(path, tensor, absl::StrCat(field, " is ", value.dump(), "; expected an integer"));
}

absl::StatusOr<Entry> ParseEntry(const std::string& path, const std::string& name,
                                 const json& value, uint64_t data_bytes) {
  if (!value.is_object()) {
    return Invalid(path, name,
                   "header entry is not an object; expected "
                   "{\"dtype\", \"shape\", \"data_offsets\"}");
  }
  Entry entry;
  entry.name = name;

  auto dtype = value.find("dtype");
  if (dtype == value.end() || !dtype->is_string()) {
    return Invalid(path, name, "missing or non-string \"dtype\"; expected e.g. \"F32\"");
  }
  entry.dtype = FindDType(dtype->get<std::string>());
  if (entry.dtype == nullptr) {
    return Invalid(path, name,
                   absl::StrCat("unknown dtype ", dtype->get<std::string>(),
                                "; expected a safetensors dtype such as F32, F16 or BF16"));
  }

  auto shape = value.find("shape");
  if (shape == value.end() || !shape->is_array()) {
    return Invalid(path, name, "missing or non-array \"shape\"; expected a list of dims");
  }
  uint64_t elements = 1;
  for (size_t i = 0; i < shape->size(); ++i) {
    ASSIGN_OR_RETURN(uint64_t dim,
                     NonNegative(path, name, absl::StrCat("shape[", i, "]"), (*shape)[i]));
    if (__builtin_mul_overflow(elements, dim, &elements) ||
        elements > static_cast<uint64_t>(INT64_MAX)) {
      return Invalid(
          path, name,
          absl::StrCat("shape ", shape->dump(), " overflows; expected fewer than 2^63 elements"));
    }
    entry.shape.push_back(static_cast<int64_t>(dim));
  }

  auto offsets = value.find("data_offsets");
  if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2) {
    return Invalid(path, name, "missing or malformed \"data_offsets\"; expected [begin, end]");
  }
  ASSIGN_OR_RETURN(entry.begin, NonNegative(path, name, "data_offsets[0]", (*offsets)[0]));
  ASSIGN_OR_RETURN(entry.end, NonNegative(path, name, "data_offsets[1]", (*offsets)[1]));
  if (entry.begin > entry.end) {
    return Invalid(path, name,
                   absl::StrCat("data_offsets [", entry.begin, ", ", entry.end,
                                "] begin after end; expected begin <= end"));
  }
  if (entry.end > data_bytes) {
    return Invalid(
        path, name,
        absl::StrCat("data_offsets [", entry.begin, ", ", entry.end,
                     "] extend past the data section of ", data_bytes, " bytes (file truncated?)"));
  }
  uint64_t expected_bytes = 0;
  if (__builtin_mul_overflow(elements, entry.dtype->size, &expected_bytes) ||
      expected_bytes != entry.end - entry.begin) {
    return Invalid(
        path, name,
        absl::StrCat("shape ", shape->dump(), " of ", entry.dtype->name, " needs ", elements, " x ",
                     entry.dtype->size, " bytes but data_offsets span ", entry.end - entry.begin));
  }
  return entry;
}

// Refuses any two tensors whose byte ranges intersect (empty tensors take no
// bytes and cannot overlap anything).
absl::Status CheckNoOverlap(const std::string& path, std::vector<const Entry*> entries) {
  entries.erase(std::remove_if(entries.begin(), entries.end(),
                               [](const Entry* e) { return e->begin == e->end; }),
                entries.end());
  std::sort(entries.begin(), entries.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < entries.size(); ++i) {
    const Entry& prev = *entries[i - 1];
    const Entry& cur = *entries[i];
    if (cur.begin < prev.end) {
      return Invalid(path, cur.name,
                     absl::StrCat("data_offsets [", cur.begin, ", ", cur.end,
                                  ") overlap those of tensor '", prev.name, "' [", prev.begin, ", ",
                                  prev.end, "); expected disjoint byte ranges"));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckHeaderLength(const std::string& path, uint64_t file_bytes) {
  if (file_bytes >= 8) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path, " is ", file_bytes,
                                                 " bytes; expected at least the 8-byte header "
                                                 "length"));
}

absl::StatusOr<std::string> ReadTextFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return text.str();
}

bool IsRegularFile(const std::string& path) {
  std::error_code error;
  return std::filesystem::is_regular_file(path, error);
}

// The shard file names of `index_path`'s weight_map, and tensor -> shard.
struct ShardIndex {
  std::map<std::string, std::string> weight_map;
  std::vector<std::string> shards;  // sorted, unique
};

absl::StatusOr<ShardIndex> ReadShardIndex(const std::string& index_path) {
  ASSIGN_OR_RETURN(std::string text, ReadTextFile(index_path));
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard index ", index_path, " is not valid JSON: ", e.what()));
  }
  auto weight_map = index.is_object() ? index.find("weight_map") : index.end();
  if (weight_map == index.end() || !weight_map->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("shard index ", index_path,
                                                   " has no \"weight_map\" object; expected "
                                                   "{\"weight_map\": {tensor: shard file}}"));
  }
  ShardIndex result;
  for (const auto& [tensor, shard] : weight_map->items()) {
    // Shards live beside the index; a path would let an index reach any file.
    if (!shard.is_string() || shard.get<std::string>().empty() ||
        shard.get<std::string>().find('/') != std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("shard index ", index_path, ": weight_map entry for tensor '", tensor,
                       "' is ", shard.dump(), "; expected a file name in the same directory"));
    }
    result.weight_map[tensor] = shard.get<std::string>();
    result.shards.push_back(shard.get<std::string>());
  }
  std::sort(result.shards.begin(), result.shards.end());
  result.shards.erase(std::unique(result.shards.begin(), result.shards.end()), result.shards.end());
  if (result.shards.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard index ", index_path, " has an empty weight_map"));
  }
  return result;
}

}  // namespace

int64_t TensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t dim : shape) n *= dim;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path,
                                                                       bool read_ahead) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("cannot open safetensors file ", path));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status status = absl::ErrnoToStatus(errno, absl::StrCat("cannot stat ", path));
    ::close(fd);
    return status;
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (absl::Status status = CheckHeaderLength(path, file_bytes); !status.ok()) {
    ::close(fd);
    return status;
  }
  void* mapping = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  int mmap_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (mapping == MAP_FAILED) {
    return absl::ErrnoToStatus(mmap_errno, absl::StrCat("cannot mmap ", path));
  }
  // From here on the destructor unmaps, on error paths too.
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->mapping_ = mapping;
  file->mapping_bytes_ = file_bytes;
  // The loader copies every tensor right after Open: start reading ahead now.
  if (read_ahead) ::madvise(mapping, file_bytes, MADV_WILLNEED);
  RETURN_IF_ERROR(file->Index(static_cast<const uint8_t*>(mapping), file_bytes));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(
    absl::string_view bytes, std::string name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = std::move(name);
  RETURN_IF_ERROR(CheckHeaderLength(file->path_, bytes.size()));
  RETURN_IF_ERROR(file->Index(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  return file;
}

absl::Status SafetensorsFile::Index(const uint8_t* base, uint64_t file_bytes) {
  const std::string& path = path_;
  SafetensorsFile* file = this;
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | base[i];
  if (header_bytes > kMaxHeaderBytes || header_bytes > file_bytes - 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors file ", path, ": header length ", header_bytes,
        " does not fit; expected at most ", std::min<uint64_t>(kMaxHeaderBytes, file_bytes - 8),
        " (file truncated or not safetensors?)"));
  }
  const uint64_t data_offset = 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - data_offset;

  const absl::string_view header_text(reinterpret_cast<const char*>(base + 8), header_bytes);
  RETURN_IF_ERROR(
      CheckJsonDepth(header_text, absl::StrCat("the header of safetensors file ", path)));
  json header;
  try {
    header = json::parse(base + 8, base + data_offset);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors file ", path, ": header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path, ": header is a JSON ",
                                                   header.type_name(),
                                                   "; expected an object of tensors"));
  }

  std::vector<Entry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat("safetensors file ", path, ": __metadata__ is a JSON ", value.type_name(),
                         "; expected an object of strings"));
      }
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat("safetensors file ", path,
                                                         ": __metadata__ entry '", key, "' is ",
                                                         text.dump(), "; expected a string"));
        }
        file->metadata_[key] = text.get<std::string>();
      }
      continue;
    }
    ASSIGN_OR_RETURN(Entry entry, ParseEntry(path, name, value, data_bytes));
    entries.push_back(std::move(entry));
  }
  std::vector<const Entry*> pointers;
  for (const Entry& entry : entries) pointers.push_back(&entry);
  RETURN_IF_ERROR(CheckNoOverlap(path, std::move(pointers)));

  for (Entry& entry : entries) {
    if (!entry.dtype->exposed.has_value()) {
      file->unexposed_[entry.name] = {entry.dtype->name, base + data_offset + entry.begin,
                                      static_cast<size_t>(entry.end - entry.begin)};
      continue;
    }
    TensorInfo info;
    info.name = entry.name;
    info.dtype = *entry.dtype->exposed;
    info.shape = std::move(entry.shape);
    info.data = base + data_offset + entry.begin;
    info.bytes = entry.end - entry.begin;
    info.file = path;
    file->tensors_.emplace(entry.name, std::move(info));
  }
  return absl::OkStatus();
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_bytes_);
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<const TensorInfo*> SafetensorsFile::Get(const std::string& name) const {
  if (const TensorInfo* info = Find(name)) return info;
  auto it = unexposed_.find(name);
  if (it != unexposed_.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", it->second.dtype,
                                                   " for tensor ", name, " in file ", path_,
                                                   "; expected F32, F16 or BF16"));
  }
  return absl::NotFoundError(absl::StrCat("tensor ", name, " not in file ", path_));
}

std::map<std::string, std::string> SafetensorsFile::UnexposedDtypes() const {
  std::map<std::string, std::string> dtypes;
  for (const auto& [name, raw] : unexposed_) dtypes[name] = raw.dtype;
  return dtypes;
}

absl::StatusOr<std::vector<int32_t>> SafetensorsFile::ReadInt32(const std::string& name) const {
  auto it = unexposed_.find(name);
  if (it == unexposed_.end() || it->second.dtype != "I32") {
    return absl::NotFoundError(absl::StrCat("no I32 tensor ", name, " in file ", path_));
  }
  std::vector<int32_t> values(it->second.bytes / sizeof(int32_t));
  std::memcpy(values.data(), it->second.data, values.size() * sizeof(int32_t));
  return values;
}

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  const std::string index_path = absl::StrCat(dir, "/", kIndexFile);
  const std::string single_path = absl::StrCat(dir, "/", kSingleFile);
  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->dir_ = dir;

  std::optional<ShardIndex> index;
  std::vector<std::string> paths;
  if (IsRegularFile(index_path)) {
    ASSIGN_OR_RETURN(index, ReadShardIndex(index_path));
    for (const std::string& shard : index->shards) {
      std::string path = absl::StrCat(dir, "/", shard);
      if (!IsRegularFile(path)) {
        return absl::NotFoundError(
            absl::StrCat("shard ", path, " listed in ", index_path, " does not exist"));
      }
      paths.push_back(std::move(path));
    }
  } else if (IsRegularFile(single_path)) {
    paths.push_back(single_path);
  } else {
    return absl::NotFoundError(absl::StrCat("no checkpoint in directory ", dir, ": expected ",
                                            kSingleFile, " or ", kIndexFile));
  }

  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
    std::vector<std::string> names;
    for (const auto& [name, info] : file->tensors()) names.push_back(name);
    for (const auto& [name, raw] : file->unexposed_) names.push_back(name);
    for (const std::string& name : names) {
      auto [it, inserted] = checkpoint->owner_.emplace(name, file.get());
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " is in both ",
                                                       it->second->path(), " and ", path,
                                                       "; expected it in one file"));
      }
    }
    checkpoint->files_.push_back(std::move(file));
  }

  if (index.has_value()) {
    for (const auto& [tensor, shard] : index->weight_map) {
      auto it = checkpoint->owner_.find(tensor);
      const std::string expected = absl::StrCat(dir, "/", shard);
      if (it == checkpoint->owner_.end() || it->second->path() != expected) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor ", tensor, " is listed in ", index_path, " as in ", shard,
            " but that shard lacks it",
            it == checkpoint->owner_.end() ? ""
                                           : absl::StrCat(" (it is in ", it->second->path(), ")")));
      }
    }
  }
  return checkpoint;
}

const TensorInfo* Checkpoint::Find(const std::string& name) const {
  auto it = owner_.find(name);
  return it == owner_.end() ? nullptr : it->second->Find(name);
}

absl::StatusOr<const TensorInfo*> Checkpoint::Get(const std::string& name) const {
  auto it = owner_.find(name);
  if (it == owner_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " not in checkpoint ", dir_));
  }
  return it->second->Get(name);
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : owner_) {
    if (file->Find(name) != nullptr) names.push_back(name);
  }
  return names;
}

std::string SerializeSafetensors(const std::vector<SerializedTensor>& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const SerializedTensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t length = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return out + text + data;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<SerializedTensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  const std::string bytes = SerializeSafetensors(tensors, metadata);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write safetensors file ", path));
  return absl::OkStatus();
}

}  // namespace loraserve::formats
