// A small persistent thread pool for the CPU kernels.
//
// torch's CPU build brings its own OpenMP runtime; linking a second one makes the two fight
// over the cores (DESIGN.md rule 5). The kernels therefore use this pool, sized per call by the
// thread count Python passes in (torch.get_num_threads()).
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace fusedlm {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();  // never destroyed: workers may outlive statics
    return *pool;
  }

  // Runs fn(task) for every task in [0, n_tasks) on up to num_threads threads, the caller
  // included. Tasks are handed out one at a time from a shared counter, so uneven tasks
  // (causal attention tiles, say) balance themselves. Nested calls run serially.
  void run(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn) {
    if (n_tasks <= 0) return;
    int helpers = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), n_tasks)) - 1;
    if (helpers <= 0 || in_worker()) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> one_region_at_a_time(run_mutex_);
    grow(helpers);
    Job job(fn, n_tasks, helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    work(job);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [&] { return job.helpers_left == 0; });
      job_ = nullptr;
    }
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  struct Job {
    Job(const std::function<void(int64_t)>& f, int64_t n, int helpers)
        : fn(f), n_tasks(n), helpers_left(helpers) {}
    const std::function<void(int64_t)>& fn;
    const int64_t n_tasks;
    std::atomic<int64_t> next{0};
    int helpers_left;  // guarded by mutex_
    std::exception_ptr error;
    std::mutex error_mutex;
  };

  static bool& in_worker() {
    thread_local bool flag = false;
    return flag;
  }

  static void work(Job& job) {
    for (int64_t t = job.next.fetch_add(1); t < job.n_tasks; t = job.next.fetch_add(1)) {
      try {
        job.fn(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(job.error_mutex);
        if (!job.error) job.error = std::current_exception();
      }
    }
  }

  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
      workers_.back().detach();
    }
  }

  void loop(int index) {
    in_worker() = true;
    uint64_t seen = 0;
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= active_) continue;  // not needed for this region
        job = job_;
      }
      work(*job);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--job->helpers_left == 0) done_.notify_all();
      }
    }
  }

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  int active_ = 0;
  uint64_t generation_ = 0;
};

inline void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn) {
  ThreadPool::instance().run(n_tasks, num_threads, fn);
}

}  // namespace fusedlm
