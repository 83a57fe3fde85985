// One thread that runs jobs in the order they were queued, for work a gRPC
// callback thread must not wait on (reading adapter files from disk).
//
// Threading: Run may be called from any thread. The destructor runs the jobs
// still queued, then joins the thread.
//
// Example:
//   JobQueue jobs;
//   jobs.Run([reactor] { reactor->Finish(ToGrpcStatus(SlowWork())); });
#ifndef LORASERVE_SERVER_API_JOB_QUEUE_H_
#define LORASERVE_SERVER_API_JOB_QUEUE_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>

namespace loraserve::api {

class JobQueue {
 public:
  JobQueue() : thread_([this] { Loop(); }) {}
  ~JobQueue() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    work_.notify_one();
    thread_.join();
  }
  JobQueue(const JobQueue&) = delete;
  JobQueue& operator=(const JobQueue&) = delete;

  void Run(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(std::move(job));
    }
    work_.notify_one();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      work_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
      if (jobs_.empty()) return;  // stopping, and nothing is left to do
      std::function<void()> job = std::move(jobs_.front());
      jobs_.pop_front();
      lock.unlock();
      job();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable work_;
  std::deque<std::function<void()>> jobs_;  // guarded by mu_
  bool stop_ = false;                       // guarded by mu_
  std::thread thread_;                      // last: started once the rest exists
};

}  // namespace loraserve::api

#endif  // LORASERVE_SERVER_API_JOB_QUEUE_H_
