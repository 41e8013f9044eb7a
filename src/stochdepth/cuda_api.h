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

// Device memory for outputs the library allocates itself; throws std::runtime_error on failure.
void* cuda_alloc(size_t bytes, int device, void* stream);
void cuda_free(void* ptr, int device);  // never throws

}  // namespace stochdepth
