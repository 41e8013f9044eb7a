// The fused norm's neon unit: norm_kernel_impl.inc compiled with this unit's flags, inside its
// own namespace so that nothing compiled for one ISA reaches another (docs/design.md, "CPU
// kernels, threads and memory"). aarch64 (NEON is baseline there: no flags).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "half.h"
#include "norm_kernels.h"
#include "portability.h"

namespace stochdepth {
namespace norm_neon {
#include "norm_kernel_impl.inc"
}  // namespace norm_neon
}  // namespace stochdepth
