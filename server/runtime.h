// The serving stack below the APIs, built in one place for `loraserve generate`
// and `loraserve serve`: the backend for the device and weight dtype, the model
// (a checkpoint, or random weights in a preset's shapes), its tokenizer, the
// adapter registry with the adapters the operator named, the device adapter
// cache, the paged KV cache and the engine over all of them.
//
// Ownership: the Runtime owns every piece; they are destroyed engine first,
// backend last. Threading: BuildRuntime runs on one thread; afterwards the
// pieces keep their own rules (the engine is driven by one thread, the
// registry is thread-safe).
//
// Example:
//   ASSIGN_OR_RETURN(std::unique_ptr<Runtime> runtime,
//                    BuildRuntime({.model = "../shared/models/aidreams-260k"}));
//   runtime->engine->Add(request, on_token);
#ifndef LORASERVE_SERVER_RUNTIME_H_
#define LORASERVE_SERVER_RUNTIME_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/device_cache.h"
#include "adapters/registry.h"
#include "kernels/backend.h"
#include "server/engine/engine.h"
#include "server/engine/kv_cache.h"
#include "server/model/llama_model.h"
#include "server/tokenizer/tokenizer.h"

namespace loraserve {

// What the stack is built from; each field is the flag of the same name.
struct RuntimeConfig {
  std::string model;                 // a model directory; with load_format "dummy" also a preset
  std::string load_format = "auto";  // auto | dummy (random weights)
  std::string tokenizer;             // its directory; empty: the model's
  std::string device = "cpu";        // cpu | cuda
  bool cuda_graphs = true;
  int32_t threads = 0;  // CPU threads; 0: every core
  std::string dtype = "auto";
  std::string quantization = "none";
  int64_t kv_cache_bytes = int64_t{1} << 30;
  int32_t block_size = 16;
  std::string adapter_dir;                   // every subdirectory loaded at start
  std::string adapter_resolver_dir;          // unknown ids load from here on first use
  std::vector<std::string> adapters;         // NAME=DIR specs loaded at start
  std::vector<std::string> pinned_adapters;  // ids never evicted from host memory
  bool lazy_adapter_load = false;  // start-up adapters: metadata now, weights on first use
  int32_t max_lora_rank = 64;
  double compact_adapters_energy = 1;  // every load's rank compaction target; 1: none
  int64_t adapter_host_bytes = 0;  // 0: unlimited
  int64_t adapter_device_bytes = int64_t{1} << 30;
  engine::EngineOptions engine;
};

struct Runtime {
  // Destroyed in the reverse order: what borrows a piece goes before it.
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<model::LlamaModel> model;
  std::unique_ptr<model::Tokenizer> tokenizer;
  std::string tokenizer_dir;  // where the tokenizer (and its chat template) came from
  std::unique_ptr<adapters::AdapterRegistry> registry;
  std::unique_ptr<adapters::DeviceAdapterCache> device_adapters;
  std::unique_ptr<engine::KvCache> kv_cache;
  std::unique_ptr<engine::Engine> engine;
};

// Loads and wires everything; the first failure is returned naming the flag
// or file at fault, with nothing left running. Load progress and a summary go
// to stderr.
absl::StatusOr<std::unique_ptr<Runtime>> BuildRuntime(const RuntimeConfig& config);

}  // namespace loraserve

#endif  // LORASERVE_SERVER_RUNTIME_H_
