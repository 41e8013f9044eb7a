// The CUDA launchers seen from host C++, called only by the device switch in drop_path.cc.
// Implemented in cuda/drop_path.cu when the library is built with CUDA (STOCHDEPTH_WITH_CUDA),
// and by stubs in cuda_stubs.cc otherwise: the stubs throw "built without CUDA", so that no
// caller needs an #ifdef. The build queries (cuda_compiled, ...) are declared in drop_path.h.
#pragma once
#include <cstddef>

#include "drop_path.h"

namespace stochdepth {

// Runs the op on `stream` (a cudaStream_t; nullptr = legacy default stream). Pointers are
// device pointers on `device`. Asynchronous: no host synchronisation. Throws std::runtime_error
// naming the CUDA error on a failed launch.
void drop_path_cuda(const DropPathParams& params, int device, void* stream);
// Device-to-device copy with the library's own vectorised kernel (the benchmark's ceiling).
void stream_copy_cuda(void* dst, const void* src, size_t bytes, int device, void* stream);

// Device memory for outputs the library allocates itself, stream-ordered on `stream`
// (cudaMallocAsync); throws std::runtime_error on failure. cuda_free frees it on that stream, or
// after a device sync once cuda_export handed it to another stream; it never throws.
void* cuda_alloc(size_t bytes, int device, void* stream);
void cuda_free(void* ptr, int device);
// DLPack export of a buffer from cuda_alloc to a consumer on `consumer_stream` (a cudaStream_t):
// that stream waits (an event) for the work queued so far on the buffer's stream.
void cuda_export(void* ptr, int device, void* consumer_stream);

}  // namespace stochdepth
