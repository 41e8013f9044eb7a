// The fused norm's bindings (norm.cc): _core.forward_norm and _core.backward_norm.
#pragma once
#include <pybind11/pybind11.h>

namespace stochdepth {
void register_norm(pybind11::module_& m);
}
