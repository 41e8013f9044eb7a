// The compact-row launcher (compact.cu), called by drop_path_cuda for params.compact_* calls.
#pragma once
#include <cuda_runtime.h>

#include "stochdepth/drop_path.h"

namespace stochdepth {
void launch_compact(const DropPathParams& params, cudaStream_t stream);
}
