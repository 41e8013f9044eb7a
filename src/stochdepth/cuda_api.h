// The CUDA entry points seen from host C++. Implemented in cuda/drop_path.cu when the library
// is built with CUDA (STOCHDEPTH_WITH_CUDA defined), and by stubs in cuda_stubs.cc otherwise:
// the stubs report "not compiled" and throw, so that no caller needs an #ifdef.
#pragma once
#include <cstddef>
#include <string>

#include "drop_path.h"

namespace stochdepth {

bool cuda_compiled();
std::string cuda_architectures();  // the arch list the kernels were compiled for; "" without CUDA
// Number of usable devices; 0 (never an exception) when there is no driver or no GPU.
int cuda_device_count();

// Runs the op on `stream` (a cudaStream_t; nullptr = legacy default stream). Pointers are
// device pointers on `device`. Asynchronous: no host synchronisation. Throws std::runtime_error
// naming the CUDA error on a failed launch.
void drop_path_cuda(const DropPathParams& params, int device, void* stream);
// Device-to-device copy with the library's own vectorised kernel (the benchmark's ceiling).
void stream_copy_cuda(void* dst, const void* src, size_t bytes, int device, void* stream);

// Device memory for outputs the library allocates itself; throws std::runtime_error on failure.
void* cuda_alloc(size_t bytes, int device, void* stream);
void cuda_free(void* ptr, int device);

}  // namespace stochdepth
