// Seeded random PEFT LoRA adapters for any base shape, written in the real
// on-disk format (adapter_config.json + adapter_model.safetensors), so that
// benchmarks and load tests on `--load-format dummy` models exercise the same
// loading path as users' adapters.
//
// Example:
//   RETURN_IF_ERROR(WriteDummyAdapter("/tmp/a0", model->adapter_shape(),
//                                     {.rank = 16, .seed = 7}));
#ifndef LORASERVE_ADAPTERS_DUMMY_ADAPTER_H_
#define LORASERVE_ADAPTERS_DUMMY_ADAPTER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "adapters/lora_adapter.h"

namespace loraserve::adapters {

struct DummyAdapterOptions {
  int rank = 16;
  double alpha = 32;
  // Short module names; all seven Llama projections by default.
  std::vector<std::string> target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  uint64_t seed = 0;
};

// Creates `dir` if needed and writes the adapter there.
absl::Status WriteDummyAdapter(const std::string& dir, const BaseModelShape& base,
                               const DummyAdapterOptions& options);

}  // namespace loraserve::adapters

#endif  // LORASERVE_ADAPTERS_DUMMY_ADAPTER_H_
