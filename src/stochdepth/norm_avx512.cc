// The fused norm's avx512 unit: norm_kernel_impl.inc compiled with this unit's flags, inside its
// own namespace so that nothing compiled for one ISA reaches another (docs/design.md, "CPU
// kernels, threads and memory"). Compiled with the AVX-512 F/BW/DQ/VL flags (cmake/core.cmake);
// also the table of the avx512_bf16 ISA.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "half.h"
#include "norm_kernels.h"
#include "portability.h"

namespace stochdepth {
namespace norm_avx512 {
#include "norm_kernel_impl.inc"
}  // namespace norm_avx512
}  // namespace stochdepth
