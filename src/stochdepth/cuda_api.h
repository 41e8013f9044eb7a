// The CUDA launchers seen from host C++, called only by the device switch in drop_path.cc.
// Implemented in cuda/drop_path.cu when the library is built with CUDA (STOCHDEPTH_WITH_CUDA),
// and by stubs in cuda_stubs.cc otherwise: the stubs throw "built without CUDA", so that no
// caller needs an #ifdef. The build queries (cuda_compiled, ...) are declared in drop_path.h.
#pragma once
#include <cstddef>
#include <cstdint>

#include "drop_path.h"

namespace stochdepth {

// Runs the op on `stream` (a cudaStream_t; nullptr = legacy default stream). Pointers are
// device pointers on `device`. Asynchronous: no host synchronisation. Throws std::runtime_error
// naming the CUDA error on a failed launch.
void drop_path_cuda(const DropPathParams& params, int device, void* stream);
// drop_path_backward_gamma (drop_path.h) on `stream`, asynchronous like drop_path_cuda.
void drop_path_backward_gamma_cuda(const DropPathParams& params, const void* residual,
                                   void* grad_gamma, int device, void* stream);
// Device-to-device copy with the library's own vectorised kernel (the benchmark's ceiling).
void stream_copy_cuda(void* dst, const void* src, size_t bytes, int device, void* stream);

// Device memory for outputs the library allocates itself, stream-ordered on `stream` from the
// library's own pool of the device (which keeps freed memory across synchronisations); throws
// std::runtime_error on failure. cuda_free frees it in stream order: on the last stream
// cuda_export handed it to (after an event of every other stream that used it), else on the
// allocating stream. It never throws nor synchronises; while one of those streams is capturing a
// CUDA graph the free waits for the next cuda_alloc, cuda_free or cuda_trim outside the capture.
void* cuda_alloc(size_t bytes, int device, void* stream);
void cuda_free(void* ptr, int device);
// Gives the pools' free memory back to the device (stochdepth.empty_cache()).
void cuda_trim();
// DLPack export of a buffer from cuda_alloc to a consumer on `consumer_stream` (a cudaStream_t):
// that stream waits (an event) for the work queued so far on the buffer's stream.
void cuda_export(void* ptr, int device, void* consumer_stream);

// Writes the words [seed, offset] to device memory at `dst` now, outside any CUDA graph capture
// in progress on this thread (relaxed capture mode, the library's own stream, synchronised): the
// initial state of a seeded module's device words, which a captured graph then advances on
// every replay (docs/design.md, "CUDA"). Throws std::runtime_error naming the CUDA error.
void cuda_write_words(void* dst, uint64_t seed, uint64_t offset, int device);

}  // namespace stochdepth
