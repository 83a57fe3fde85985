#include "kernels/cuda/step_graphs.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace loraserve::kernels::cuda {
namespace {

// A key whose recordings keep failing before a replay runs is captured this
// often in a row, then runs without a graph.
constexpr int kMaxCaptures = 4;
// Recorded graphs kept at once; past this all are dropped and recaptured.
constexpr size_t kMaxStepGraphs = 256;
// First size of the LoRA table arena; doubled when a capture runs out. 16 MiB
// holds the 448 tables of an 8B model's step at 256 requests.
constexpr size_t kInitialArenaBytes = size_t{16} << 20;

size_t AlignUp(size_t bytes, size_t alignment) {
  return (bytes + alignment - 1) / alignment * alignment;
}

}  // namespace

StepGraphs::StepGraphs() : arena_wanted_bytes_(kInitialArenaBytes) {}

StepGraphs::~StepGraphs() {
  // Nothing to report to: errors on the way out are ignored.
  DropGraphs();
  if (arena_copied_ != nullptr) cudaEventDestroy(arena_copied_);
}

absl::Status StepGraphs::Init(cudaStream_t stream) {
  stream_ = stream;
  CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&arena_copied_, cudaEventDisableTiming));
  return absl::OkStatus();
}

absl::Status StepGraphs::RefuseInStep(absl::string_view what) const {
  if (mode_ == StepMode::kEager) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("CudaBackend: ", what, " inside a step (between BeginStep and EndStep)"));
}

absl::Status StepGraphs::BeginStep(uint64_t key, int32_t max_segments) {
  // The host arena is rewritten below: the last step's copy must be done.
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(arena_copied_));
  StepGraph& graph = graphs_[key];
  if (graph.max_segments != max_segments) {
    if (graph.exec != nullptr) cudaGraphExecDestroy(graph.exec);
    graph = StepGraph{};
    graph.max_segments = max_segments;
  }
  step_key_ = key;
  step_max_segments_ = max_segments;
  table_stride_ = AlignUp(LoraTableBytes(max_segments), 256);
  tables_used_ = 0;
  arena_overflowed_ = false;
  call_index_ = 0;
  if (graph.exec != nullptr) {
    replaying_ = &graph;
    mode_ = StepMode::kReplay;
    return absl::OkStatus();
  }
  if (graph.captures >= kMaxCaptures) {
    return absl::FailedPreconditionError(absl::StrCat("CudaBackend: step key ", key,
                                                      " changed after each of ", kMaxCaptures,
                                                      " captures; it runs without a graph"));
  }
  // Dropping graphs (too many, or the arena moves) keeps this key's count.
  const int captures = graph.captures;
  if (graphs_.size() > kMaxStepGraphs) DropGraphs();
  CUDA_RETURN_IF_ERROR(GrowArena(arena_wanted_bytes_));
  StepGraph& entry = graphs_[key];
  entry.max_segments = max_segments;
  entry.captures = captures + 1;
  recording_ = StepGraph{};
  CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  mode_ = StepMode::kCapture;
  return absl::OkStatus();
}

absl::Status StepGraphs::EndStep() {
  if (mode_ == StepMode::kReplay) {
    if (call_index_ != replaying_->calls.size()) {
      return absl::FailedPreconditionError(
          absl::StrCat("CudaBackend::EndStep: the step made ", call_index_,
                       " calls; its recorded graph has ", replaying_->calls.size()));
    }
    const cudaGraphExec_t exec = replaying_->exec;
    mode_ = StepMode::kEager;
    replaying_ = nullptr;
    CUDA_RETURN_IF_ERROR(LaunchStep(exec));
    // kMaxCaptures counts captures in a row that never replay: one that
    // did (and later broke, e.g. when a buffer moved) starts afresh.
    graphs_[step_key_].captures = 0;
    return absl::OkStatus();
  }
  if (mode_ != StepMode::kCapture) {
    return absl::FailedPreconditionError("CudaBackend::EndStep without BeginStep");
  }
  mode_ = StepMode::kEager;
  cudaGraph_t captured = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream_, &captured);
  CUDA_RETURN_IF_ERROR(ended);  // an invalidated capture (the error is cleared)
  cudaGraphExec_t exec = nullptr;
  const cudaError_t instantiated = cudaGraphInstantiate(&exec, captured, 0);
  cudaGraphDestroy(captured);
  CUDA_RETURN_IF_ERROR(instantiated);
  StepGraph& graph = graphs_[step_key_];
  graph.exec = exec;
  graph.calls = std::move(recording_.calls);
  graph.max_segments = step_max_segments_;
  return LaunchStep(exec);
}

void StepGraphs::AbortStep() {
  if (mode_ == StepMode::kCapture) {
    cudaGraph_t captured = nullptr;
    cudaStreamEndCapture(stream_, &captured);  // fails when the capture was invalidated
    if (captured != nullptr) cudaGraphDestroy(captured);
    cudaGetLastError();  // the capture's errors are not the next call's
    // A capture that ran out of arena is retried with a larger one and
    // does not count against the key.
    if (arena_overflowed_) --graphs_[step_key_].captures;
  } else if (mode_ == StepMode::kReplay) {
    // The recording no longer fits the caller's steps: capture it again.
    auto it = graphs_.find(step_key_);
    if (it != graphs_.end() && it->second.exec != nullptr) {
      cudaGraphExecDestroy(it->second.exec);
      it->second.exec = nullptr;
      it->second.calls.clear();
    }
  }
  mode_ = StepMode::kEager;
  replaying_ = nullptr;
  recording_ = StepGraph{};
}

absl::StatusOr<const DeviceLoraTable*> StepGraphs::StageTable(const char* op,
                                                              const LoraSegment* segments,
                                                              int32_t num_segments) {
  const size_t offset = static_cast<size_t>(tables_used_) * table_stride_;
  if (offset + table_stride_ > arena_.bytes()) {
    arena_wanted_bytes_ = std::max(arena_wanted_bytes_, 2 * arena_.bytes());
    arena_overflowed_ = true;
    return absl::ResourceExhaustedError(
        absl::StrCat("CudaBackend::", op, ": the step's LoRA tables outgrew the arena of ",
                     arena_.bytes(), " bytes (it grows before the next capture)"));
  }
  FillLoraTable(segments, num_segments, reinterpret_cast<DeviceLoraTable*>(arena_.host() + offset));
  ++tables_used_;
  return reinterpret_cast<const DeviceLoraTable*>(arena_.device() + offset);
}

absl::Status StepGraphs::CheckReplayedCall(const char* op, uint64_t signature) {
  const std::vector<uint64_t>& calls = replaying_->calls;
  if (call_index_ >= calls.size() || calls[call_index_] != signature) {
    return absl::FailedPreconditionError(
        absl::StrCat("CudaBackend::", op, ": call ", call_index_,
                     " of the step differs from its recorded graph"));
  }
  ++call_index_;
  return absl::OkStatus();
}

absl::Status StepGraphs::GrowArena(size_t bytes) {
  if (bytes <= arena_.bytes()) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  DropGraphs();
  return arena_.Reserve(bytes);
}

void StepGraphs::DropGraphs() {
  for (auto& [key, graph] : graphs_) {
    if (graph.exec != nullptr) cudaGraphExecDestroy(graph.exec);
  }
  graphs_.clear();
}

absl::Status StepGraphs::LaunchStep(cudaGraphExec_t exec) {
  if (tables_used_ > 0) {
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(arena_.device(), arena_.host(),
                                         static_cast<size_t>(tables_used_) * table_stride_,
                                         cudaMemcpyHostToDevice, stream_));
  }
  // The next step writes the host arena only after this copy is done.
  CUDA_RETURN_IF_ERROR(cudaEventRecord(arena_copied_, stream_));
  CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, stream_));
  return absl::OkStatus();
}

}  // namespace loraserve::kernels::cuda
