// Scratch device memory of one call (the fused norm's backward pass, the layer scale's backward
// pass): stream-ordered from the library's pool (alloc_output, drop_path.h), freed in stream order
// when the call's launches are queued; no host synchronisation, nothing that joins or breaks a
// CUDA graph capture (cuda_free defers a free while its stream captures).
#pragma once
#include <cstddef>

#include "stochdepth/drop_path.h"

namespace stochdepth {

struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device;
  Scratch(size_t n, Device d, void* stream) : bytes(n), device(d) {
    if (n) ptr = alloc_output(n, d, stream);
  }
  ~Scratch() {
    if (ptr) free_output(ptr, bytes, device);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

}  // namespace stochdepth
