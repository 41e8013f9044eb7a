// The CPU runners behind drop_path.h's entries (cpu_run.cc). Internal: only drop_path.cc calls
// them; the bindings go through drop_path.h, never here.
#pragma once
#include <cstddef>

#include "drop_path.h"

namespace stochdepth {

void drop_path_cpu(const DropPathParams& params);
void drop_path_backward_gamma_cpu(const DropPathParams& params, const void* residual,
                                  void* grad_gamma);
void stream_copy_cpu(void* dst, const void* src, size_t bytes);

}  // namespace stochdepth
