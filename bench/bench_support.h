// Pieces every benchmark binary shares: the model under test (a checkpoint
// directory or a dummy preset), medians, and flag parsing with dashes.
#ifndef LORASERVE_BENCH_BENCH_SUPPORT_H_
#define LORASERVE_BENCH_BENCH_SUPPORT_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "server/model/llama_model.h"

namespace loraserve::bench {

struct BenchModel {
  std::unique_ptr<model::LlamaModel> model;
  std::string name;  // the preset or directory
};

// `preset` (random weights, seed 0) when non-empty, else the checkpoint in `dir`.
absl::StatusOr<BenchModel> LoadBenchModel(kernels::Backend* backend, const std::string& preset,
                                          const std::string& dir);

double Median(std::vector<double> values);

// A benchmark's main: parses flags (`--dashed-names` accepted), runs `run`,
// prints its error as "<name>: ..." and returns the exit code.
int BenchMain(int argc, char** argv, const char* name, absl::Status (*run)());

}  // namespace loraserve::bench

#endif  // LORASERVE_BENCH_BENCH_SUPPORT_H_
