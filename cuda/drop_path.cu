// CUDA implementation of cuda_api.h: launches the kernel bodies of drop_path_kernel.cuh and
// compact_kernel.cuh (chosen and configured by dispatch.cuh, the code the CPU emulation runs
// too) through one __global__ wrapper, plus stream-ordered device memory and the DLPack stream
// handshake. The keep decision comes from mask.h / philox.h, shared with the CPU; no validation
// beyond what the launch needs (the binding layer validates).
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "cuda_check.h"
#include "dispatch.cuh"
#include "stochdepth/cuda_api.h"

#ifndef STOCHDEPTH_CUDA_ARCHS
#define STOCHDEPTH_CUDA_ARCHS ""
#endif

namespace stochdepth {
namespace {

// The one kernel entry: K's phases in order, a block barrier between two phases. The emulator
// (emulator.cu) runs the same phases with the same barriers, block by block on the CPU.
template <class K>
__global__ void __launch_bounds__(launch::kThreads, launch::kMinBlocksPerSM)
    run_kernel(const typename K::Args a) {
  __shared__ typename K::Shared sh;
  typename K::Thread t;
  const Idx id{blockIdx.x, threadIdx.x};
#pragma unroll
  for (int ph = 0; ph < K::kPhases; ++ph) {
    if (ph > 0) __syncthreads();
    K::phase(ph, a, id, sh, t);
  }
}

struct GpuLauncher {
  cudaStream_t stream;
  template <class K>
  void run(uint32_t grid, const typename K::Args& a) {
    run_kernel<K><<<grid, launch::kThreads, 0, stream>>>(a);
    STOCHDEPTH_LAUNCH_CHECK();
  }
};

// Makes `device` current for the scope and restores the previous device afterwards, so that a
// tensor on device 1 works and the caller's (e.g. PyTorch's) current device is left alone.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    STOCHDEPTH_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      STOCHDEPTH_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(previous_);  // never throws from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// Library-allocated buffers: the stream each was allocated on (its frees are ordered there), and
// whether a consumer took it on another stream (then the free waits for the device first).
// nullptr and cudaStreamLegacy name the same stream (the library is not built per-thread).
cudaStream_t canonical(void* stream) {
  return stream == nullptr ? cudaStreamLegacy : static_cast<cudaStream_t>(stream);
}

struct Allocation {
  cudaStream_t stream;
  bool foreign_consumer;
};
std::mutex& alloc_mutex() {
  static auto* m = new std::mutex();  // leaked: frees may run during interpreter teardown
  return *m;
}
std::unordered_map<void*, Allocation>& allocations() {
  static auto* m = new std::unordered_map<void*, Allocation>();
  return *m;
}

}  // namespace

bool cuda_compiled() { return true; }

std::string cuda_architectures() { return STOCHDEPTH_CUDA_ARCHS; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no GPU: clear the error, report none
    return 0;
  }
  return n;
}

int cuda_swap_device(int id) {
  int previous = -1;
  if (cudaGetDevice(&previous) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  if (previous != id && cudaSetDevice(id) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return previous;
}

void drop_path_cuda(const DropPathParams& params, int device, void* stream) {
  if (params.numel() == 0) return;
  if (params.input == nullptr || params.out == nullptr || params.batch <= 0 || params.inner <= 0 ||
      params.outer <= 0) {
    throw std::invalid_argument("drop_path_cuda: null pointer or non-positive extent");
  }
  DeviceGuard guard(device);
  GpuLauncher launcher{static_cast<cudaStream_t>(stream)};
  dispatch_drop_path(params, launcher);
}

void stream_copy_cuda(void* dst, const void* src, size_t bytes, int device, void* stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  GpuLauncher launcher{static_cast<cudaStream_t>(stream)};
  dispatch_copy(dst, src, static_cast<int64_t>(bytes), launcher);
}

void* cuda_alloc(size_t bytes, int device, void* stream) {
  // Stream-ordered (the device's default memory pool): no device-wide sync on free, as cudaFree
  // would do on every allocating call.
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  void* ptr = nullptr;
  STOCHDEPTH_CUDA_CHECK(cudaMallocAsync(&ptr, bytes == 0 ? 1 : bytes, s));
  std::lock_guard<std::mutex> lock(alloc_mutex());
  allocations()[ptr] = Allocation{s, false};
  return ptr;
}

void cuda_export(void* ptr, int device, void* consumer_stream) {
  cudaStream_t producer = nullptr;
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    auto it = allocations().find(ptr);
    if (it == allocations().end()) return;
    producer = it->second.stream;
    if (canonical(consumer_stream) == canonical(producer)) return;
    it->second.foreign_consumer = true;
  }
  // The consumer's stream waits for everything queued so far on the producing stream.
  DeviceGuard guard(device);
  cudaEvent_t ev;
  STOCHDEPTH_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  const cudaError_t rec = cudaEventRecord(ev, producer);
  const cudaError_t wait =
      rec == cudaSuccess ? cudaStreamWaitEvent(static_cast<cudaStream_t>(consumer_stream), ev, 0)
                         : rec;
  (void)cudaEventDestroy(ev);  // released once the wait is satisfied
  STOCHDEPTH_CUDA_CHECK(wait);
}

void cuda_write_words(void* dst, uint64_t seed, uint64_t offset, int device) {
  DeviceGuard guard(device);
  // Relaxed for this thread, so that the copy neither joins nor breaks a capture in progress on
  // another stream; a stream of our own, so that nothing captured is touched.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  STOCHDEPTH_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  const uint64_t words[2] = {seed, offset};
  cudaStream_t s = nullptr;
  cudaError_t err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(dst, words, sizeof words, cudaMemcpyHostToDevice, s);
    const cudaError_t sync = cudaStreamSynchronize(s);  // `words` is on this stack frame
    if (err == cudaSuccess) err = sync;
    (void)cudaStreamDestroy(s);
  }
  (void)cudaThreadExchangeStreamCaptureMode(&mode);  // the caller's mode back
  STOCHDEPTH_CUDA_CHECK(err);
}

void cuda_free(void* ptr, int device) {
  // Called from DLPack deleters and destructors: it must not throw. A failure here (e.g. the
  // runtime already unloading at interpreter exit) leaks the buffer and clears the error.
  if (ptr == nullptr) return;
  Allocation alloc{nullptr, true};
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    auto it = allocations().find(ptr);
    if (it != allocations().end()) {
      alloc = it->second;
      allocations().erase(it);
    }
  }
  int previous = 0;
  const bool switch_device = cudaGetDevice(&previous) == cudaSuccess && previous != device &&
                             cudaSetDevice(device) == cudaSuccess;
  // Work another stream queued on the buffer is not ordered before a free on the allocating
  // stream: wait for the device then, as cudaFree did; otherwise the free is stream-ordered.
  if (alloc.foreign_consumer && cudaDeviceSynchronize() != cudaSuccess) (void)cudaGetLastError();
  if (cudaFreeAsync(ptr, alloc.stream) != cudaSuccess) (void)cudaGetLastError();
  if (switch_device) (void)cudaSetDevice(previous);
}

}  // namespace stochdepth
