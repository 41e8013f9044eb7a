// The CPU emulation of every kernel in cuda/: the same dispatch (dispatch.cuh), launch
// configuration (launch_config.h) and kernel bodies (*_kernel.cuh) as drop_path.cu, with a host
// launcher in place of <<<...>>>. Compiled by nvcc for the host only (no __global__ here), with
// -ffp-contract=off, so the kernels' host pass is the code CI tests (docs/design.md, "CUDA").
#include <cstring>
#include <memory>
#include <vector>

#include "dispatch.cuh"
#include "emulator.h"
#include "layer_scale_kernel.cuh"

namespace stochdepth {
namespace emulator {
namespace {

template <class K>
struct KernelName;
template <typename T, int V, bool kG>
struct KernelName<DenseKernel<T, V, kG>> {
  static const char* get() { return kG ? "dense_gamma" : "dense"; }
  static constexpr int vec = V;
};
template <typename T>
struct KernelName<LayerScaleBwdKernel<T>> {
  static const char* get() { return "layer_scale_backward"; }
  static constexpr int vec = 1;
};
template <typename T>
struct KernelName<norm_cuda::ColumnTotalsKernel<T>> {
  static const char* get() { return "column_totals"; }
  static constexpr int vec = 1;
};
template <typename T, int V>
struct KernelName<CompactKernel<T, V>> {
  static const char* get() { return "compact"; }
  static constexpr int vec = V;
};
template <bool kVector>
struct KernelName<CopyKernel<kVector>> {
  static const char* get() { return "copy"; }
  static constexpr int vec = CopyKernel<kVector>::kV;
};

thread_local LastLaunch last;

struct HostLauncher {
  bool reverse;

  // Every block of the grid; in each, phase by phase, every thread (the barrier between phases
  // is the loop boundary). Shared memory and the threads' state start as garbage, as on a GPU.
  template <class K>
  void run(uint32_t grid, const typename K::Args& a) {
    last = LastLaunch{grid, KernelName<K>::get(), KernelName<K>::vec};
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

void drop_path(const DropPathParams& params, bool reverse_threads) {
  last = LastLaunch{};
  if (params.numel() == 0) return;
  HostLauncher launcher{reverse_threads};
  dispatch_drop_path(params, launcher);
}

void stream_copy(void* dst, const void* src, size_t bytes, bool reverse_threads) {
  last = LastLaunch{};
  if (bytes == 0) return;
  HostLauncher launcher{reverse_threads};
  dispatch_copy(dst, src, static_cast<int64_t>(bytes), launcher);
}

void drop_path_backward_gamma(const DropPathParams& params, const void* residual, void* grad_gamma,
                              bool reverse_threads) {
  last = LastLaunch{};
  HostLauncher launcher{reverse_threads};
  std::vector<unsigned char> partials(layer_scale_partials_bytes(params), 0xA5);
  dispatch_layer_scale_backward(params, residual, grad_gamma, partials.data(), launcher);
}

LastLaunch last_launch() { return last; }

LayerScaleGrid layer_scale_grids(int64_t rows, int64_t channels) {
  const LayerScaleGrids g = stochdepth::layer_scale_grids(rows, channels);
  return LayerScaleGrid{g.blocks, g.totals};
}

}  // namespace emulator
}  // namespace stochdepth
