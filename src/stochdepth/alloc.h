// Output buffers for the CPU (alloc.cc): 64-byte aligned, huge-page advised, recycled by size.
// Only the CPU side; drop_path.h's alloc_output picks between this and device memory.
#pragma once
#include <cstddef>
#include <cstdint>

namespace stochdepth {

void* cpu_alloc(size_t bytes);  // throws std::bad_alloc
void cpu_free(void* ptr, size_t bytes);
// The reuse cache's bound from STOCHDEPTH_CACHE_MB (MiB, default 1024, 0 disables it, at most
// kMaxCacheMB); a bad value throws std::invalid_argument naming the variable.
constexpr int64_t kMaxCacheMB = int64_t{1} << 30;
size_t cpu_cache_limit_bytes();
size_t cpu_cache_bytes();  // bytes held by the reuse cache
void cpu_cache_clear();    // releases them (stochdepth.empty_cache())

}  // namespace stochdepth
