// The fused residual + norm on CUDA (docs/design.md, "Fused residual and norm"): the launches of
// the kernel bodies in norm_kernel.cuh through one __global__ wrapper, and the backward pass's
// scratch memory (stream-ordered, from the library's pool: scratch.h). The CPU emulation of
// the same bodies is norm_emulator.cu.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "norm_kernel.cuh"
#include "scratch.h"

namespace stochdepth {
namespace {

template <class K>
__global__ void __launch_bounds__(launch::kThreads) run_norm_kernel(const typename K::Args a) {
  __shared__ typename K::Shared sh;
  typename K::Thread t;
  const Idx id{blockIdx.x, threadIdx.x};
#pragma unroll
  for (int ph = 0; ph < K::kPhases; ++ph) {
    if (ph > 0) __syncthreads();
    K::phase(ph, a, id, sh, t);
  }
}

struct NormGpuLauncher {
  cudaStream_t stream;
  template <class K>
  void run(uint32_t grid, const typename K::Args& a) {
    if (grid == 0) return;
    run_norm_kernel<K><<<grid, launch::kThreads, 0, stream>>>(a);
    STOCHDEPTH_LAUNCH_CHECK();
  }
};

// `device` current for the scope (cuda_swap_device, drop_path.h), the caller's restored after.
class CurrentDevice {
 public:
  explicit CurrentDevice(int device) : device_(device), previous_(cuda_swap_device(device)) {
    if (previous_ < 0)
      throw std::invalid_argument("the fused norm: no CUDA device " + std::to_string(device));
  }
  ~CurrentDevice() {
    if (previous_ != device_) (void)cuda_swap_device(previous_);
  }
  CurrentDevice(const CurrentDevice&) = delete;
  CurrentDevice& operator=(const CurrentDevice&) = delete;

 private:
  int device_, previous_;
};

void run(const NormParams& p, bool backward, Device device, void* stream) {
  // No rows: the forward pass has nothing to do; the backward pass still writes the column
  // sums (+0) with its last kernel (the others have an empty grid).
  if (p.width == 0 || (p.rows() == 0 && !backward)) return;
  const CurrentDevice current(device.id);
  NormGpuLauncher launcher{static_cast<cudaStream_t>(stream)};
  if (!backward) {
    norm_cuda::dispatch_norm(p, false, nullptr, nullptr, launcher);
    return;
  }
  const Scratch stats(norm_cuda::stats_bytes(p), device, stream);
  const Scratch partials(norm_cuda::partials_bytes(p), device, stream);
  norm_cuda::dispatch_norm(p, true, stats.ptr, partials.ptr, launcher);
}

}  // namespace

void norm_forward_cuda(const NormParams& p, Device device, void* stream) {
  run(p, false, device, stream);
}

void norm_backward_cuda(const NormParams& p, Device device, void* stream) {
  run(p, true, device, stream);
}

}  // namespace stochdepth
