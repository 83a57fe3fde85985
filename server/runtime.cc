#include "server/runtime.h"

#include <filesystem>
#include <functional>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "adapters/adapter_sources.h"
#include "base/status_macros.h"
#include "formats/model_config.h"
#include "server/model/weight_dtype.h"

namespace loraserve {
namespace {

// The model's config.json: the checkpoint's, or with --load-format dummy a
// preset's or a directory's whose shapes the random weights take.
absl::StatusOr<formats::ModelConfig> LoadConfig(const RuntimeConfig& config) {
  if (config.model.empty()) return absl::InvalidArgumentError("--model is required");
  if (config.load_format == "auto") return formats::LoadModelConfig(config.model);
  if (config.load_format != "dummy") {
    return absl::InvalidArgumentError(
        absl::StrCat("--load-format must be auto or dummy, got ", config.load_format));
  }
  absl::StatusOr<formats::ModelConfig> preset = formats::DummyPreset(config.model);
  if (preset.ok()) return preset;
  absl::StatusOr<formats::ModelConfig> from_dir = formats::LoadModelConfig(config.model);
  if (!from_dir.ok()) {
    return absl::NotFoundError(absl::StrCat(
        "--model ", config.model, " is neither a dummy preset (", preset.status().message(),
        ") nor a model directory (", from_dir.status().message(), ")"));
  }
  return from_dir;
}

absl::StatusOr<std::unique_ptr<kernels::Backend>> CreateBackend(
    const RuntimeConfig& config, const formats::ModelConfig& model_config) {
  ASSIGN_OR_RETURN(const kernels::DType weight_dtype,
                   model::ChooseWeightDType(config.dtype, config.quantization, model_config));
  if (config.device == "cuda") {
    // The CUDA backend stores bf16 (its default for auto, where f16
    // checkpoints stay f16) or float32.
    kernels::CudaBackendOptions options;
    if (config.dtype == "auto" && config.quantization == "none") {
      return kernels::CreateCudaBackend(options);
    }
    if (weight_dtype != kernels::DType::kBF16 && weight_dtype != kernels::DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--device cuda stores weights as bfloat16 or float32; --dtype ", config.dtype,
          " --quantization ", config.quantization, " runs on --device cpu only"));
    }
    options.weight_dtype = weight_dtype;
    return kernels::CreateCudaBackend(options);
  }
  if (config.device != "cpu") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device must be cpu or cuda, got ", config.device));
  }
  return kernels::CreateCpuBackend({.num_threads = config.threads, .weight_dtype = weight_dtype});
}

absl::StatusOr<std::unique_ptr<model::LlamaModel>> LoadModel(
    const RuntimeConfig& config, kernels::Backend* backend,
    const formats::ModelConfig& model_config) {
  model::LoadOptions options;
  const absl::Time start = absl::Now();
  int last_percent = -1;
  options.progress = [&](int64_t done, int64_t total) {
    if (total < (int64_t{256} << 20)) return;  // small models load at once
    const int percent = static_cast<int>(100 * done / total);
    if (percent / 10 != last_percent / 10) {
      absl::FPrintF(stderr, "\rloading weights: %3d%%", percent);
      last_percent = percent;
    }
  };
  absl::StatusOr<std::unique_ptr<model::LlamaModel>> loaded =
      config.load_format == "dummy"
          ? model::LlamaModel::CreateDummy(backend, model_config, /*seed=*/0, options)
          : model::LlamaModel::Load(backend, config.model, options);
  if (last_percent >= 0) absl::FPrintF(stderr, "\n");
  if (loaded.ok()) {
    (*loaded)->set_step_graphs(config.cuda_graphs);
    absl::FPrintF(stderr, "loaded %s: %d layers, hidden %d, %.2f GB of %s weights in %.1fs\n",
                  config.model, (*loaded)->config().num_hidden_layers,
                  (*loaded)->config().hidden_size, (*loaded)->weight_bytes() / 1e9,
                  kernels::DTypeName(backend->WeightDType(kernels::DType::kF32)),
                  absl::ToDoubleSeconds(absl::Now() - start));
  }
  return loaded;
}

absl::StatusOr<std::unique_ptr<adapters::AdapterRegistry>> CreateRegistry(
    const RuntimeConfig& config, const model::LlamaModel& llama) {
  std::function<absl::StatusOr<std::string>(const std::string&)> resolve;
  if (!config.adapter_resolver_dir.empty()) {
    std::error_code error;
    if (!std::filesystem::is_directory(config.adapter_resolver_dir, error)) {
      return absl::NotFoundError(absl::StrCat("--adapter-resolver-dir ",
                                              config.adapter_resolver_dir, " is not a directory"));
    }
    resolve =
        adapters::AdapterFolderResolver(config.adapter_resolver_dir, adapters::kDefaultTenant);
  }
  const absl::StatusOr<adapters::CompactionTarget> compaction =
      adapters::CompactionTargetFrom(config.compact_adapters_energy, std::nullopt);
  if (!compaction.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--compact-adapters-energy: ", compaction.status().message()));
  }
  ASSIGN_OR_RETURN(auto registry,
                   adapters::AdapterRegistry::Create(
                       {.base = llama.adapter_shape(),
                        .limits = {.max_rank = config.max_lora_rank},
                        .host_budget_bytes = static_cast<size_t>(config.adapter_host_bytes),
                        .resolve = resolve,
                        .compaction = *compaction}));
  const adapters::StartupLoad startup =
      config.lazy_adapter_load ? adapters::StartupLoad::kLazy : adapters::StartupLoad::kEager;
  if (!config.adapter_dir.empty()) {
    RETURN_IF_ERROR(adapters::LoadAdapterDir(*registry, config.adapter_dir, startup));
  }
  for (const std::string& spec : config.adapters) {
    RETURN_IF_ERROR(adapters::LoadAdapterSpec(*registry, spec, startup));
  }
  for (const std::string& id : config.pinned_adapters) RETURN_IF_ERROR(registry->Pin(id));
  const size_t loaded = registry->List().size();
  if (loaded > 0) {
    absl::FPrintF(stderr, "%d adapters %s\n", loaded,
                  config.lazy_adapter_load ? "registered (weights load on first use)" : "loaded");
  }
  return registry;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Runtime>> BuildRuntime(const RuntimeConfig& config) {
  auto runtime = std::make_unique<Runtime>();
  ASSIGN_OR_RETURN(const formats::ModelConfig model_config, LoadConfig(config));
  ASSIGN_OR_RETURN(runtime->backend, CreateBackend(config, model_config));
  ASSIGN_OR_RETURN(runtime->model, LoadModel(config, runtime->backend.get(), model_config));
  runtime->tokenizer_dir = config.tokenizer.empty() ? config.model : config.tokenizer;
  ASSIGN_OR_RETURN(runtime->tokenizer, model::Tokenizer::Load(runtime->tokenizer_dir));
  ASSIGN_OR_RETURN(runtime->registry, CreateRegistry(config, *runtime->model));
  runtime->device_adapters = std::make_unique<adapters::DeviceAdapterCache>(
      runtime->backend.get(), config.adapter_device_bytes);
  ASSIGN_OR_RETURN(runtime->kv_cache,
                   engine::KvCache::Create(runtime->backend.get(), runtime->model->kv_shape(),
                                           config.block_size, config.kv_cache_bytes));
  runtime->engine = std::make_unique<engine::Engine>(runtime->model.get(), runtime->tokenizer.get(),
                                                     runtime->kv_cache.get(),
                                                     runtime->device_adapters.get(), config.engine);
  return runtime;
}

}  // namespace loraserve
