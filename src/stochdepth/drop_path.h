// The public C++ API of the stochdepth core: the device enum, and ONE entry per op: drop_path and
// stream_copy own the CPU/CUDA choice (drop_path.cc), compute_mask runs on the host. The dtype and
// scaling enums and the parameter block of a call are in params.h. No framework, no Python, no
// intrinsics; ISA selection is in isa.h, threads in thread_pool.h, CPU buffers in alloc.h.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "params.h"

namespace stochdepth {

// The values are DLPack's device types, so that the bindings export them unchanged.
enum class DeviceKind : int32_t { kCPU = 1, kCUDA = 2 };

struct Device {
  DeviceKind kind = DeviceKind::kCPU;
  int32_t id = 0;
  bool operator==(const Device& o) const { return kind == o.kind && id == o.id; }
  std::string str() const;  // "cpu" or "cuda:<id>", for messages
};

// ---- the ops: the one place that branches on the device is their definition (drop_path.cc)

// Runs the op on `device`. For CUDA, pointers are device pointers on that device and the work
// is queued on `stream` (a cudaStream_t; nullptr = the legacy default stream) without host
// synchronisation; `stream` is ignored on the CPU. Throws std::invalid_argument for parameters
// the kernels cannot run (or a CUDA device in a build without CUDA), std::runtime_error naming
// the CUDA error on a failed launch.
void drop_path(const DropPathParams& params, Device device, void* stream);

// The backward pass with the layer scale (docs/design.md, "Layer scale"): params as for the
// single-input form on grad_out (shortcut nullptr, input grad_out, out grad_residual) with
// params.gamma set. grad_residual = gamma * (s * grad_out) on kept samples, +0 on dropped ones;
// grad_gamma (params.channels elements, the inputs' dtype) = the column sums over the kept rows
// of (s * grad_out) * residual, in the fused norm's order, whatever the thread count or ISA.
// `residual` (the forward's) is read on kept rows only. grad_gamma is written even when there
// are no rows (+0). No compact rows.
void drop_path_backward_gamma(const DropPathParams& params, const void* residual, void* grad_gamma,
                              Device device, void* stream);

// A plain streaming copy of `bytes` with the same threading and stores as the op (CPU) or the
// library's own vectorised kernel (CUDA): the bandwidth ceiling that the benchmark reports.
void stream_copy(void* dst, const void* src, size_t bytes, Device device, void* stream);

// The CPU store policy: an op (or stream_copy) whose inputs and output together move at least
// this many bytes writes its output with non-temporal stores. Default: the size of one
// last-level cache as sysfs reports it, at least 4 MiB (docs/design.md, "CPU kernels, threads
// and memory"). Below it, ordinary stores leave the output in the cache for its reader.
int64_t cpu_stream_threshold_bytes();
void set_cpu_stream_threshold_bytes(int64_t bytes);  // negative means 0: always stream

// Stores the words [seed, offset] (DropPathParams::rng_words) at `dst` on `device` before
// returning. On CUDA the copy runs on a stream of its own and outside any graph capture in
// progress on this thread: a captured graph that reads and advances the words starts from them.
void write_words(void* dst, uint64_t seed, uint64_t offset, Device device);

// keep[b] for b in [0, batch), on the host (docs/design.md, "The mask stream").
void compute_mask(uint8_t* keep, int64_t batch, uint64_t seed, uint64_t offset, uint64_t threshold,
                  bool batch_mode);

// Memory for an output the library allocates itself on `device`: 64-byte aligned, recycled
// CPU buffers (alloc.h) or stream-ordered device memory from the library's pool of the device
// (cudaMallocFromPoolAsync). free_output never throws and never synchronises.
void* alloc_output(size_t bytes, Device device, void* stream);
void free_output(void* ptr, size_t bytes, Device device);
// Gives back what the output caches hold: the CPU reuse cache and the device pools' free memory
// (stochdepth.empty_cache()).
void release_cached_outputs();
// A buffer from alloc_output handed (DLPack) to a consumer that uses it on `consumer_stream`:
// on CUDA that stream waits for the work queued on the buffer so far; nothing on the CPU.
void export_output(void* ptr, Device device, void* consumer_stream);

// ---- what this build contains (defined in cuda/drop_path.cu, or cuda_stubs.cc without CUDA)

bool cuda_compiled();
std::string cuda_architectures();  // the arch list the kernels were compiled for; "" without CUDA
// Number of usable devices; 0 (never an exception) when there is no driver or no GPU.
int cuda_device_count();
// Makes CUDA device `id` current on this thread and returns the one that was current, or -1
// (nothing changed, never an exception) without CUDA, a driver or that device.
int cuda_swap_device(int id);

}  // namespace stochdepth
