// The backward pass of the plain op with the layer scale (docs/design.md, "Layer scale") as CUDA
// kernel bodies, in the style of drop_path_kernel.cuh: launched on the GPU by drop_path.cu and run
// block by block, thread by thread on the CPU by emulator.cu. It is the fused norm's column-sum
// scheme (norm_kernel.cuh: column_cell, ColumnTotalsKernel): thread (block of 64 rows, column i)
// takes its block's rows in row order, writes their grad_residual and sums v * residual into +0;
// then the block sums are added in block order and rounded once, the CPU's and the reference's
// order. The forward pass with gamma is DenseKernel<T, V, true> (drop_path_kernel.cuh).
#pragma once
#include <cstdint>

#include "kernel_common.cuh"
#include "norm_kernel.cuh"

namespace stochdepth {

// The call (input = grad_out, out = grad_residual, gamma, channels: drop_path_backward_gamma,
// drop_path.h), the forward's residual and the block sums ([row_blocks][channels], compute type).
struct LayerScaleBwdArgs {
  DropPathParams p;
  const void* residual;
  void* partials;
};
// The same bound as KernelParams (kernel_common.cuh).
static_assert(sizeof(LayerScaleBwdArgs) <= 128, "kernel arguments over 128 bytes spill");

template <typename T>
struct LayerScaleBwdKernel {
  using Args = LayerScaleBwdArgs;
  using A = Arith<T>;
  using C = typename A::C;
  struct Shared {};
  struct Thread {};
  static constexpr int kPhases = 1;

  STOCHDEPTH_KERNEL_FN static void phase(int, const Args& a, Idx id, Shared&, Thread&) {
    const int64_t ch = a.p.channels, rows = a.p.numel() / ch;
    norm_cuda::ColumnCell cell;
    if (!norm_cuda::column_cell(id, rows, ch, cell)) return;
    const T* go = static_cast<const T*>(a.p.input);
    const T* res = static_cast<const T*>(a.residual);
    T* gr = static_cast<T*>(a.p.out);
    const C s = scale_in<C>(a.p);
    const C g = A::load(static_cast<const T*>(a.p.gamma)[cell.i]);
    const RngWords key = rng_words(a.p.seed, a.p.offset, a.p.rng_words);
    const uint64_t batch = static_cast<uint64_t>(a.p.batch);
    DrawCache cache;  // consecutive rows mostly belong to one sample or to neighbours
    C acc = 0;
    for (int64_t r = cell.r_begin; r < cell.r_end; ++r) {
      const int64_t e = r * ch + cell.i;
      if (a.p.training) {
        // A row lies within one sample (inner % channels == 0, params.h).
        const uint64_t b = a.p.batch_mode ? 0 : static_cast<uint64_t>(r * ch / a.p.inner) % batch;
        if (!cache.keep(key.seed, key.offset, b, a.p.threshold)) {
          gr[e] = A::store(C(0));  // +0; grad_out and residual not read
          continue;
        }
      }
      const C v = A::mul(s, A::load(go[e]));
      gr[e] = A::store(A::mul(g, v));
      acc = A::add(acc, A::mul(v, A::load(res[e])));
    }
    static_cast<C*>(a.partials)[cell.rb * ch + cell.i] = acc;
  }
};

// The compute type's size, for the block sums.
inline size_t layer_scale_partials_bytes(const DropPathParams& p) {
  const int64_t rows = p.numel() / p.channels;
  return static_cast<size_t>(launch::ceil_div(rows, kNormRowBlock) * p.channels) *
         (p.dtype == DType::kFloat64 ? 8 : 4);
}

// The two launches' grids for `rows` rows of `channels`: LayerScaleBwdKernel's (one thread per
// (64-row block, column); 0 without rows: no launch) and ColumnTotalsKernel's (one thread per
// column). Tested past 2**31 elements without allocating (tests/test_layer_scale_cuda_emulated.py).
struct LayerScaleGrids {
  uint32_t blocks, totals;
};
inline LayerScaleGrids layer_scale_grids(int64_t rows, int64_t channels) {
  const int64_t numel = rows * channels;
  return LayerScaleGrids{
      launch::checked_grid(norm_cuda::column_blocks(rows, channels), numel, "tensor"),
      launch::checked_grid(launch::ceil_div(channels, norm_cuda::kColThreads), numel, "tensor")};
}

template <typename T, class L>
void layer_scale_backward_typed(const DropPathParams& p, const void* residual, void* grad_gamma,
                                void* partials, L& launcher) {
  const int64_t ch = p.channels, rows = p.numel() / ch;
  const LayerScaleGrids g = layer_scale_grids(rows, ch);
  // No rows: only the totals (+0) are written; a grid of 0 blocks is not a launch.
  if (g.blocks > 0) {
    launcher.template run<LayerScaleBwdKernel<T>>(g.blocks,
                                                  LayerScaleBwdArgs{p, residual, partials});
  }
  launcher.template run<norm_cuda::ColumnTotalsKernel<T>>(
      g.totals, norm_cuda::column_totals_args(partials, rows, ch, 1, grad_gamma, nullptr, nullptr));
}

// drop_path_backward_gamma on `launcher`; the caller checked the call (gamma, channels >= 1, no
// shortcut, no compact rows) and that `partials` holds layer_scale_partials_bytes(p).
template <class L>
void dispatch_layer_scale_backward(const DropPathParams& p, const void* residual, void* grad_gamma,
                                   void* partials, L& launcher) {
  switch (p.dtype) {
    case DType::kFloat16:
      return layer_scale_backward_typed<__half>(p, residual, grad_gamma, partials, launcher);
    case DType::kBFloat16:
      return layer_scale_backward_typed<__nv_bfloat16>(p, residual, grad_gamma, partials, launcher);
    case DType::kFloat32:
      return layer_scale_backward_typed<float>(p, residual, grad_gamma, partials, launcher);
    case DType::kFloat64:
      return layer_scale_backward_typed<double>(p, residual, grad_gamma, partials, launcher);
  }
}

}  // namespace stochdepth
