// The ONE place that picks the CPU implementation (scalar or AVX2), computes the mask and the
// derived scalars, and splits work across threads. Kernels (cpu_scalar.cc, cpu_avx2.cc) get
// plain element ranges; the bindings get a single call.
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu_features.h"
#include "cpu_kernels.h"
#include "drop_path.h"
#include "mask.h"  // keep_threshold

namespace stochdepth {

// ---- derived scalars and the mask

void set_scalars(DropPathParams& params, double p, Scaling scaling) {
  params.threshold = keep_threshold(p);
  double s = 1.0;
  if (params.training) {
    // Train-time ("inverted") scaling divides by p; with p = 0 nothing is kept: no division.
    if (scaling == Scaling::kTraining && p > 0.0) s = 1.0 / p;
  } else if (scaling == Scaling::kInference) {
    s = p;  // the paper's inference rule: shortcut + p * residual
  }
  params.scale_f64 = s;
  params.scale_f32 = static_cast<float>(s);  // one rounding, from the double
}

// (compute_mask is defined below, with the ISA selection: each ISA computes the mask itself.)

// ---- ISA selection

namespace {

const CpuKernels* kernels_for(const std::string& name) {
  if (name == "scalar") return &scalar::kernels();
#if defined(STOCHDEPTH_HAVE_AVX2)
  if (name == "avx2" && cpu_has_avx2_fma_f16c()) return &avx2::kernels();
#endif
  return nullptr;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Best supported first; STOCHDEPTH_CPU (read once, at first use) overrides and must be valid.
const CpuKernels* initial_kernels() {
  if (const char* env = std::getenv("STOCHDEPTH_CPU"); env && *env) {
    const CpuKernels* k = kernels_for(env);
    if (!k) {
      throw std::invalid_argument(
          std::string("STOCHDEPTH_CPU=") + env +
          " is not an ISA this build and CPU support; expected one of: " + join(supported_isas()));
    }
    return k;
  }
  return kernels_for(supported_isas().front());
}

std::atomic<const CpuKernels*>& active_slot() {
  static std::atomic<const CpuKernels*> slot{initial_kernels()};
  return slot;
}

int default_threads() {
  if (const char* env = std::getenv("STOCHDEPTH_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
    throw std::invalid_argument(
        std::string("STOCHDEPTH_NUM_THREADS must be an integer >= 1, got ") + env);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> g_threads{0};  // 0: not initialised yet
// Below this many bytes moved a call stays on the calling thread. Waking a parked worker costs
// 70-130 us on the 2-core VM of benchmarks/RESULTS.md (an idle vCPU is slow to wake), so a second
// thread pays off only from about 8 MB (measured there: 6.3 MB moved, 122 us on one thread vs
// 205 us on two; 12.6 MB, 440 us vs 356 us).
std::atomic<int64_t> g_parallel_threshold{8 << 20};
// Outputs at least this large are written with non-temporal stores: they would not stay in the
// cache anyway, and streaming saves the read-for-ownership of every output line.
constexpr int64_t kStreamThresholdBytes = 4 << 20;

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> v{"scalar"};
#if defined(STOCHDEPTH_HAVE_AVX2)
  v.insert(v.begin(), "avx2");
#endif
  return v;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> v;
  for (const auto& name : compiled_isas())
    if (kernels_for(name)) v.push_back(name);
  return v;
}

std::string active_isa() { return active_slot().load()->name; }

void compute_mask(uint8_t* keep, int64_t batch, uint64_t seed, uint64_t offset, uint64_t threshold,
                  bool batch_mode) {
  active_slot().load()->compute_mask(keep, batch, seed, offset, threshold, batch_mode);
}

namespace {
const CpuKernels& kernels_or_throw(const std::string& name) {
  const CpuKernels* k = kernels_for(name);
  if (!k) {
    throw std::invalid_argument("isa must be one of the ISAs this build and CPU support (" +
                                join(supported_isas()) + "), got '" + name + "'");
  }
  return *k;
}
}  // namespace

void philox_block(const std::string& isa, const uint32_t counter[4], const uint32_t key[2],
                  uint32_t out[4]) {
  kernels_or_throw(isa).philox(counter, key, out);
}

void set_isa(const std::string& name) { active_slot().store(&kernels_or_throw(name)); }

int num_threads() {
  int n = g_threads.load();
  if (n == 0) {
    n = default_threads();
    g_threads.store(n);
  }
  return n;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
  g_threads.store(n);
}

int64_t parallel_threshold_bytes() { return g_parallel_threshold.load(); }
void set_parallel_threshold_bytes(int64_t bytes) {
  g_parallel_threshold.store(std::max<int64_t>(0, bytes));
}

// ---- running

namespace {

// A persistent pool of worker threads, so that a call does not start threads (~120 us each on the
// VM of benchmarks/RESULTS.md, a little more than waking a parked one). One call uses the pool at
// a time; a concurrent call (another Python thread) finds it busy and runs on its own thread
// instead of waiting.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { loop(i + 1); });
  }
  int size() const { return static_cast<int>(threads_.size()) + 1; }
  std::mutex& busy() { return busy_; }

  // Runs fn(part) for part in [0, parts), part 0 on the calling thread. Needs busy() held.
  void run(int parts, const std::function<void(int)>& fn) {
    {
      std::lock_guard<std::mutex> lock(m_);
      fn_ = &fn;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
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
      (*fn)(part);
      std::lock_guard<std::mutex> lock(m_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_, m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* fn_ = nullptr;
  int parts_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

std::mutex g_pool_mutex;  // guards g_pool (creation, growth, replacement after fork)
Pool* g_pool = nullptr;   // never destroyed: workers park until the process exits

// A forked child has the parent's Pool object but none of its threads: forget it (leak it, its
// std::thread objects must not be destroyed) and let the child start its own.
void forget_pool_in_child() {
  new (&g_pool_mutex) std::mutex();
  g_pool = nullptr;
}

Pool* pool_for(int threads) {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, &forget_pool_in_child);
    return true;
  }();
  (void)registered;
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!g_pool || g_pool->size() < threads) {
    // Growing: the old pool stays alive (a call may be using it) and is simply left idle.
    g_pool = new Pool(threads - 1);
  }
  return g_pool;
}

// Splits [0, total) into `threads` chunks whose boundaries are multiples of `grain` (a cache
// line or more of every dtype, so two threads never write the same line) and runs fn(begin, end)
// on each, the first on the calling thread.
template <class Fn>
void parallel_for(int64_t total, int64_t grain, int threads, const Fn& fn) {
  const int64_t max_chunks = (total + grain - 1) / grain;
  const int n = static_cast<int>(std::min<int64_t>(threads, max_chunks));
  if (n <= 1) {
    fn(int64_t{0}, total);
    return;
  }
  Pool* pool = pool_for(n);
  std::unique_lock<std::mutex> busy(pool->busy(), std::try_to_lock);
  if (!busy.owns_lock()) {  // another call is using the pool: do this one here
    fn(int64_t{0}, total);
    return;
  }
  const int64_t chunk = ((total + n - 1) / n + grain - 1) / grain * grain;
  pool->run(n, [&](int part) {
    const int64_t begin = std::min(total, part * chunk), end = std::min(total, (part + 1) * chunk);
    if (begin < end) fn(begin, end);
  });
}

int threads_for(int64_t bytes_moved) {
  return bytes_moved >= parallel_threshold_bytes() ? num_threads() : 1;
}

}  // namespace

void drop_path_cpu(const DropPathParams& params) {
  const int64_t n = params.numel();
  if (n == 0) return;
  if (params.compact_input || params.compact_output) {
    const bool valid = params.training && !(params.compact_input && params.compact_output) &&
                       !(params.compact_output && params.shortcut);
    if (!valid) {
      throw std::invalid_argument(
          "compact rows need training=True, one compact side, and no "
          "shortcut with a compact output");
    }
  }
  const CpuKernels* k = active_slot().load();
  std::vector<uint8_t> keep;
  std::vector<int64_t> kept_index;
  MaskView mask;
  if (params.training) {
    keep.resize(static_cast<size_t>(params.batch));
    k->compute_mask(keep.data(), params.batch, params.seed, params.offset, params.threshold,
                    params.batch_mode);
    mask.keep = keep.data();
    if (params.compact_input || params.compact_output) {
      kept_index.resize(keep.size());
      for (size_t b = 0; b < keep.size(); ++b) {
        kept_index[b] = mask.n_kept;
        mask.n_kept += keep[b];
      }
      mask.kept_index = kept_index.data();
    }
  }
  const int64_t out_bytes = n * static_cast<int64_t>(dtype_size(params.dtype));
  const bool stream = out_bytes >= kStreamThresholdBytes;
  const int threads = threads_for(3 * out_bytes);
  parallel_for(n, 64, threads,
               [&](int64_t begin, int64_t end) { k->run_range(params, mask, begin, end, stream); });
}

void stream_copy_cpu(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  const CpuKernels* k = active_slot().load();
  const bool stream = static_cast<int64_t>(bytes) >= kStreamThresholdBytes;
  parallel_for(static_cast<int64_t>(bytes), 4096, threads_for(2 * static_cast<int64_t>(bytes)),
               [&](int64_t begin, int64_t end) {
                 k->copy_range(dst, src, static_cast<size_t>(begin), static_cast<size_t>(end),
                               stream);
               });
}

}  // namespace stochdepth
