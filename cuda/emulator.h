// The CPU emulation of the CUDA kernels (emulator.cu), seen from host C++: the module
// stochdepth._cuda_emulator (emulator_module.cc) calls it so that CI runs the kernels' own source
// on every block and thread of a launch. Pointers are host pointers.
#pragma once
#include <cstddef>
#include <cstdint>

#include "stochdepth/drop_path.h"

namespace stochdepth {
namespace emulator {

// drop_path_cuda's dispatch (dispatch.cuh) with every launch run on the CPU: blocks in order,
// in each block every thread's phase 0, then every thread's phase 1, ... Shared memory and
// per-thread state start poisoned. `reverse_threads` runs the threads of a phase last to first,
// so a read of another thread's value written in the same phase (a missing barrier) shows.
void drop_path(const DropPathParams& params, bool reverse_threads);
void stream_copy(void* dst, const void* src, size_t bytes, bool reverse_threads);
// drop_path_backward_gamma_cuda's launches (layer_scale_kernel.cuh), the block sums in a
// poisoned host buffer as in pool memory.
void drop_path_backward_gamma(const DropPathParams& params, const void* residual, void* grad_gamma,
                              bool reverse_threads);

// How many blocks the last call ran, and the kernel's name ("dense<float,4>"...), for tests.
struct LastLaunch {
  uint32_t grid = 0;
  const char* kernel = "";
  int vec = 0;
};
LastLaunch last_launch();

// The grids of the layer scale's backward launches (layer_scale_grids, layer_scale_kernel.cuh).
struct LayerScaleGrid {
  uint32_t blocks = 0, totals = 0;
};
LayerScaleGrid layer_scale_grids(int64_t rows, int64_t channels);

}  // namespace emulator
}  // namespace stochdepth
