// The fused norm's functions of stochdepth._cuda_emulator (norm_emulator_module.cc).
#pragma once
#include <pybind11/pybind11.h>

namespace stochdepth {
namespace emulator {
void register_norm_emulator(pybind11::module_& m);
}
}  // namespace stochdepth
