// The CPU runner of the op: computes the mask (and the compact row index) once per call, picks
// the store policy, and splits the elements across the pool, calling the active ISA's kernel
// table on each range. No arithmetic here (cpu_kernel_impl.inc), no ISA choice (isa.cc) and no
// thread management (thread_pool.cc).
#include "cpu_run.h"

#include <stdexcept>
#include <vector>

#include "cpu_kernels.h"
#include "thread_pool.h"

namespace stochdepth {
namespace {

// Outputs at least this large are written with non-temporal stores: they would not stay in the
// cache anyway, and streaming saves the read-for-ownership of every output line.
constexpr int64_t kStreamThresholdBytes = 4 << 20;

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
  std::vector<uint8_t> keep;
  std::vector<int64_t> kept_index;
  MaskView mask;
  if (params.training) {
    keep.resize(static_cast<size_t>(params.batch));
    // The words path reads host memory here, once per call: the same (seed, offset) for every
    // thread and the same mask as the argument path with those values.
    const uint64_t seed = params.rng_words ? params.rng_words[0] : params.seed;
    const uint64_t offset = params.rng_words ? params.rng_words[1] : params.offset;
    k.compute_mask(keep.data(), params.batch, seed, offset, params.threshold, params.batch_mode);
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
  parallel_for(n, 64, threads_for(3 * out_bytes),
               [&](int64_t begin, int64_t end) { k.run_range(params, mask, begin, end, stream); });
}

void stream_copy_cpu(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  const CpuKernels& k = active_kernels();
  const auto n = static_cast<int64_t>(bytes);
  const bool stream = n >= kStreamThresholdBytes;
  parallel_for(n, 4096, threads_for(2 * n), [&](int64_t begin, int64_t end) {
    k.copy_range(dst, src, static_cast<size_t>(begin), static_cast<size_t>(end), stream);
  });
}

}  // namespace stochdepth
