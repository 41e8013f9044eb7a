// The launch configuration of every kernel in cuda/, computed on the host by ONE function per
// kernel family, used both by the real launches (drop_path.cu) and by the CPU emulation of the
// kernels (emulator.cu), and tested for tensors past 2**31 elements without allocating them.
// Plain C++: no CUDA header, no launch.
#pragma once
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "stochdepth/drop_path.h"

namespace stochdepth {
namespace launch {

constexpr int kThreads = 256;
constexpr int kChunksPerThread = 4;  // dense and compact: 16-byte chunks in flight per thread
constexpr int kVectorBytes = 16;
constexpr int kWarps = kThreads / 32;
// Blocks per SM that __launch_bounds__ asks for: 4 x 256 threads at <= 64 registers each fills
// the 64K-register file; a 65th register would drop a block per SM.
constexpr int kMinBlocksPerSM = 4;
// gridDim.x is at most 2**31 - 1.
constexpr int64_t kMaxGrid = INT_MAX;

// Elements a block covers: kThreads * kChunksPerThread chunks of `vec` elements.
constexpr int64_t tile_elems(int vec) { return int64_t{kThreads} * kChunksPerThread * vec; }

// constexpr: the compact kernel calls it too (nvcc --expt-relaxed-constexpr).
constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline uint32_t checked_grid(int64_t blocks, int64_t work, const char* what) {
  if (blocks > kMaxGrid) {
    throw std::invalid_argument(std::string("stochdepth: ") + what +
                                " is too large for one CUDA launch (" + std::to_string(work) +
                                " elements)");
  }
  return static_cast<uint32_t>(blocks);
}

// Dense op (drop_path_kernel.cuh): the vector width (16 bytes' worth, or 1 when the pointers
// cannot be aligned together), the lead (elements between the 16-byte boundary below `out` and
// `out`: tile k covers [k * tile - lead, (k + 1) * tile - lead)) and the grid.
struct DenseConfig {
  int vec = 1;
  int64_t lead = 0;
  int64_t tile = 0;
  uint32_t grid = 0;
};

inline DenseConfig dense_config(DType dtype, int64_t numel, uintptr_t shortcut, uintptr_t input,
                                uintptr_t out) {
  const auto size = static_cast<uintptr_t>(dtype_size(dtype));
  const uintptr_t mis = out % kVectorBytes;
  // The three pointers at the same offset within 16 bytes (one lead of fewer than V elements
  // then aligns them all), each aligned to its element size.
  const bool vector = out % size == 0 && input % kVectorBytes == mis &&
                      (shortcut == 0 || shortcut % kVectorBytes == mis);
  DenseConfig c;
  c.vec = vector ? kVectorBytes / static_cast<int>(size) : 1;
  c.lead = vector ? static_cast<int64_t>(mis / size) : 0;
  c.tile = tile_elems(c.vec);
  c.grid = checked_grid(ceil_div(numel + c.lead, c.tile), numel, "tensor");
  return c;
}

// Compact rows (compact_kernel.cuh): one block per tile of one row. Vector accesses need every
// row start 16-byte aligned in all three tensors: aligned base pointers and inner % V == 0.
struct CompactConfig {
  int vec = 1;
  int64_t tile = 0;
  int64_t tiles_per_row = 0;
  uint32_t grid = 0;
};

inline CompactConfig compact_config(DType dtype, int64_t batch, int64_t inner, uintptr_t shortcut,
                                    uintptr_t input, uintptr_t out) {
  const auto size = static_cast<int64_t>(dtype_size(dtype));
  const int v = kVectorBytes / static_cast<int>(size);
  const bool vector = inner % v == 0 && out % kVectorBytes == 0 && input % kVectorBytes == 0 &&
                      shortcut % kVectorBytes == 0;
  CompactConfig c;
  c.vec = vector ? v : 1;
  c.tile = tile_elems(c.vec);
  c.tiles_per_row = ceil_div(inner, c.tile);
  // batch * tiles_per_row without overflow: compare before multiplying.
  const int64_t blocks =
      c.tiles_per_row > kMaxGrid / (batch > 0 ? batch : 1) ? kMaxGrid + 1 : batch * c.tiles_per_row;
  c.grid = checked_grid(blocks, batch * inner, "tensor");
  return c;
}

}  // namespace launch
}  // namespace stochdepth
