// The CPU worker threads (thread_pool.cc): one persistent pool, parallel_for over element or byte
// ranges, and the thread-count and parallel-threshold settings (docs/design.md, "CPU kernels,
// threads and memory"). It knows nothing of the op: callers pass plain ranges.
#pragma once
#include <cstdint>

namespace stochdepth {

// The most threads a call may use, whatever is asked (set_num_threads, STOCHDEPTH_NUM_THREADS):
// a bound, so that a typo (100000) cannot start a machine's worth of threads.
constexpr int kMaxThreads = 256;

// STOCHDEPTH_NUM_THREADS, or all cores (at most kMaxThreads), until set_num_threads. A bad
// STOCHDEPTH_NUM_THREADS throws std::invalid_argument, on every call until it is fixed.
int num_threads();
void set_num_threads(int64_t n);  // 1 <= n <= kMaxThreads, else std::invalid_argument
// Calls that move fewer bytes than this stay on the calling thread.
int64_t parallel_threshold_bytes();
void set_parallel_threshold_bytes(int64_t bytes);  // negative means 0
int threads_for(int64_t bytes_moved);              // 1, or num_threads() from the threshold up

// A non-owning reference to a callable fn(begin, end), so that a call needs no allocation.
class RangeFn {
 public:
  template <class F>
  RangeFn(const F& f)  // NOLINT(google-explicit-constructor): a view, like std::function_ref
      : obj_(&f),
        call_([](const void* o, int64_t b, int64_t e) { (*static_cast<const F*>(o))(b, e); }) {}
  void operator()(int64_t begin, int64_t end) const { call_(obj_, begin, end); }

 private:
  const void* obj_;
  void (*call_)(const void*, int64_t, int64_t);
};

// Splits [0, total) into up to `threads` chunks whose boundaries are multiples of `grain` (a
// cache line or more of every dtype, so two threads never write the same line) and runs
// fn(begin, end) on each, the first on the calling thread, returning when all are done. Fewer
// chunks when the pool is busy with another call (then all on the calling thread) or could not
// start all its threads.
void parallel_for(int64_t total, int64_t grain, int threads, RangeFn fn);

}  // namespace stochdepth
