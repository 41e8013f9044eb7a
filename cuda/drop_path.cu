// CUDA implementation of cuda_api.h: launches the kernel bodies of drop_path_kernel.cuh,
// compact_kernel.cuh and layer_scale_kernel.cuh (chosen and configured by dispatch.cuh and
// layer_scale_kernel.cuh, the code the CPU emulation runs too) through one __global__ wrapper, plus
// stream-ordered device memory and the DLPack stream handshake. The keep decision comes from mask.h
// / philox.h, shared with the CPU; no validation beyond what the launch needs (the binding layer
// validates).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda_check.h"
#include "dispatch.cuh"
#include "layer_scale_kernel.cuh"
#include "scratch.h"
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

// Sets this thread's stream-capture mode to relaxed for the scope, so that the library's own
// stream-ordered calls on streams that are not capturing neither join nor break a capture in
// progress elsewhere; restores the caller's mode.
// status() is the exchange's error (then nothing was changed and nothing is restored).
class RelaxedCapture {
 public:
  RelaxedCapture() : status_(cudaThreadExchangeStreamCaptureMode(&mode_)) {}
  ~RelaxedCapture() {
    if (status_ == cudaSuccess) (void)cudaThreadExchangeStreamCaptureMode(&mode_);
  }
  cudaError_t status() const { return status_; }
  RelaxedCapture(const RelaxedCapture&) = delete;
  RelaxedCapture& operator=(const RelaxedCapture&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
  cudaError_t status_;
};

// nullptr and cudaStreamLegacy name the same stream (the library is not built per-thread).
cudaStream_t canonical(void* stream) {
  return stream == nullptr ? cudaStreamLegacy : static_cast<cudaStream_t>(stream);
}

// True when work may be queued on `s` now without touching a capture: `s` is not capturing, and
// (for the legacy stream, which waits for every blocking stream) no blocking stream is either.
bool outside_capture(cudaStream_t s) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(s, &status) != cudaSuccess) {
    (void)cudaGetLastError();  // cudaErrorStreamCaptureImplicit: the legacy stream, see above
    return false;
  }
  return status == cudaStreamCaptureStatusNone;
}

// Library-allocated buffers: the device and stream each was allocated on, and the other streams
// a consumer took it on (cuda_export). Its free is ordered after the work of all of them.
struct Allocation {
  int device;
  cudaStream_t stream;
  std::vector<cudaStream_t> consumers;
};
std::mutex& alloc_mutex() {
  static auto* m = new std::mutex();  // leaked: frees may run during interpreter teardown
  return *m;
}
std::unordered_map<void*, Allocation>& allocations() {
  static auto* m = new std::unordered_map<void*, Allocation>();
  return *m;
}
// Frees that came while one of their streams was capturing a graph: queuing the free then would
// join or break that capture, so it waits for the next allocation, free or empty_cache().
std::vector<std::pair<void*, Allocation>>& deferred_frees() {
  static auto* v = new std::vector<std::pair<void*, Allocation>>();
  return *v;
}

// The library's memory pool of `device`, made once: a pool of its own, so that the release
// threshold set here does not change the device's default pool, which other libraries share.
// The threshold keeps freed memory in the pool across synchronisations (with the default, 0, the
// pool unmaps everything at each sync, and a large output is mapped afresh on every call);
// empty_cache() gives it back (cuda_trim).
std::unordered_map<int, cudaMemPool_t>& memory_pools() {  // under alloc_mutex()
  static auto* m = new std::unordered_map<int, cudaMemPool_t>();
  return *m;
}
cudaMemPool_t memory_pool(int device) {
  auto it = memory_pools().find(device);
  if (it != memory_pools().end()) return it->second;
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.handleTypes = cudaMemHandleTypeNone;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  cudaMemPool_t pool = nullptr;
  STOCHDEPTH_CUDA_CHECK(cudaMemPoolCreate(&pool, &props));
  uint64_t keep = UINT64_MAX;
  STOCHDEPTH_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  memory_pools().emplace(device, pool);
  return pool;
}

// Queues the free of `ptr` in stream order, with no host synchronisation: on the last consumer's
// stream (or the allocating one when nobody took it elsewhere), after an event of each other
// stream that used it. False, with nothing queued, while any of those streams is capturing.
// Called with the buffer's device current and the thread's capture mode relaxed; never throws.
bool free_in_stream_order(void* ptr, const Allocation& a) {
  const cudaStream_t target = a.consumers.empty() ? a.stream : a.consumers.back();
  if (!outside_capture(a.stream)) return false;
  for (cudaStream_t c : a.consumers) {
    if (!outside_capture(c)) return false;
  }
  const auto after = [&](cudaStream_t s) {
    if (s == target) return;
    cudaEvent_t ev;
    if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess) return;
    if (cudaEventRecord(ev, s) == cudaSuccess) (void)cudaStreamWaitEvent(target, ev, 0);
    (void)cudaEventDestroy(ev);  // released once the wait is satisfied
  };
  after(a.stream);
  for (cudaStream_t c : a.consumers) after(c);
  // A failure here (e.g. the runtime already unloading at interpreter exit) leaks the buffer.
  (void)cudaFreeAsync(ptr, target);
  (void)cudaGetLastError();
  return true;
}

// Makes `device` current for the scope without throwing (cuda_swap_device), for frees.
class QuietDevice {
 public:
  explicit QuietDevice(int device) : device_(device), previous_(cuda_swap_device(device)) {}
  ~QuietDevice() {
    if (previous_ >= 0 && previous_ != device_) cuda_swap_device(previous_);
  }
  QuietDevice(const QuietDevice&) = delete;
  QuietDevice& operator=(const QuietDevice&) = delete;

 private:
  int device_, previous_;
};

// Retries the deferred frees whose streams are no longer capturing. Takes alloc_mutex() itself.
void flush_deferred_frees() {
  std::vector<std::pair<void*, Allocation>> pending;
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    pending.swap(deferred_frees());
  }
  if (pending.empty()) return;
  RelaxedCapture relaxed;
  std::vector<std::pair<void*, Allocation>> still;
  for (auto& [ptr, a] : pending) {
    QuietDevice on(a.device);
    if (!free_in_stream_order(ptr, a)) still.emplace_back(ptr, std::move(a));
  }
  if (still.empty()) return;
  std::lock_guard<std::mutex> lock(alloc_mutex());
  auto& d = deferred_frees();
  d.insert(d.end(), std::make_move_iterator(still.begin()), std::make_move_iterator(still.end()));
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

void drop_path_backward_gamma_cuda(const DropPathParams& params, const void* residual,
                                   void* grad_gamma, int device, void* stream) {
  if (params.compact_input || params.compact_output || params.shortcut || !params.gamma) {
    throw std::invalid_argument(
        "the backward pass with gamma takes gamma, no shortcut and no compact rows");
  }
  if (params.channels <= 0 || grad_gamma == nullptr ||
      (params.numel() > 0 && (params.input == nullptr || params.out == nullptr ||
                              residual == nullptr || params.inner % params.channels != 0))) {
    throw std::invalid_argument("drop_path_backward_gamma_cuda: null pointer or bad extent");
  }
  DeviceGuard guard(device);
  GpuLauncher launcher{static_cast<cudaStream_t>(stream)};
  // The block sums: stream-ordered scratch, freed (in stream order) once the launches are queued.
  const Scratch partials(layer_scale_partials_bytes(params), Device{DeviceKind::kCUDA, device},
                         stream);
  dispatch_layer_scale_backward(params, residual, grad_gamma, partials.ptr, launcher);
}

void stream_copy_cuda(void* dst, const void* src, size_t bytes, int device, void* stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  GpuLauncher launcher{static_cast<cudaStream_t>(stream)};
  dispatch_copy(dst, src, static_cast<int64_t>(bytes), launcher);
}

void* cuda_alloc(size_t bytes, int device, void* stream) {
  // Stream-ordered, from the library's pool of the device: no device-wide sync on free, as
  // cudaFree would do on every allocating call.
  flush_deferred_frees();
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  cudaMemPool_t pool;
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    pool = memory_pool(device);
  }
  void* ptr = nullptr;
  STOCHDEPTH_CUDA_CHECK(cudaMallocFromPoolAsync(&ptr, bytes == 0 ? 1 : bytes, pool, s));
  std::lock_guard<std::mutex> lock(alloc_mutex());
  allocations()[ptr] = Allocation{device, canonical(s), {}};
  return ptr;
}

void cuda_export(void* ptr, int device, void* consumer_stream) {
  const cudaStream_t consumer = canonical(consumer_stream);
  cudaStream_t producer = nullptr;
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    auto it = allocations().find(ptr);
    if (it == allocations().end()) return;
    Allocation& a = it->second;
    producer = a.stream;
    if (consumer == producer) return;
    // Listed once, last: the last consumer is the one whose stream frees it.
    auto& c = a.consumers;
    c.erase(std::remove(c.begin(), c.end(), consumer), c.end());
    c.push_back(consumer);
  }
  // The consumer's stream waits for everything queued so far on the producing stream.
  DeviceGuard guard(device);
  cudaEvent_t ev;
  STOCHDEPTH_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  const cudaError_t rec = cudaEventRecord(ev, producer);
  const cudaError_t wait = rec == cudaSuccess ? cudaStreamWaitEvent(consumer, ev, 0) : rec;
  (void)cudaEventDestroy(ev);  // released once the wait is satisfied
  STOCHDEPTH_CUDA_CHECK(wait);
}

void cuda_write_words(void* dst, uint64_t seed, uint64_t offset, int device) {
  DeviceGuard guard(device);
  // Relaxed for this thread, so that the copy neither joins nor breaks a capture in progress on
  // another stream; a stream of our own, so that nothing captured is touched.
  RelaxedCapture relaxed;
  STOCHDEPTH_CUDA_CHECK(relaxed.status());
  const uint64_t words[2] = {seed, offset};
  cudaStream_t s = nullptr;
  cudaError_t err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (err == cudaSuccess) {
    err = cudaMemcpyAsync(dst, words, sizeof words, cudaMemcpyHostToDevice, s);
    const cudaError_t sync = cudaStreamSynchronize(s);  // `words` is on this stack frame
    if (err == cudaSuccess) err = sync;
    (void)cudaStreamDestroy(s);
  }
  STOCHDEPTH_CUDA_CHECK(err);  // the caller's mode is back when `relaxed` goes
}

void cuda_free(void* ptr, int device) {
  // Called from DLPack deleters and destructors: it must not throw, synchronise the device, or
  // touch a CUDA graph capture in progress (torch frees tensors inside captures).
  if (ptr == nullptr) return;
  Allocation a{device, cudaStreamLegacy, {}};
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    auto it = allocations().find(ptr);
    if (it != allocations().end()) {
      a = std::move(it->second);
      allocations().erase(it);
    }
  }
  {
    RelaxedCapture relaxed;
    QuietDevice on(device);
    if (!free_in_stream_order(ptr, a)) {
      std::lock_guard<std::mutex> lock(alloc_mutex());
      deferred_frees().emplace_back(ptr, std::move(a));
      return;
    }
  }
  flush_deferred_frees();
}

void cuda_trim() {
  flush_deferred_frees();
  std::vector<std::pair<int, cudaMemPool_t>> pools;
  {
    std::lock_guard<std::mutex> lock(alloc_mutex());
    pools.assign(memory_pools().begin(), memory_pools().end());
  }
  for (const auto& [device, pool] : pools) {
    QuietDevice on(device);
    (void)cudaMemPoolTrimTo(pool, 0);  // memory still in use or awaiting its free stays
    (void)cudaGetLastError();
  }
}

}  // namespace stochdepth
