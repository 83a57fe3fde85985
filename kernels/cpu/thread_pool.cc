#include "kernels/cpu/thread_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>

namespace loraserve::kernels {
namespace {

// Spins until `ready()` or kSpinMicros have passed; returns ready().
template <typename Ready>
bool SpinUntil(Ready ready, int64_t micros) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  while (!ready()) {
    for (int i = 0; i < 64; ++i) _mm_pause();
    if (std::chrono::steady_clock::now() >= deadline) return ready();
  }
  return true;
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  work_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             absl::FunctionRef<void(int64_t, int64_t)> fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (workers_.empty() || n < 2 * grain) {
    fn(0, n);
    return;
  }
  // A few ranges per thread balance uneven items (attention rows of
  // different lengths) without making the shared counter hot.
  const int64_t ranges_wanted = 4 * static_cast<int64_t>(num_threads());
  fn_ = &fn;
  n_ = n;
  chunk_ = std::max(grain, (n + ranges_wanted - 1) / ranges_wanted);
  next_.store(0, std::memory_order_relaxed);
  busy_workers_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  if (sleeping_workers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    work_cv_.notify_all();
  }
  RunRanges();
  const auto done = [this] { return busy_workers_.load(std::memory_order_acquire) == 0; };
  if (!SpinUntil(done, kSpinMicros)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, done);
  }
  fn_ = nullptr;
}

void ThreadPool::RunRanges() {
  while (true) {
    const int64_t begin = next_.fetch_add(chunk_, std::memory_order_relaxed);
    if (begin >= n_) return;
    (*fn_)(begin, std::min(begin + chunk_, n_));
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  const auto has_work = [&] {
    return stop_.load() || generation_.load(std::memory_order_acquire) != seen;
  };
  while (true) {
    if (!SpinUntil(has_work, kSpinMicros)) {
      std::unique_lock<std::mutex> lock(mu_);
      sleeping_workers_.fetch_add(1);
      work_cv_.wait(lock, has_work);
      sleeping_workers_.fetch_sub(1);
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    RunRanges();
    // The caller waits for every worker, so no worker can miss a job.
    if (busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
  }
}

}  // namespace loraserve::kernels
