// Output buffers for the CPU (alloc.cc): 64-byte aligned, huge-page advised, recycled by size.
// Only the CPU side; drop_path.h's alloc_output picks between this and device memory.
#pragma once
#include <cstddef>

namespace stochdepth {

void* cpu_alloc(size_t bytes);  // throws std::bad_alloc
void cpu_free(void* ptr, size_t bytes);
size_t cpu_cache_bytes();  // bytes held by the reuse cache
void cpu_cache_clear();    // releases them (stochdepth.empty_cache())

}  // namespace stochdepth
