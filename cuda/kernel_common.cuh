// What every kernel body in cuda/ shares: the block/thread index they take as a parameter, the
// 16-byte Packed vector (host and device), the streaming load, the Philox draw cache, and the
// arguments of the op's kernels (KernelParams). A kernel is a struct K with Args, Shared (its
// __shared__ memory), Thread (per-thread values that live across a barrier), kPhases, and phase(i,
// ...): run_kernel<K> (the __global__ wrapper, in drop_path.cu) and emulate<K> (emulator.cu) both
// run the phases with a barrier between them.
#pragma once
#include <cuda_runtime.h>  // uint4 and the CUDA keywords (host-callable too)

#include <cstdint>

#include "arith.cuh"
#include "launch_config.h"
#include "stochdepth/mask.h"

#if defined(__CUDACC__)
#define STOCHDEPTH_KERNEL_FN __host__ __device__ __forceinline__
#else
#define STOCHDEPTH_KERNEL_FN inline
#endif

namespace stochdepth {

// The arguments of the op's kernels (dense and compact), by value: the call's parameters as the
// host derived them (params.h), and what the launch configuration (launch_config.h) adds for the
// kernel body. The kernels read the call from `p` only, so a new per-call input is one field of
// DropPathParams for the CPU and CUDA paths alike.
struct KernelParams {
  DropPathParams p;
  int64_t numel;  // p.numel(), once: recomputed, it grew DenseKernel<__half, 1> by 21% (SASS)
  int32_t lead;   // dense: launch::DenseConfig::lead (< 16 elements); 0 for compact
  // p.shortcut is p.out. Derived in the kernel instead, DenseKernel<float, 4> (sm_90) and
  // DenseKernel<double, 2> (sm_120) spilled.
  bool in_place;
};
// Measured with nvcc 13 for sm_90: a kernel argument of 136 bytes (against 128) made the compiler
// read it through a pointer held in a register, and DenseKernel<float, 4> spilled 56 bytes. At 120
// bytes there is room for one more pointer.
static_assert(sizeof(KernelParams) <= 128, "kernel arguments over 128 bytes spill (see above)");

inline KernelParams kernel_params(const DropPathParams& p, int64_t lead) {
  return KernelParams{p, p.numel(), static_cast<int32_t>(lead),
                      p.shortcut != nullptr && p.shortcut == p.out};
}

struct Idx {
  uint32_t block;   // blockIdx.x
  uint32_t thread;  // threadIdx.x
};

// V elements of T moved as one access: 16 bytes (LDG.128 / STG.128) when V * sizeof(T) == 16,
// a plain scalar access when V == 1. The elements live in one uint4 (four 32-bit registers)
// rather than an array of T, which nvcc would keep as V separate registers for 2-byte types.
template <typename T, int V>
struct Packed {
  static_assert(V * sizeof(T) == launch::kVectorBytes, "a vector is 16 bytes");
  uint4 raw;
  STOCHDEPTH_KERNEL_FN T get(int j) const { return reinterpret_cast<const T*>(&raw)[j]; }
  STOCHDEPTH_KERNEL_FN void set(int j, T x) { reinterpret_cast<T*>(&raw)[j] = x; }
};
template <typename T>
struct Packed<T, 1> {
  T raw;
  STOCHDEPTH_KERNEL_FN T get(int) const { return raw; }
  STOCHDEPTH_KERNEL_FN void set(int, T x) { raw = x; }
};

// A load of data the kernel reads exactly once: evict-first (ld.global.cs) on the device, so a
// streamed tensor does not push reusable lines out of L2; a plain load on the host.
template <typename T, int V>
STOCHDEPTH_KERNEL_FN Packed<T, V> load_once(const T* p) {
  Packed<T, V> r;
#ifdef __CUDA_ARCH__
  if constexpr (V == 1) {
    r.raw = __ldcs(p);
  } else {
    r.raw = __ldcs(reinterpret_cast<const uint4*>(p));
  }
#else
  r = *reinterpret_cast<const Packed<T, V>*>(p);
#endif
  return r;
}

// A store of V elements as one access: on the device one 16-byte st.global.v4 (__stwb, the
// default write-back policy), since nvcc 13 for sm_90 split the plain `*(P*)p = v` of the first
// unrolled chunk into four 4-byte stores (tools/check_ptx.py checks every vector kernel); a plain
// store on the host and for V == 1.
template <typename T, int V>
STOCHDEPTH_KERNEL_FN void store_vec(T* p, const Packed<T, V>& v) {
#ifdef __CUDA_ARCH__
  if constexpr (V == 1) {
    *p = v.raw;
  } else {
    __stwb(reinterpret_cast<uint4*>(p), v.raw);
  }
#else
  *reinterpret_cast<Packed<T, V>*>(p) = v;
#endif
}

// A launch's (seed, offset): the kernel arguments, or (graph-safe path, DropPathParams::rng_words)
// the two words in device memory as they are when the kernel runs. Every thread that draws reads
// them itself (16 bytes, served from L1/L2 after the first): no barrier, no shared copy.
struct RngWords {
  uint64_t seed, offset;
};
STOCHDEPTH_KERNEL_FN RngWords rng_words(uint64_t seed, uint64_t offset, const uint64_t* words) {
  if (words == nullptr) return RngWords{seed, offset};
  return RngWords{words[0], words[1]};
}

// The draws of samples 4q .. 4q+3 are the four words of one Philox block (docs/design.md,
// "The mask stream"). A tile of a tensor with inner = 1 holds thousands of consecutive samples,
// so the kernel keeps the last block and reads sample b's word from it: a quarter of the Philox
// work (mask_block of mask.h, the same block mask_draw reads).
struct DrawCache {
  uint64_t q = ~uint64_t{0};
  Philox4x32 words{};

  STOCHDEPTH_KERNEL_FN bool keep(uint64_t seed, uint64_t offset, uint64_t b, uint64_t threshold) {
    if ((b >> 2) != q) {
      q = b >> 2;
      words = mask_block(seed, offset, q);
    }
    // Select the word with compares: indexing words.v by a run-time value would put the block in
    // local memory.
    const uint32_t w =
        (b & 2) ? ((b & 1) ? words.v[3] : words.v[2]) : ((b & 1) ? words.v[1] : words.v[0]);
    return static_cast<uint64_t>(w) < threshold;
  }
};

}  // namespace stochdepth
