// The entries of drop_path.h: the ONE place that branches on the device (CPU runner in
// cpu_run.cc, CUDA launchers behind cuda_api.h). The derived scalars are in params.cc. No
// validation of user input (the bindings do it, once) and no kernels.
#include "drop_path.h"

#include "alloc.h"
#include "cpu_kernels.h"
#include "cpu_run.h"
#include "cuda_api.h"

namespace stochdepth {

void drop_path(const DropPathParams& params, Device device, void* stream) {
  if (params.numel() == 0) return;
  if (device.kind == DeviceKind::kCPU) {
    drop_path_cpu(params);
  } else {
    drop_path_cuda(params, device.id, stream);
  }
}

void drop_path_backward_gamma(const DropPathParams& params, const void* residual, void* grad_gamma,
                              Device device, void* stream) {
  if (device.kind == DeviceKind::kCPU) {
    drop_path_backward_gamma_cpu(params, residual, grad_gamma);
  } else {
    drop_path_backward_gamma_cuda(params, residual, grad_gamma, device.id, stream);
  }
}

void stream_copy(void* dst, const void* src, size_t bytes, Device device, void* stream) {
  if (device.kind == DeviceKind::kCPU) {
    stream_copy_cpu(dst, src, bytes);
  } else {
    stream_copy_cuda(dst, src, bytes, device.id, stream);
  }
}

void write_words(void* dst, uint64_t seed, uint64_t offset, Device device) {
  if (device.kind == DeviceKind::kCPU) {
    static_cast<uint64_t*>(dst)[0] = seed;
    static_cast<uint64_t*>(dst)[1] = offset;
  } else {
    cuda_write_words(dst, seed, offset, device.id);
  }
}

void compute_mask(uint8_t* keep, int64_t batch, uint64_t seed, uint64_t offset, uint64_t threshold,
                  bool batch_mode) {
  active_kernels().compute_mask(keep, batch, seed, offset, threshold, batch_mode);
}

void* alloc_output(size_t bytes, Device device, void* stream) {
  if (device.kind == DeviceKind::kCPU) return cpu_alloc(bytes);
  return bytes > 0 ? cuda_alloc(bytes, device.id, stream) : nullptr;
}

void export_output(void* ptr, Device device, void* consumer_stream) {
  if (device.kind == DeviceKind::kCUDA && ptr) cuda_export(ptr, device.id, consumer_stream);
}

void release_cached_outputs() {
  cpu_cache_clear();
  cuda_trim();
}

void free_output(void* ptr, size_t bytes, Device device) {
  if (device.kind == DeviceKind::kCPU) {
    cpu_free(ptr, bytes);
  } else if (ptr) {
    cuda_free(ptr, device.id);
  }
}

}  // namespace stochdepth
