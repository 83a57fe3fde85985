// SafetensorsFile::FromBuffer on arbitrary bytes; an accepted file's tensors
// must lie inside the buffer and have as many bytes as their shape says.
#include <cstdint>
#include <memory>

#include "kernels/backend.h"
#include "server/model/safetensors.h"
#include "tests/fuzz/fuzz_support.h"

namespace loraserve::model {
namespace {

volatile uint8_t sink;

void CheckInside(const uint8_t* data, size_t size, const uint8_t* begin, size_t bytes) {
  FUZZ_CHECK(begin >= data && bytes <= size &&
             begin - data <= static_cast<ptrdiff_t>(size - bytes));
  if (bytes > 0) sink = begin[0] ^ begin[bytes - 1];  // ASan checks both ends
}

}  // namespace
}  // namespace loraserve::model

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve::model;
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
      SafetensorsFile::FromBuffer(loraserve::fuzz::AsText(data, size), "fuzz.safetensors");
  if (!file.ok()) return 0;
  for (const auto& [name, info] : (*file)->tensors()) {
    CheckInside(data, size, info.data, info.bytes);
    FUZZ_CHECK(info.NumElements() >= 0);
    FUZZ_CHECK(static_cast<uint64_t>(info.NumElements()) *
                   loraserve::kernels::DTypeSize(info.dtype) ==
               info.bytes);
    FUZZ_CHECK((*file)->Find(name) == &info);
    FUZZ_CHECK((*file)->Get(name).ok());
  }
  for (const auto& [name, dtype] : (*file)->UnexposedDtypes()) {
    FUZZ_CHECK((*file)->Find(name) == nullptr);
    FUZZ_CHECK(absl::IsInvalidArgument((*file)->Get(name).status()));
    absl::StatusOr<std::vector<int32_t>> ints = (*file)->ReadInt32(name);
    FUZZ_CHECK(ints.ok() == (dtype == "I32"));
  }
  for (const auto& [key, value] : (*file)->metadata()) sink = key.size() ^ value.size();
  FUZZ_CHECK(absl::IsNotFound((*file)->Get(std::string("\x01 absent", 8)).status()) ||
             (*file)->tensors().count(std::string("\x01 absent", 8)) > 0);
  return 0;
}
