// The fused norm's avx2 unit: norm_kernel_impl.inc compiled with this unit's flags, inside its
// own namespace so that nothing compiled for one ISA reaches another (docs/design.md, "CPU
// kernels, threads and memory"). Compiled with -mavx2 -mfma -mf16c (cmake/core.cmake); isa.cc picks
// it only on CPUs that run AVX2.
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
namespace norm_avx2 {
#include "norm_kernel_impl.inc"
}  // namespace norm_avx2
}  // namespace stochdepth
