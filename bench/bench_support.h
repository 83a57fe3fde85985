// Pieces every benchmark binary shares: the model under test (a checkpoint
// directory or a dummy preset), the bytes a decode step must move and the
// host's read bandwidth (a step's floor), medians, and flag parsing with
// dashes.
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
  std::unique_ptr<kernels::Backend> backend;  // declared first: outlives the model
  std::unique_ptr<model::LlamaModel> model;
  std::string name;  // the preset or directory
};

struct BenchModelOptions {
  std::string preset;  // random weights (seed 0) of this preset when non-empty,
  std::string dir;     // else the checkpoint in this directory
  int threads = 0;     // CPU threads (0 = all cores)
  // Weight storage as the server's --dtype and --quantization choose it
  // (server/model/weight_dtype.h).
  std::string dtype = "auto";
  std::string quantization = "none";
};

// The model under test on a CPU backend.
absl::StatusOr<BenchModel> LoadCpuBenchModel(const BenchModelOptions& options);

// Bytes one decode step of `batch` requests must read or write at least once:
// every weight (the untied embedding table only for its gathered rows), the
// KV cache of `context` positions per request read by attention, the
// adapters' A and B (`adapter_bytes` in all), and the logits. Weights are in
// `backend`'s weight dtype.
double DecodeStepBytes(const kernels::Backend& backend, const model::LlamaModel& model,
                       int32_t batch, int32_t context, double adapter_bytes);

// Host memory read bandwidth in bytes/s: `threads` threads (0 = one per core)
// each summing its share of a 1 GiB buffer in the widest vector loads
// the CPU has (as the GEMM kernels read weights), the best of 5 passes (a ceiling:
// on a shared machine slow passes are other tenants' traffic). A CPU decode
// step streams its weights from memory, so moved bytes over this is the
// step's floor.
double HostReadBandwidth(int threads);

double Median(std::vector<double> values);
// The value at quantile `p` in [0, 1] of `values` (nearest rank); 0 when empty.
double Percentile(std::vector<double> values, double p);

// A benchmark's main: parses flags (`--dashed-names` accepted), runs `run`,
// prints its error as "<name>: ..." and returns the exit code.
int BenchMain(int argc, char** argv, const char* name, absl::Status (*run)());

}  // namespace loraserve::bench

#endif  // LORASERVE_BENCH_BENCH_SUPPORT_H_
