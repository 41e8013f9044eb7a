// The interface between the CPU runner (cpu_run.cc) and the per-ISA CPU kernels (cpu_<isa>.cc).
// ISA-free: no intrinsics here. isa.cc picks one table at run time; each ISA translation unit
// fills its table from the one shared algorithm in cpu_kernel_impl.inc.
#pragma once
#include <cstddef>
#include <cstdint>

#include "drop_path.h"
#include "isa.h"
#include "portability.h"

namespace stochdepth {

// The mask of one call, computed once by cpu_run.cc: keep[b], and for compact rows the index of
// each kept sample among the kept ones (kept_index[b] = number of kept samples before b).
struct MaskView {
  const uint8_t* keep = nullptr;
  const int64_t* kept_index = nullptr;
  int64_t n_kept = 0;
};

// grad_gamma's row blocks: the column-sum order of the fused norm's parameter gradients
// (docs/design.md, "Fused residual and norm"), so that both give the same bits.
constexpr int64_t kGammaRowBlock = 64;

struct CpuKernels {
  Isa isa;
  // Elements [begin, end) of the flattened [outer, batch, inner] op (the full, non-compact
  // side). mask.keep[b] is ignored when !params.training. `stream`: non-temporal output stores.
  // The parameters come by value, as the CUDA kernels take theirs (params.h).
  void (*run_range)(DropPathParams params, const MaskView& mask, int64_t begin, int64_t end,
                    bool stream);
  // Bytes [begin, end) of a copy, with the same store policy as the op.
  void (*copy_range)(void* dst, const void* src, size_t begin, size_t end, bool stream);
  // keep[b] for b in [0, batch): docs/design.md, "The mask stream" (mask.h).
  void (*compute_mask)(uint8_t* keep, int64_t batch, uint64_t seed, uint64_t offset,
                       uint64_t threshold, bool batch_mode);
  // One Philox4x32-10 block, for the known-answer tests of each ISA.
  void (*philox)(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]);
  // The backward pass with the layer scale (docs/design.md, "Layer scale"): row blocks [begin,
  // end) of kGammaRowBlock rows of params.channels, grad_residual into params.out and each
  // block's column sums of (s * grad_out) * residual over its kept rows into `partials`
  // (compute type, [block - first][channels]).
  void (*gamma_backward_blocks)(DropPathParams params, const MaskView& mask, const void* residual,
                                int64_t begin, int64_t end, int64_t first, void* partials);
  // totals[i] += partials[blk][i] for blk in [0, blocks), in block order (compute type).
  void (*gamma_add_partials)(DropPathParams params, const void* partials, int64_t blocks,
                             void* totals);
  // The totals rounded once to the storage dtype into grad_gamma.
  void (*gamma_store_totals)(DropPathParams params, const void* totals, void* grad_gamma);
};

namespace scalar {
const CpuKernels& kernels();
}
#if defined(STOCHDEPTH_HAVE_AVX2)
namespace avx2 {
const CpuKernels& kernels();
}
#endif
#if defined(STOCHDEPTH_HAVE_AVX512)
namespace avx512 {  // AVX-512 F/BW/DQ/VL; bfloat16 rounded with integer operations
const CpuKernels& kernels();
}
namespace avx512_bf16 {  // the same plus AVX512_BF16's native conversion
const CpuKernels& kernels();
}
#endif
#if defined(STOCHDEPTH_HAVE_NEON)
namespace neon {
const CpuKernels& kernels();
}
#endif

// The table of the active ISA (isa.cc). A call loads it once and uses it throughout.
const CpuKernels& active_kernels();

}  // namespace stochdepth
