// From a DropPathParams to one kernel launch: the launch configuration (launch_config.h), the
// kernel (dense or compact, dtype, vector width) and its arguments, written once for both
// launchers: GpuLauncher (drop_path.cu, <<<...>>>) and the CPU emulation (emulator.cu). A
// launcher L has `template <class K> void run(uint32_t grid, const typename K::Args&)`.
#pragma once
#include <stdexcept>

#include "compact_kernel.cuh"
#include "drop_path_kernel.cuh"

namespace stochdepth {

template <typename T, bool kG, class L>
void dispatch_kernel(const DropPathParams& p, L& launcher) {
  constexpr int kV = launch::kVectorBytes / static_cast<int>(sizeof(T));
  const auto addr = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  if (p.compact_input || p.compact_output) {
    const launch::CompactConfig cfg = launch::compact_config(
        p.dtype, p.batch, p.inner, addr(p.shortcut), addr(p.input), addr(p.out));
    const KernelParams a = kernel_params(p, 0);
    if (cfg.vec == kV) {
      launcher.template run<CompactKernel<T, kV>>(cfg.grid, a);
    } else {
      launcher.template run<CompactKernel<T, 1>>(cfg.grid, a);
    }
    return;
  }
  const launch::DenseConfig cfg =
      launch::dense_config(p.dtype, p.numel(), addr(p.shortcut), addr(p.input), addr(p.out));
  const KernelParams a = kernel_params(p, cfg.lead);
  if (cfg.vec == kV) {
    launcher.template run<DenseKernel<T, kV, kG>>(cfg.grid, a);
  } else {
    launcher.template run<DenseKernel<T, 1, kG>>(cfg.grid, a);
  }
}

template <typename T, class L>
void dispatch_typed(const DropPathParams& p, L& launcher) {
  // Without gamma the op's own kernels, untouched by the layer scale.
  if (p.gamma != nullptr) return dispatch_kernel<T, true>(p, launcher);
  dispatch_kernel<T, false>(p, launcher);
}

// The op on `launcher`; the caller checked numel() > 0 and the pointers.
template <class L>
void dispatch_drop_path(const DropPathParams& p, L& launcher) {
  if ((p.compact_input || p.compact_output) && p.outer != 1) {
    throw std::invalid_argument("CUDA compact rows need the sample axis first (outer == 1)");
  }
  if ((p.compact_input || p.compact_output) && p.gamma != nullptr) {
    throw std::invalid_argument("CUDA compact rows do not take gamma (the layer scale) yet");
  }
  switch (p.dtype) {
    case DType::kFloat16:
      return dispatch_typed<__half>(p, launcher);
    case DType::kBFloat16:
      return dispatch_typed<__nv_bfloat16>(p, launcher);
    case DType::kFloat32:
      return dispatch_typed<float>(p, launcher);
    case DType::kFloat64:
      return dispatch_typed<double>(p, launcher);
  }
  throw std::invalid_argument("drop_path_cuda: unknown dtype");
}

// stream_copy: 16-byte chunks when dst and src sit at the same offset within 16 bytes.
template <class L>
void dispatch_copy(void* dst, const void* src, int64_t bytes, L& launcher) {
  const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  CopyArgs a{static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), bytes, 0};
  if (d % launch::kVectorBytes == s % launch::kVectorBytes) {
    a.lead = static_cast<int64_t>(d % launch::kVectorBytes);
    const int64_t tile = launch::tile_elems(launch::kVectorBytes);
    launcher.template run<CopyKernel<true>>(
        launch::checked_grid(launch::ceil_div(bytes + a.lead, tile), bytes, "copy"), a);
  } else {
    const int64_t tile = launch::tile_elems(1);
    launcher.template run<CopyKernel<false>>(
        launch::checked_grid(launch::ceil_div(bytes, tile), bytes, "copy"), a);
  }
}

}  // namespace stochdepth
