// The fused norm's XLA FFI handlers (jax_norm_ffi.cc), compiled into stochdepth._jax_ffi: the
// module's init calls register_jax_norm to add `connect_norm` and `norm_handlers`.
#pragma once
#include <pybind11/pybind11.h>

namespace stochdepth {

void register_jax_norm(pybind11::module_& m);

}  // namespace stochdepth
