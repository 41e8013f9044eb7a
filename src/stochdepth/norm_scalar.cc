// The fused norm's scalar unit: norm_kernel_impl.inc compiled with this unit's flags, inside its
// own namespace so that nothing compiled for one ISA reaches another (docs/design.md, "CPU
// kernels, threads and memory"). The portable unit: plain C++, no flags; every build has it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "half.h"
#include "norm_kernels.h"
#include "portability.h"

namespace stochdepth {
namespace norm_scalar {
#include "norm_kernel_impl.inc"
}  // namespace norm_scalar
}  // namespace stochdepth
