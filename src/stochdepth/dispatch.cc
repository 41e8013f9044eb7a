// The ONE place that picks the CPU implementation (scalar or AVX2), computes the mask and the
// derived scalars, and splits work across threads. Kernels (cpu_scalar.cc, cpu_avx2.cc) get
// plain element ranges; the bindings get a single call.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
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
      throw std::invalid_argument(std::string("STOCHDEPTH_CPU=") + env +
                                  " is not an ISA this build and CPU support; expected one of: " +
                                  join(supported_isas()));
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
    throw std::invalid_argument(std::string("STOCHDEPTH_NUM_THREADS must be an integer >= 1, got ") + env);
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> g_threads{0};  // 0: not initialised yet
// Below this many bytes moved a call stays on the calling thread: starting a thread costs tens
// of microseconds (measured in benchmarks/RESULTS.md).
std::atomic<int64_t> g_parallel_threshold{1 << 20};
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

void compute_mask(uint8_t* keep, int64_t batch, uint64_t seed, uint64_t offset,
                  uint64_t threshold, bool batch_mode) {
  active_slot().load()->compute_mask(keep, batch, seed, offset, threshold, batch_mode);
}

void philox_block(const std::string& isa, const uint32_t counter[4], const uint32_t key[2],
                  uint32_t out[4]) {
  const CpuKernels* k = kernels_for(isa);
  if (!k) {
    throw std::invalid_argument("isa must be one of the ISAs this build and CPU support (" +
                                join(supported_isas()) + "), got '" + isa + "'");
  }
  k->philox(counter, key, out);
}

void set_isa(const std::string& name) {
  const CpuKernels* k = kernels_for(name);
  if (!k) {
    throw std::invalid_argument("isa must be one of the ISAs this build and CPU support (" +
                                join(supported_isas()) + "), got '" + name + "'");
  }
  active_slot().store(k);
}

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
void set_parallel_threshold_bytes(int64_t bytes) { g_parallel_threshold.store(std::max<int64_t>(0, bytes)); }

// ---- running

namespace {

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
  const int64_t chunk = ((total + n - 1) / n + grain - 1) / grain * grain;
  std::vector<std::thread> workers;
  workers.reserve(n - 1);
  for (int t = 1; t < n; ++t) {
    const int64_t begin = std::min(total, t * chunk), end = std::min(total, (t + 1) * chunk);
    if (begin < end) workers.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(int64_t{0}, std::min(total, chunk));
  for (auto& w : workers) w.join();
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
      throw std::invalid_argument("compact rows need training=True, one compact side, and no "
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
  parallel_for(n, 64, threads, [&](int64_t begin, int64_t end) {
    k->run_range(params, mask, begin, end, stream);
  });
}

void stream_copy_cpu(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  const CpuKernels* k = active_slot().load();
  const bool stream = static_cast<int64_t>(bytes) >= kStreamThresholdBytes;
  parallel_for(static_cast<int64_t>(bytes), 4096, threads_for(2 * static_cast<int64_t>(bytes)),
               [&](int64_t begin, int64_t end) {
                 k->copy_range(dst, src, static_cast<size_t>(begin), static_cast<size_t>(end), stream);
               });
}

}  // namespace stochdepth
