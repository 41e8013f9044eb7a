// The interface between the fused norm's CPU runner (norm.cc) and its per-ISA units
// (norm_<isa>.cc, all compiled from norm_kernel_impl.inc). ISA-free: no intrinsics here.
#pragma once
#include <cstdint>

#include "isa.h"
#include "norm.h"

namespace stochdepth {

struct NormKernels {
  // Rows [begin, end) of the forward pass. keep[b] per sample (nullptr at inference).
  // `stream`: non-temporal stores of the row outputs (the CPU store policy).
  void (*forward_rows)(const NormParams& params, const uint8_t* keep, int64_t begin, int64_t end,
                       bool stream);
  // Row blocks [begin, end) of the backward pass: the row outputs, and each block's column sums
  // into `partials` (compute type, [block - first][3][width]: weight, bias, gamma).
  void (*backward_blocks)(const NormParams& params, const uint8_t* keep, int64_t begin, int64_t end,
                          int64_t first, void* partials, bool stream);
  // totals[k][i] += partials[blk][k][i] for blk in [0, blocks), in block order.
  void (*add_partials)(const NormParams& params, const void* partials, int64_t blocks,
                       void* totals);
  // The totals rounded to the storage dtype into grad_weight, grad_bias and grad_gamma.
  void (*store_totals)(const NormParams& params, const void* totals);
};

namespace norm_scalar {
const NormKernels& kernels();
}
#if defined(STOCHDEPTH_HAVE_AVX2)
namespace norm_avx2 {
const NormKernels& kernels();
}
#endif
#if defined(STOCHDEPTH_HAVE_AVX512)
namespace norm_avx512 {
const NormKernels& kernels();
}
#endif
#if defined(STOCHDEPTH_HAVE_NEON)
namespace norm_neon {
const NormKernels& kernels();
}
#endif

// The table for `isa` (avx512_bf16 uses the avx512 unit: the norm has no bfloat16 instruction
// to gain).
const NormKernels& norm_kernels(Isa isa);

}  // namespace stochdepth
