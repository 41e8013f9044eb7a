// Output buffers for the CPU path (alloc.h): small ones from aligned_alloc, large ones mmap'ed
// with MADV_HUGEPAGE and recycled by size, bounded by STOCHDEPTH_CACHE_MB (default 1024; 0
// disables the cache, at most kMaxCacheMB). Device memory is not here (cuda/drop_path.cu).

// Why: a fresh large buffer costs a page fault per 4 KiB page on its first write (a 74 MiB
// tensor: ~19,000 faults, each zeroing a page), which is more time than the op itself. Huge pages
// take 512x fewer faults (taken by both kernel threads in parallel on first touch), and the cache
// gives the next call of the same size a buffer already faulted in.
#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "alloc.h"
#include "env.h"

namespace stochdepth {
namespace {

constexpr size_t kLarge = size_t{1} << 20;  // mmap'ed and cached from this size up
constexpr size_t kHugePage = size_t{2} << 20;

size_t cache_limit_or_zero() noexcept {
  try {
    return cpu_cache_limit_bytes();
  } catch (...) {  // a bad STOCHDEPTH_CACHE_MB already failed the import; never throw from a free
    return 0;
  }
}

struct Block {
  void* ptr;
  size_t size;
};

std::mutex g_mutex;
std::vector<Block> g_cache;  // a handful of blocks: linear search is fine
size_t g_cached = 0;

size_t mapped_size(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

void* map_large(size_t size) {
  // Over-map by one huge page and trim, so the block starts on a 2 MiB boundary.
  const size_t span = size + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  char* base = static_cast<char*>(raw);
  char* aligned = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHugePage - 1) &
                                          ~(kHugePage - 1));
  if (aligned > base) munmap(base, aligned - base);
  char* end = aligned + size;
  if (base + span > end) munmap(end, base + span - end);
#ifdef MADV_HUGEPAGE
  madvise(aligned, size, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
  return aligned;
}

}  // namespace

size_t cpu_cache_limit_bytes() {
  // A function-local static whose initialiser throws is retried on the next call: a bad value
  // fails every call, not only the first.
  static const size_t limit =
      static_cast<size_t>(env_int("STOCHDEPTH_CACHE_MB", 0, kMaxCacheMB, 1024)) << 20;
  return limit;
}

void* cpu_alloc(size_t bytes) {
  if (bytes < kLarge) {
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (!p) throw std::bad_alloc();
    return p;
  }
  const size_t size = mapped_size(bytes);
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (size_t i = 0; i < g_cache.size(); ++i) {
      if (g_cache[i].size == size) {
        void* p = g_cache[i].ptr;
        g_cached -= size;
        g_cache.erase(g_cache.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
  }
  return map_large(size);
}

void cpu_free(void* ptr, size_t bytes) {
  if (!ptr) return;
  if (bytes < kLarge) {
    std::free(ptr);
    return;
  }
  const size_t size = mapped_size(bytes);
  std::vector<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_cache.push_back({ptr, size});
    g_cached += size;
    // Over the limit: drop the oldest blocks (possibly this one), so sizes in use win.
    while (g_cached > cache_limit_or_zero()) {
      evicted.push_back(g_cache.front());
      g_cached -= g_cache.front().size;
      g_cache.erase(g_cache.begin());
    }
  }
  for (const Block& b : evicted) munmap(b.ptr, b.size);
}

size_t cpu_cache_bytes() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_cached;
}

void cpu_cache_clear() {
  std::vector<Block> blocks;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    blocks.swap(g_cache);
    g_cached = 0;
  }
  for (const Block& b : blocks) munmap(b.ptr, b.size);
}

}  // namespace stochdepth
