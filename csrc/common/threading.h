// Parallel regions of the CPU kernels, run on the threads torch already uses (DESIGN.md rule 5).
//
// torch's CPU build parallelises with an OpenMP runtime (libgomp on Linux, libomp on macOS, or
// Intel's libiomp5) whose workers keep spinning for a while after every torch op. A kernel that
// ran on threads of its own right after a torch op would share the cores with those spinning
// workers (measured: +56% for a causal attention forward). So the kernels do not bring threads of
// their own when they can borrow torch's: the first parallel region looks among the libraries
// already loaded into the process for an OpenMP runtime (it is never loaded from here, and the
// wheel links none, so no second runtime can come in) and runs every region through its
// GOMP_parallel entry point (libgomp's ABI, which libomp and libiomp5 also export). A region
// started from the thread torch runs its ops on then lands on torch's own team, whose workers
// are the ones spinning. Without a loaded OpenMP runtime (a torch built without OpenMP, or the
// kernels called from elsewhere) the regions run on a small persistent std::thread pool.
//
// Either way a region hands out its tasks one at a time from a shared counter, so uneven tasks
// (causal attention tiles, say) balance themselves and a team smaller than asked for still runs
// every task. A region started inside another runs serially on its thread.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__APPLE__)
#include <dlfcn.h>
#include <mach-o/dyld.h>
#elif defined(__unix__)
#include <dlfcn.h>
#include <link.h>
#endif

namespace fusedlm {

namespace threading_detail {

// One parallel region: the tasks [0, n_tasks) of fn, and the first exception a task threw.
struct Job {
  Job(const std::function<void(int64_t)>& f, int64_t n) : fn(f), n_tasks(n) {}
  const std::function<void(int64_t)>& fn;
  const int64_t n_tasks;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
};

inline bool& in_region() {
  thread_local bool flag = false;
  return flag;
}

// Runs tasks of the job until none is left. Exceptions stay inside (they must not unwind
// through the OpenMP runtime's frames): the first is kept and rethrown by the region's caller.
inline void work(Job& job) {
  const bool outer = in_region();
  in_region() = true;
  for (int64_t t = job.next.fetch_add(1); t < job.n_tasks; t = job.next.fetch_add(1)) {
    try {
      job.fn(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mutex);
      if (!job.error) job.error = std::current_exception();
    }
  }
  in_region() = outer;
}

// ---- the OpenMP runtime already in the process ----------------------------------------------

// GOMP_parallel(fn, data, num_threads, flags): runs fn(data) on a team of num_threads threads,
// the caller included, and returns when all have finished.
using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct OpenMp {
  GompParallel parallel = nullptr;
  std::string library;  // the path of the runtime, for thread_runtime()
};

// Is `path` (a loaded library) an OpenMP runtime? libgomp.so.1, libgomp-<hash>.so.1 (auditwheel's
// renaming), libomp.so / .dylib, libiomp5.so.
inline bool is_openmp_runtime(const char* path) {
  if (path == nullptr) return false;
  const char* slash = std::strrchr(path, '/');
  const char* base = slash ? slash + 1 : path;
  for (const char* prefix : {"libgomp", "libiomp5", "libomp."})
    if (std::strncmp(base, prefix, std::strlen(prefix)) == 0) return true;
  return false;
}

#if defined(__unix__) && !defined(__APPLE__)
inline int find_loaded_openmp(dl_phdr_info* info, size_t, void* out) {
  if (!is_openmp_runtime(info->dlpi_name)) return 0;
  *static_cast<std::string*>(out) = info->dlpi_name;
  return 1;  // stop at the first, the one loaded earliest
}
#endif

// The path of the first OpenMP runtime loaded into this process, or "".
inline std::string loaded_openmp_path() {
  std::string path;
#if defined(__APPLE__)
  for (uint32_t i = 0, n = _dyld_image_count(); i < n && path.empty(); ++i)
    if (is_openmp_runtime(_dyld_get_image_name(i))) path = _dyld_get_image_name(i);
#elif defined(__unix__)
  dl_iterate_phdr(find_loaded_openmp, &path);
#endif
  return path;
}

inline OpenMp resolve_openmp() {
  OpenMp omp;
#if defined(__unix__) || defined(__APPLE__)
  const std::string path = loaded_openmp_path();
  if (path.empty()) return omp;
  // RTLD_NOLOAD: a handle to the copy already loaded, never a new one. The handle is kept: it
  // holds a reference, so the runtime stays loaded as long as this process uses it.
  void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return omp;
  omp.parallel = reinterpret_cast<GompParallel>(dlsym(handle, "GOMP_parallel"));
  if (omp.parallel != nullptr) omp.library = path;
#endif
  return omp;
}

// Resolved at the first parallel region, when torch (which fusedlm.ops imports first) has loaded
// its runtime.
inline const OpenMp& openmp() {
  static const OpenMp omp = resolve_openmp();
  return omp;
}

inline void run_openmp_task(void* job) { work(*static_cast<Job*>(job)); }

// ---- the fallback: a persistent pool of std::threads ----------------------------------------

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();  // never destroyed: workers may outlive statics
    return *pool;
  }

  // Runs the job on `helpers` pool threads and the caller.
  void run(Job& job, int helpers) {
    std::lock_guard<std::mutex> one_region_at_a_time(run_mutex_);
    grow(helpers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      active_ = helpers;
      helpers_left_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    work(job);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return helpers_left_ == 0; });
    job_ = nullptr;
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(workers_.size()) < helpers) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
      workers_.back().detach();
    }
  }

  void loop(int index) {
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
      std::lock_guard<std::mutex> lock(mutex_);
      if (--helpers_left_ == 0) done_.notify_all();
    }
  }

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  int active_ = 0;
  int helpers_left_ = 0;  // guarded by mutex_
  uint64_t generation_ = 0;
};

}  // namespace threading_detail

// [0, n_items) split into tasks of at least `grain` items (the last may be shorter), for parallel_for.
struct Tasks {
  int64_t per_task, count;
  Tasks(int64_t n_items, int64_t grain)
      : per_task(std::max<int64_t>(grain, 1)), count((n_items + per_task - 1) / per_task) {}
  int64_t begin(int64_t task) const { return task * per_task; }
  int64_t end(int64_t task, int64_t n_items) const { return std::min(n_items, (task + 1) * per_task); }
};

// Runs fn(task) for every task in [0, n_tasks) on up to num_threads threads, the caller included
// (see the top of this file for which threads). Rethrows the first exception a task threw.
inline void parallel_for(int64_t n_tasks, int num_threads, const std::function<void(int64_t)>& fn) {
  using namespace threading_detail;
  if (n_tasks <= 0) return;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), n_tasks));
  Job job(fn, n_tasks);
  if (threads <= 1 || in_region()) {
    work(job);
  } else if (const OpenMp& omp = openmp(); omp.parallel != nullptr) {
    omp.parallel(run_openmp_task, &job, static_cast<unsigned>(threads), 0);
  } else {
    ThreadPool::instance().run(job, threads - 1);
  }
  if (job.error) std::rethrow_exception(job.error);
}

// Where parallel regions run: "openmp <path of the runtime>" or "std::thread pool".
inline std::string thread_runtime() {
  const threading_detail::OpenMp& omp = threading_detail::openmp();
  return omp.parallel != nullptr ? "openmp " + omp.library : "std::thread pool";
}

}  // namespace fusedlm
