// Error checking for the CUDA runtime calls and kernel launches in cuda/. Every failure becomes a
// std::runtime_error naming the CUDA error, the failing expression and file:line, so that the
// binding layer can turn it into a Python RuntimeError. Nothing here launches or allocates.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace stochdepth {
namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ") in " + expr + " at " + file + ":" +
                           std::to_string(line));
}

inline void check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) throw_cuda_error(err, expr, file, line);
}

}  // namespace cuda_detail
}  // namespace stochdepth

// Wraps a CUDA runtime call: STOCHDEPTH_CUDA_CHECK(cudaMalloc(&p, n));
#define STOCHDEPTH_CUDA_CHECK(expr) \
  ::stochdepth::cuda_detail::check((expr), #expr, __FILE__, __LINE__)

// After every <<<...>>>: a bad configuration or a missing kernel image for this GPU is reported
// by cudaGetLastError (which also clears it) without synchronising the host.
#define STOCHDEPTH_LAUNCH_CHECK() \
  ::stochdepth::cuda_detail::check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
