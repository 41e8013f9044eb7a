// The AVX-512 path with AVX512_BF16 (Cooper Lake, Sapphire Rapids and later, AMD Zen 4 and
// later): the unit in cpu_avx512.inc, with bfloat16 rounded by vcvtneps2bf16.
#include "cpu_avx512_headers.h"

#if !defined(__AVX512BF16__)
#error "cpu_avx512_bf16.cc must be compiled with -mavx512bf16 (cmake/core.cmake)"
#endif
#define STOCHDEPTH_NATIVE_BF16 1

namespace stochdepth {
namespace avx512_bf16 {

#include "cpu_avx512.inc"

const CpuKernels& kernels() {
  static const CpuKernels k{Isa::kAvx512Bf16,    &run_range,         &copy_range,
                            &compute_mask,       &philox_avx512,     &gamma_backward_blocks,
                            &gamma_add_partials, &gamma_store_totals};
  return k;
}

}  // namespace avx512_bf16
}  // namespace stochdepth
