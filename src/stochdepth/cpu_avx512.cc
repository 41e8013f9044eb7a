// The AVX-512 F/BW/DQ/VL path for CPUs without AVX512_BF16 (Skylake-SP to Ice Lake): the unit
// in cpu_avx512.inc, with bfloat16 rounded by integer operations.
#include "cpu_avx512_headers.h"

namespace stochdepth {
namespace avx512 {

#include "cpu_avx512.inc"

const CpuKernels& kernels() {
  static const CpuKernels k{Isa::kAvx512,        &run_range,         &copy_range,
                            &compute_mask,       &philox_avx512,     &gamma_backward_blocks,
                            &gamma_add_partials, &gamma_store_totals};
  return k;
}

}  // namespace avx512
}  // namespace stochdepth
