// The CPU runner of the op: computes the mask (and the compact row index) once per call, picks
// the store policy, and splits the elements across the pool, calling the active ISA's kernel
// table on each range. No arithmetic here (cpu_kernel_impl.inc), no ISA choice (isa.cc) and no
// thread management (thread_pool.cc).
#include "cpu_run.h"

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "thread_pool.h"

namespace stochdepth {
namespace {

// Size in bytes of the highest-level cache of CPU 0, from sysfs ("32768K"); 0 if unknown.
// Not sysconf(_SC_LEVEL3_CACHE_SIZE): on the Zen 4 VM of benchmarks/RESULTS.md glibc reports
// the whole package's 320 MiB, where a core sees one 32 MiB slice.
int64_t last_level_cache_bytes() {
  int64_t best_level = 0, bytes = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    int64_t level = 0, size = 0;
    char unit = 0;
    FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (!f) break;
    const bool ok_level = std::fscanf(f, "%" SCNd64, &level) == 1;
    std::fclose(f);
    f = std::fopen((dir + "size").c_str(), "r");
    if (!f) continue;
    const int got = std::fscanf(f, "%" SCNd64 "%c", &size, &unit);
    std::fclose(f);
    if (!ok_level || got < 1 || size <= 0) continue;
    if (unit == 'K') size <<= 10;
    if (unit == 'M') size <<= 20;
    if (unit == 'G') size <<= 30;
    if (level > best_level) best_level = level, bytes = size;
  }
  return bytes;
}

// Below 4 MiB streaming never paid: partial lines and the fence cost more than the
// read-for-ownership saved (and a machine whose cache size is unknown keeps that floor).
constexpr int64_t kMinStreamThresholdBytes = 4 << 20;

std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> bytes{std::max(kMinStreamThresholdBytes, last_level_cache_bytes())};
  return bytes;
}

}  // namespace

int64_t cpu_stream_threshold_bytes() { return stream_threshold().load(); }

void set_cpu_stream_threshold_bytes(int64_t bytes) {
  stream_threshold().store(std::max<int64_t>(0, bytes));
}

namespace {

// The mask of a call (and for compact rows the index of each kept sample), computed once.
struct CallMask {
  std::vector<uint8_t> keep;
  std::vector<int64_t> kept_index;
  MaskView view;
};

void compute_call_mask(const DropPathParams& params, const CpuKernels& k, CallMask& m) {
  if (!params.training) return;
  m.keep.resize(static_cast<size_t>(params.batch));
  // The words path reads host memory here, once per call: the same (seed, offset) for every
  // thread and the same mask as the argument path with those values.
  const uint64_t seed = params.rng_words ? params.rng_words[0] : params.seed;
  const uint64_t offset = params.rng_words ? params.rng_words[1] : params.offset;
  k.compute_mask(m.keep.data(), params.batch, seed, offset, params.threshold, params.batch_mode);
  m.view.keep = m.keep.data();
  if (params.compact_input || params.compact_output) {
    m.kept_index.resize(m.keep.size());
    for (size_t b = 0; b < m.keep.size(); ++b) {
      m.kept_index[b] = m.view.n_kept;
      m.view.n_kept += m.keep[b];
    }
    m.view.kept_index = m.kept_index.data();
  }
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
  const CpuKernels& k = active_kernels();
  CallMask mask;
  compute_call_mask(params, k, mask);
  const int64_t out_bytes = n * static_cast<int64_t>(dtype_size(params.dtype));
  // Streaming pays when what the op moves does not fit in the cache anyway: the output would be
  // evicted before its reader comes (measured on the Zen 4 VM, 32 MiB L3: with streaming from
  // 4 MiB, backward on 5-10 MB tensors was 1.5-1.75x slower; above the cache, streaming was
  // 1.2-1.4x faster).
  const bool stream = out_bytes * (params.shortcut ? 3 : 2) >= cpu_stream_threshold_bytes();
  parallel_for(n, 64, threads_for(3 * out_bytes), [&](int64_t begin, int64_t end) {
    k.run_range(params, mask.view, begin, end, stream);
  });
}

void drop_path_backward_gamma_cpu(const DropPathParams& params, const void* residual,
                                  void* grad_gamma) {
  if (params.compact_input || params.compact_output || params.shortcut || !params.gamma) {
    throw std::invalid_argument(
        "the backward pass with gamma takes gamma, no shortcut and no compact rows");
  }
  const CpuKernels& k = active_kernels();
  CallMask mask;
  compute_call_mask(params, k, mask);
  const int64_t c = params.channels, rows = params.numel() / c;
  const size_t compute_size = params.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t blocks = (rows + kGammaRowBlock - 1) / kGammaRowBlock;
  // Block sums of a wave of blocks are computed in parallel, then added to the totals in block
  // order (docs/design.md, "Layer scale": the fused norm's order), whatever the thread count;
  // the wave only bounds the memory of the partial sums. No rows: the totals stay +0.
  const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(blocks, (int64_t{1} << 20) / c));
  std::vector<unsigned char> partials(static_cast<size_t>(wave * c) * compute_size);
  std::vector<unsigned char> totals(static_cast<size_t>(c) * compute_size, 0);  // +0
  const int threads =
      threads_for(3 * params.numel() * static_cast<int64_t>(dtype_size(params.dtype)));
  for (int64_t first = 0; first < blocks; first += wave) {
    const int64_t count = std::min(wave, blocks - first);
    parallel_for(count, 1, threads, [&](int64_t begin, int64_t end) {
      k.gamma_backward_blocks(params, mask.view, residual, first + begin, first + end, first,
                              partials.data());
    });
    k.gamma_add_partials(params, partials.data(), count, totals.data());
  }
  k.gamma_store_totals(params, totals.data(), grad_gamma);
}

void stream_copy_cpu(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  const CpuKernels& k = active_kernels();
  const auto n = static_cast<int64_t>(bytes);
  const bool stream = 2 * n >= cpu_stream_threshold_bytes();
  parallel_for(n, 4096, threads_for(2 * n), [&](int64_t begin, int64_t end) {
    k.copy_range(dst, src, static_cast<size_t>(begin), static_cast<size_t>(end), stream);
  });
}

}  // namespace stochdepth
