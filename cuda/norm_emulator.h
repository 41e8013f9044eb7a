// The CPU emulation of the fused norm's CUDA kernels (norm_emulator.cu), seen from host C++:
// stochdepth._cuda_emulator exposes it (norm_emulator_module.cc). Pointers are host pointers.
#pragma once
#include "stochdepth/norm.h"

namespace stochdepth {
namespace emulator {

// The forward (or backward) launches of norm.cu, every block and thread run on the CPU.
void norm(const NormParams& params, bool backward, bool reverse_threads);

}  // namespace emulator
}  // namespace stochdepth
