#include "bench/bench_support.h"

#include <algorithm>
#include <cstdio>

#include "absl/flags/parse.h"
#include "base/flag_names.h"
#include "base/status_macros.h"

namespace loraserve::bench {

absl::StatusOr<BenchModel> LoadBenchModel(kernels::Backend* backend, const std::string& preset,
                                          const std::string& dir) {
  BenchModel loaded;
  if (!preset.empty()) {
    loaded.name = preset;
    ASSIGN_OR_RETURN(model::ModelConfig config, model::DummyPreset(preset));
    ASSIGN_OR_RETURN(loaded.model, model::LlamaModel::CreateDummy(backend, config, 0, {}));
  } else {
    loaded.name = dir;
    ASSIGN_OR_RETURN(loaded.model, model::LlamaModel::Load(backend, dir, {}));
  }
  return loaded;
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0.0 : values[values.size() / 2];
}

int BenchMain(int argc, char** argv, const char* name, absl::Status (*run)()) {
  std::vector<std::string> normalized = DashesToUnderscores(argc, argv);
  std::vector<char*> normalized_argv = ArgvOf(normalized);
  absl::ParseCommandLine(static_cast<int>(normalized_argv.size()), normalized_argv.data());
  const absl::Status status = run();
  if (!status.ok()) {
    std::fprintf(stderr, "%s: %s\n", name, status.ToString().c_str());
    return 1;
  }
  return 0;
}

}  // namespace loraserve::bench
