// Checkpoint::Open on a directory written from the input: the parts between
// kSeparator are model.safetensors.index.json (empty: none, and the next part
// is model.safetensors) and then the shards model-0000I-of-0000N.safetensors.
#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/model/safetensors.h"
#include "tests/fuzz/fuzz_support.h"

namespace {

constexpr absl::string_view kSeparator = "\n--part--\n";
constexpr size_t kMaxShards = 4;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace loraserve;
  const std::vector<absl::string_view> parts =
      fuzz::SplitInput(fuzz::AsText(data, size), kSeparator, 1 + kMaxShards);
  const std::string& dir = fuzz::FreshScratchDir();
  const bool sharded = !parts[0].empty();
  if (sharded) {
    fuzz::WriteFileOrDie(dir + "/model.safetensors.index.json", parts[0]);
    const size_t shards = parts.size() - 1;
    for (size_t i = 1; i < parts.size(); ++i) {
      fuzz::WriteFileOrDie(absl::StrCat(dir, "/model-0000", i, "-of-0000", shards, ".safetensors"),
                           parts[i]);
    }
  } else if (parts.size() > 1) {
    fuzz::WriteFileOrDie(dir + "/model.safetensors", parts[1]);
  }
  absl::StatusOr<std::unique_ptr<model::Checkpoint>> checkpoint = model::Checkpoint::Open(dir);
  if (!checkpoint.ok()) return 0;
  for (const std::string& name : (*checkpoint)->Names()) {
    const model::TensorInfo* info = (*checkpoint)->Find(name);
    FUZZ_CHECK(info != nullptr && info->name == name);
    FUZZ_CHECK((*checkpoint)->Get(name).ok());
  }
  return 0;
}
