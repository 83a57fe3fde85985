// The CUDA backend's step graphs (Backend::BeginStep/EndStep/AbortStep).
// Private to kernels/cuda.
//
// Between BeginStep and EndStep the operations are captured into a CUDA graph
// (first time a key is seen) or only checked against the captured calls
// (later times), and EndStep launches the graph. Each call's launch-relevant
// arguments are hashed into a signature; a replay launches the graph only
// when every signature matches, so a graph never runs with pointers or sizes
// other than those it was captured with. LoRA segment tables, the one
// per-call host input, go to a pinned arena whose device twin the captured
// kernels read; its used part is copied before each launch.
//
// Ownership: StepGraphs owns the recorded graphs, the LoRA table arena and
// the event that marks the arena's last copy; the stream it captures from and
// launches on is its backend's. One thread at a time, with the backend's
// device current (the backend makes it so before each call).
//
// Example (in the backend):
//   CUDA_RETURN_IF_ERROR(steps_.Init(stream_));
//   return steps_.Launch(kOp, [&] { return cuda::AddInPlace(x, y, count, stream_); }, x, y, count);
#ifndef LORASERVE_KERNELS_CUDA_STEP_GRAPHS_H_
#define LORASERVE_KERNELS_CUDA_STEP_GRAPHS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/lora.h"
#include "kernels/cuda/pinned_mirror.h"

namespace loraserve::kernels::cuda {

// --- call signatures -----------------------------------------------------------

inline uint64_t MixWord(uint64_t h, uint64_t word) {
  // splitmix64 of the running value and the word: a 64-bit signature per call.
  uint64_t x = h ^ (word + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2));
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
inline uint64_t SignatureWord(const void* p) { return reinterpret_cast<uintptr_t>(p); }
inline uint64_t SignatureWord(int64_t v) { return static_cast<uint64_t>(v); }
inline uint64_t SignatureWord(int32_t v) { return static_cast<uint64_t>(static_cast<int64_t>(v)); }
inline uint64_t SignatureWord(bool v) { return v ? 1 : 0; }
inline uint64_t SignatureWord(DType v) { return static_cast<uint64_t>(v); }
inline uint64_t SignatureWord(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// The signature of one operation call: its name's address, then every
// argument that shapes its launch, in order.
template <typename... Args>
uint64_t CallSignature(const char* op, const Args&... args) {
  uint64_t h = SignatureWord(static_cast<const void*>(op));
  ((h = MixWord(h, SignatureWord(args))), ...);
  return h;
}

// --- step graphs ---------------------------------------------------------------

class StepGraphs {
 public:
  StepGraphs();
  StepGraphs(const StepGraphs&) = delete;
  StepGraphs& operator=(const StepGraphs&) = delete;
  // Destroys the recorded graphs. A step in progress must have been ended
  // with AbortStep while the stream still existed.
  ~StepGraphs();

  // Takes the stream steps are captured from and launched on; it outlives
  // this object's last call.
  absl::Status Init(cudaStream_t stream);

  // Whether a step is in progress (being captured or replayed).
  bool in_step() const { return mode_ != StepMode::kEager; }
  // The step's max_segments (BeginStep); meaningful inside a step.
  int32_t max_segments() const { return step_max_segments_; }

  // Fails inside a step, where only operations may be called.
  absl::Status RefuseInStep(absl::string_view what) const;

  // Backend::BeginStep/EndStep/AbortStep, after the backend's own checks
  // (BeginStep: outside a step, max_segments >= 0).
  absl::Status BeginStep(uint64_t key, int32_t max_segments);
  absl::Status EndStep();
  void AbortStep();

  // Runs `launch`, which queues kernels on the stream, as the step mode says:
  // now, into the graph being captured, or (replaying) not at all once the
  // call's signature is checked against the recording. `args` are every
  // argument that shapes the launch (pointers, sizes, scalars).
  template <typename Fn, typename... Args>
  absl::Status Launch(const char* op, Fn launch, const Args&... args) {
    if (mode_ != StepMode::kEager) {
      const uint64_t signature = CallSignature(op, args...);
      if (mode_ == StepMode::kReplay) return CheckReplayedCall(op, signature);
      recording_.calls.push_back(signature);
    }
    return ToStatus(launch(), op);
  }

  // Inside a step, the segment table of one LoRA call (at most
  // max_segments() segments): the next table of the arena, which EndStep
  // copies in one piece before the graph runs.
  absl::StatusOr<const DeviceLoraTable*> StageTable(const char* op, const LoraSegment* segments,
                                                    int32_t num_segments);

 private:
  enum class StepMode { kEager, kCapture, kReplay };
  struct StepGraph {
    cudaGraphExec_t exec = nullptr;  // null: not recorded (or given up on)
    std::vector<uint64_t> calls;     // signature of every operation call, in order
    int32_t max_segments = 0;
    int captures = 0;  // captures since this key's last replay that ran
  };

  // A replayed call: its signature must be the recording's next one.
  absl::Status CheckReplayedCall(const char* op, uint64_t signature);

  // Makes the arena at least `bytes`; recorded graphs point into the old one,
  // so they are all dropped when it moves.
  absl::Status GrowArena(size_t bytes);

  void DropGraphs();

  // Copies the step's LoRA tables and launches `exec` after them.
  absl::Status LaunchStep(cudaGraphExec_t exec);

  cudaStream_t stream_ = nullptr;
  StepMode mode_ = StepMode::kEager;
  std::unordered_map<uint64_t, StepGraph> graphs_;
  uint64_t step_key_ = 0;
  StepGraph recording_;                   // the calls of the step being captured
  const StepGraph* replaying_ = nullptr;  // the graph of the step being replayed
  size_t call_index_ = 0;                 // calls checked so far in a replay
  int32_t step_max_segments_ = 0;
  size_t table_stride_ = 0;  // bytes per LoRA table in the arena
  int32_t tables_used_ = 0;  // LoRA tables of this step so far
  PinnedMirror arena_;       // LoRA tables of a step; the captured kernels read its device side
  size_t arena_wanted_bytes_;
  bool arena_overflowed_ = false;  // this step's capture ran out of arena (not the key's fault)
  cudaEvent_t arena_copied_ = nullptr;  // the last step's arena copy is done
};

}  // namespace loraserve::kernels::cuda

#endif  // LORASERVE_KERNELS_CUDA_STEP_GRAPHS_H_
