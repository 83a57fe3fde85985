// A small persistent thread pool for the CPU backend's own loops.
//
// The pool owns `num_threads - 1` worker threads; the thread that calls
// ParallelFor works too, so `num_threads` cores are busy during a loop.
// Between loops a worker spins for a short while (kSpinMicros) before it
// sleeps on a condition variable, and the caller likewise waits for the last
// worker: a decode step runs a few hundred short loops (about 150 GEMMs of a
// 1B model), and a futex wake-up per loop costs tens of microseconds in a
// VM, a tenth of an int8 step. Idle longer than that, no core is held.
//
// Threading: ParallelFor may be called by one thread at a time (the backend's
// user, the engine loop) and must not be called from inside `fn`.
//
// Example:
//   ThreadPool pool(2);
//   pool.ParallelFor(rows, /*grain=*/16, [&](int64_t begin, int64_t end) {
//     for (int64_t r = begin; r < end; ++r) NormalizeRow(r);
//   });
#ifndef LORASERVE_KERNELS_CPU_THREAD_POOL_H_
#define LORASERVE_KERNELS_CPU_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"

namespace loraserve::kernels {

class ThreadPool {
 public:
  // `num_threads` >= 1 counts the calling thread.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) on disjoint ranges that together cover [0, n) and
  // returns when all calls have returned. Ranges hold at least `grain` items
  // (except the last), so a loop shorter than two grains runs inline.
  void ParallelFor(int64_t n, int64_t grain, absl::FunctionRef<void(int64_t, int64_t)> fn);

 private:
  void WorkerLoop();
  // Claims ranges of the current job until none is left.
  void RunRanges();

  std::vector<std::thread> workers_;

  // How long a worker, or the caller, spins before it sleeps.
  static constexpr int64_t kSpinMicros = 200;

  // Sleeping and waking go through mu_ and the condition variables; the
  // counts are atomics so that spinning needs no lock. A thread that sleeps
  // checks its condition under mu_, and a thread that changes a count takes
  // mu_ before it notifies, so no wake-up is lost.
  std::mutex mu_;
  std::condition_variable work_cv_;       // a new job or stop_
  std::condition_variable done_cv_;       // busy_workers_ reached 0
  std::atomic<uint64_t> generation_{0};   // bumped per job (release)
  std::atomic<int> busy_workers_{0};      // workers still in the job
  std::atomic<int> sleeping_workers_{0};  // workers waiting on work_cv_
  std::atomic<bool> stop_{false};

  // The current job; written before generation_ is bumped, read by workers
  // after they observe the bump.
  const absl::FunctionRef<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int64_t chunk_ = 0;
  std::atomic<int64_t> next_{0};
};

}  // namespace loraserve::kernels

#endif  // LORASERVE_KERNELS_CPU_THREAD_POOL_H_
