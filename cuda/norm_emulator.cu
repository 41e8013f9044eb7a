// The CPU emulation of the fused norm's CUDA kernels (norm_kernel.cuh), for the tests: the same
// dispatch as norm.cu with a host launcher that runs every block of a launch, phase by phase,
// every thread of a phase (optionally last to first), with shared memory and thread state
// poisoned per block, as cuda/emulator.cu does for the drop-path kernels. Compiled by nvcc for
// the host only into stochdepth._cuda_emulator.
#include <cstring>
#include <memory>
#include <vector>

#include "norm_emulator.h"
#include "norm_kernel.cuh"

namespace stochdepth {
namespace emulator {
namespace {

struct NormHostLauncher {
  bool reverse;
  template <class K>
  void run(uint32_t grid, const typename K::Args& a) {
    auto shared = std::make_unique<typename K::Shared>();
    std::vector<typename K::Thread> threads(launch::kThreads);
    for (uint32_t b = 0; b < grid; ++b) {
      std::memset(static_cast<void*>(shared.get()), 0xA5, sizeof(typename K::Shared));
      std::memset(static_cast<void*>(threads.data()), 0x5A,
                  sizeof(typename K::Thread) * threads.size());
      for (int ph = 0; ph < K::kPhases; ++ph) {
        for (int i = 0; i < launch::kThreads; ++i) {
          const uint32_t t = reverse ? launch::kThreads - 1 - i : i;
          K::phase(ph, a, Idx{b, t}, *shared, threads[t]);
        }
      }
    }
  }
};

}  // namespace

void norm(const NormParams& p, bool backward, bool reverse_threads) {
  if (p.width == 0 || (p.rows() == 0 && !backward)) return;  // as norm.cu
  NormHostLauncher launcher{reverse_threads};
  std::vector<unsigned char> stats, partials;
  if (backward) {
    // Poisoned, as device memory from a pool would be: every byte read is written first.
    stats.assign(norm_cuda::stats_bytes(p), 0xA5);
    partials.assign(norm_cuda::partials_bytes(p), 0xA5);
  }
  norm_cuda::dispatch_norm(p, backward, stats.data(), partials.data(), launcher);
}

}  // namespace emulator
}  // namespace stochdepth
