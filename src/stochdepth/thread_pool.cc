// The persistent CPU worker pool and parallel_for, plus the thread-count and parallel-threshold
// settings. Fork-safe (a child starts its own pool) and safe when threads cannot start (fewer
// parts). Not here: what a part computes (cpu_run.cc) or which ISA runs it (isa.cc).
#include "thread_pool.h"

#include "env.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

namespace stochdepth {
namespace {

int default_threads() {
  const int cores = static_cast<int>(
      std::min<unsigned>(std::max(1u, std::thread::hardware_concurrency()), kMaxThreads));
  return static_cast<int>(env_int("STOCHDEPTH_NUM_THREADS", 1, kMaxThreads, cores));
}

std::atomic<int> g_threads{0};  // 0: not initialised yet
// Below this many bytes moved a call stays on the calling thread. Waking a parked worker costs
// 70-130 us on the 2-core VM of benchmarks/RESULTS.md (an idle vCPU is slow to wake), so a second
// thread pays off only from about 8 MB (measured there: 6.3 MB moved, 122 us on one thread vs
// 205 us on two; 12.6 MB, 440 us vs 356 us).
std::atomic<int64_t> g_parallel_threshold{8 << 20};

// A persistent pool of worker threads, so that a call does not start threads (~120 us each on the
// VM of benchmarks/RESULTS.md, a little more than waking a parked one). One call uses the pool at
// a time; a concurrent call (another Python thread) finds it busy and runs on its own thread
// instead of waiting.
class Pool {
 public:
  // Size in parts: the workers plus the calling thread.
  int size() const { return static_cast<int>(threads_.size()) + 1; }
  std::mutex& busy() { return busy_; }

  // Starts workers until there are `workers`, in place: a call running meanwhile uses parts
  // below the new workers' indices, which therefore skip it. A thread that cannot start (a
  // thread or memory limit) leaves the pool smaller, not broken; a later call tries again.
  // Needs the pool's registry lock (g_pool_mutex) held: size() is read under it.
  void grow(int workers) {
    while (static_cast<int>(threads_.size()) < workers) {
      const int part = size();
      try {
        threads_.emplace_back([this, part] { loop(part); });
      } catch (const std::system_error&) {
        return;
      } catch (const std::bad_alloc&) {
        return;
      }
    }
  }

  // Runs fn(part) for part in [0, parts), part 0 on the calling thread. Needs busy() held and
  // parts <= size().
  void run(int parts, const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(m_);
      fn_ = &fn;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    // The workers hold a pointer to `fn`: whatever part 0 does, wait for them before returning.
    std::exception_ptr error;
    try {
      fn(0);
    } catch (...) {
      error = std::current_exception();
    }
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
    if (!error) error = worker_error_;
    worker_error_ = nullptr;
    if (error) std::rethrow_exception(error);
  }

 private:
  void loop(int part) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (part >= parts_) continue;  // this call uses fewer parts
        fn = fn_;
      }
      std::exception_ptr error;
      try {  // an exception leaving a thread would terminate the process: hand it to the caller
        (*fn)(part);
      } catch (...) {
        error = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(m_);
      if (error && !worker_error_) worker_error_ = error;
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  std::exception_ptr worker_error_;
  int parts_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

std::mutex g_pool_mutex;  // guards g_pool (creation, growth, replacement after fork)
// Never destroyed, nor replaced while its workers live: a condition variable that a worker waits
// on is never destroyed (glibc's pthread_cond_destroy would wait for that waiter for good), and
// the workers park in it until the process exits. Only a forked child, which has no workers,
// drops its copy (leaked, not destroyed) and starts its own.
Pool* g_pool = nullptr;

// A forked child has the parent's Pool object but none of its threads: forget it (leak it, its
// std::thread objects must not be destroyed) and let the child start its own.
void forget_pool_in_child() {
  new (&g_pool_mutex) std::mutex();
  g_pool = nullptr;
}

// The pool, grown towards `threads` parts; `parts` is how many it has, at most `threads`.
Pool* pool_for(int threads, int& parts) {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, &forget_pool_in_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool) g_pool = new Pool();
  if (g_pool->size() < threads) g_pool->grow(threads - 1);
  parts = std::min(threads, g_pool->size());
  return g_pool;
}

}  // namespace

int num_threads() {
  int n = g_threads.load();
  if (n == 0) {
    n = default_threads();
    g_threads.store(n);
  }
  return n;
}

void set_num_threads(int64_t n) {
  if (n < 1 || n > kMaxThreads) {
    throw std::invalid_argument("num_threads must be an integer in [1, " +
                                std::to_string(kMaxThreads) + "], got " + std::to_string(n));
  }
  g_threads.store(static_cast<int>(n));
}

int64_t parallel_threshold_bytes() { return g_parallel_threshold.load(); }

void set_parallel_threshold_bytes(int64_t bytes) {
  g_parallel_threshold.store(std::max<int64_t>(0, bytes));
}

int threads_for(int64_t bytes_moved) {
  return bytes_moved >= parallel_threshold_bytes() ? num_threads() : 1;
}

void parallel_for(int64_t total, int64_t grain, int threads, RangeFn fn) {
  const int64_t max_chunks = (total + grain - 1) / grain;
  int n = static_cast<int>(std::min<int64_t>(threads, max_chunks));
  if (n <= 1) {
    fn(int64_t{0}, total);
    return;
  }
  int parts = 0;
  Pool* pool = nullptr;
  try {
    pool = pool_for(n, parts);
  } catch (const std::bad_alloc&) {  // no memory for the pool itself: the calling thread does it
    fn(int64_t{0}, total);
    return;
  }
  std::unique_lock<std::mutex> busy(pool->busy(), std::try_to_lock);
  n = parts;
  if (n <= 1 || !busy.owns_lock()) {  // no worker started, or another call is using the pool
    fn(int64_t{0}, total);
    return;
  }
  const int64_t chunk = ((total + n - 1) / n + grain - 1) / grain * grain;
  pool->run(n, [&](int part) {
    const int64_t begin = std::min(total, part * chunk), end = std::min(total, (part + 1) * chunk);
    if (begin < end) fn(begin, end);
  });
}

}  // namespace stochdepth
