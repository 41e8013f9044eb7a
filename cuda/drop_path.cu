// CUDA implementation of cuda_api.h: the drop-path kernel (forward, inference, backward and the
// single-input form are one kernel, templated over the four dtypes), a vectorised device copy
// (the benchmark's ceiling) and device memory helpers. The keep decision comes from mask.h /
// philox.h, shared with the CPU; this file holds no RNG constants and no validation beyond what
// the launch needs (the binding layer validates).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "arith.cuh"
#include "compact.cuh"
#include "cuda_check.h"
#include "stochdepth/cuda_api.h"
#include "stochdepth/mask.h"

#ifndef STOCHDEPTH_CUDA_ARCHS
#define STOCHDEPTH_CUDA_ARCHS ""
#endif

namespace stochdepth {
namespace {

// ---- launch configuration (the one place that sets it)
//
// One block per tile of kThreads * kChunksPerThread 16-byte chunks (16 KiB of each tensor): a
// block keeps up to 32 KiB of loads in flight, and at <= 64 registers a thread (ptxas -v) an SM
// holds 4 blocks, ~128 KiB, well above what hides DRAM latency at full bandwidth. One tile per
// block keeps the kernel free of grid-stride bookkeeping; the grid is ceil(numel / tile).
constexpr int kThreads = 256;
constexpr int kChunksPerThread = 4;
constexpr int kVectorBytes = 16;

template <typename I>
constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// ---- dtype traits: Arith<T> (arith.cuh) holds the pinned conversions and operations

template <typename T>
using ComputeT = typename Arith<T>::C;

// V elements of T moved as one access: 16 bytes (LDG.128 / STG.128) when V * sizeof(T) == 16,
// a plain scalar access when V == 1 (the path for pointers that cannot be aligned together).
// The elements live in one uint4 (four 32-bit registers) rather than an array of T, which nvcc
// would keep as V separate registers for 2-byte types.
template <typename T, int V>
struct Packed {
  static_assert(V * sizeof(T) == kVectorBytes, "a vector is 16 bytes");
  uint4 raw;
  __device__ __forceinline__ T get(int j) const { return reinterpret_cast<const T*>(&raw)[j]; }
  __device__ __forceinline__ void set(int j, T x) { reinterpret_cast<T*>(&raw)[j] = x; }
};
template <typename T>
struct Packed<T, 1> {
  T raw;
  __device__ __forceinline__ T get(int) const { return raw; }
  __device__ __forceinline__ void set(int, T x) { raw = x; }
};

// Everything the kernel needs, by value (the host derived the scalars once: drop_path.h).
struct KernelArgs {
  const void* shortcut;  // [outer, batch, inner] or nullptr (single-input form / backward)
  const void* input;     // [outer, batch, inner] residual, or grad_out in backward
  void* out;             // [outer, batch, inner]; may equal shortcut (in place)
  int64_t numel, batch, inner;
  int64_t lead;  // elements between the 16-byte boundary below `out` and `out` (vector path)
  uint64_t seed, offset, threshold;
  float scale_f32;
  double scale_f64;
  bool training, batch_mode, in_place;
};

// The draws of samples 4q .. 4q+3 are the four words of one Philox block (docs/design.md,
// "The mask stream"). mask_draw(seed, offset, b) computes that block for every sample; a tile of
// a tensor with inner = 1 holds thousands of consecutive samples, so the kernel keeps the last
// block and reads sample b's word from it: a quarter of the Philox work (mask_block of mask.h,
// the same block mask_draw reads).
struct DrawCache {
  uint64_t q = ~uint64_t{0};
  Philox4x32 words{};

  __device__ __forceinline__ bool keep(uint64_t seed, uint64_t offset, uint64_t b,
                                       uint64_t threshold) {
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

// ---- kernels

// out = shortcut + (scale * input) per row (o, b) of [outer, batch, inner], or the dropped form
// (drop_path.h). The flat tensor is cut into tiles; tile k covers elements
// [k * kTile - lead, (k + 1) * kTile - lead), so that with V > 1 every full chunk is 16-byte
// aligned in all three tensors. A block first writes the keep bit of every row its tile touches
// into shared memory (one draw per row, one Philox block per 4 consecutive samples), then streams
// its chunks: all kept -> vector loads and store; all dropped -> the shortcut's bits (or zeros),
// input not read, and nothing at all in place; a chunk across a row boundary -> input read only
// for kept elements, and in place only kept elements stored. Chunks cut by the ends of the
// tensor go element by element.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) drop_path_kernel(const KernelArgs a) {
  using A = Arith<T>;
  using C = ComputeT<T>;
  using P = Packed<T, V>;
  constexpr int64_t kTile = int64_t{kThreads} * kChunksPerThread * V;
  constexpr uint32_t kFull = (1u << V) - 1u;
  // A tile of kTile elements touches at most kTile rows (inner = 1); one byte per row.
  __shared__ uint8_t keep_s[kTile];

  const T* sc = static_cast<const T*>(a.shortcut);
  const T* __restrict__ in = static_cast<const T*>(a.input);
  T* out = static_cast<T*>(a.out);
  const C scale =
      sizeof(C) == sizeof(double) ? static_cast<C>(a.scale_f64) : static_cast<C>(a.scale_f32);

  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile - a.lead;
  const int64_t first = tile_start > 0 ? tile_start : 0;
  const int64_t last = (tile_start + kTile < a.numel ? tile_start + kTile : a.numel) - 1;
  const int64_t r0 = first / a.inner;  // rows (o * batch + b) of the tile: r0 .. r0 + nrows - 1
  const int64_t nrows = last / a.inner - r0 + 1;
  const int64_t origin = r0 * a.inner;  // element offsets below are taken from row r0's start
  // One decision for the whole tile: inference, "batch" mode, or a tile inside one row.
  const bool uniform = !a.training || a.batch_mode || nrows == 1;

  // Chunk u of this thread starts at element e[u]; bit u of `whole` says it lies inside the
  // tensor (a bit set rather than bool[]: predicate registers are few and bools spill).
  int64_t e[kChunksPerThread];
  uint32_t whole = 0;
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    e[u] = tile_start + (int64_t{u} * kThreads + threadIdx.x) * V;
    whole |= uint32_t{e[u] >= 0 && e[u] + V <= a.numel} << u;
  }
  // Out of place, every shortcut element is read whatever the mask says: those loads go out
  // before the mask is drawn, so that DRAM is busy while thread 0 runs Philox.
  P s[kChunksPerThread], x[kChunksPerThread];
  if (sc != nullptr && !a.in_place) {
#pragma unroll
    for (int u = 0; u < kChunksPerThread; ++u) {
      if (whole & (1u << u)) s[u] = *reinterpret_cast<const P*>(sc + e[u]);
    }
  }

  if (a.training) {
    if (a.batch_mode) {
      if (threadIdx.x == 0) keep_s[0] = keep_sample(a.seed, a.offset, 0, a.threshold);
    } else {
      const uint64_t batch = static_cast<uint64_t>(a.batch);
      const uint64_t b_first = static_cast<uint64_t>(r0) % batch;
      // b_first + lr < batch + kTile: 32-bit remainders suffice unless the batch is huge.
      const bool narrow = batch <= (uint64_t{1} << 31);
      // Thread groups of 4 rows start where a Philox block starts (b = 0 mod 4), so each group
      // needs one block (two where the batch wraps inside it).
      const int64_t shift = static_cast<int64_t>(b_first & 3);
      for (int64_t g = threadIdx.x; 4 * g - shift < nrows; g += kThreads) {
        DrawCache cache;
        const int64_t lr_begin = 4 * g - shift > 0 ? 4 * g - shift : 0;
        const int64_t lr_end = 4 * g - shift + 4 < nrows ? 4 * g - shift + 4 : nrows;
        for (int64_t lr = lr_begin; lr < lr_end; ++lr) {
          uint64_t b = b_first + static_cast<uint64_t>(lr);
          if (b >= batch) {
            b = narrow ? static_cast<uint32_t>(b) % static_cast<uint32_t>(batch) : b % batch;
          }
          keep_s[lr] = cache.keep(a.seed, a.offset, b, a.threshold);
        }
      }
    }
    __syncthreads();
    if (uniform && a.in_place && !keep_s[0]) return;  // a dropped tile in place: not touched
  }

  // Local row of element offset `off` (0 <= off < inner + kTile) from row r0's start.
  auto local_row = [&](int64_t off) -> int64_t {
    if (a.inner >= kTile) return off >= a.inner ? 1 : 0;                 // off < 2 * inner
    return static_cast<uint32_t>(off) / static_cast<uint32_t>(a.inner);  // off < 2 * kTile
  };
  auto keep_at = [&](int64_t idx) -> bool {
    return !a.training || (uniform ? keep_s[0] : keep_s[local_row(idx - origin)]) != 0;
  };

  // The keep bits of the elements of each whole chunk.
  uint32_t km[kChunksPerThread];
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    const bool is_whole = (whole >> u) & 1u;
    km[u] = kFull;
    if (is_whole && !uniform) {
      const int64_t off = e[u] - origin;
      int64_t lr = local_row(off);
      int64_t col = off - lr * a.inner;
      if (col + V <= a.inner) {
        km[u] = keep_s[lr] ? kFull : 0u;
      } else {  // the chunk crosses a row boundary
        km[u] = 0u;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (keep_s[lr]) km[u] |= 1u << j;
          if (++col == a.inner) {
            col = 0;
            ++lr;
          }
        }
      }
    } else if (is_whole && a.training) {
      km[u] = keep_s[0] ? kFull : 0u;
    }
  }

  // Every remaining load of the thread before any arithmetic (memory-level parallelism).
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    if (!(whole & (1u << u))) continue;
    if (sc != nullptr && a.in_place && km[u] != 0u) {
      s[u] = *reinterpret_cast<const P*>(sc + e[u]);
    }
    if (km[u] == kFull) {
      x[u] = *reinterpret_cast<const P*>(in + e[u]);
    } else if (km[u] != 0u) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (km[u] & (1u << j)) x[u].set(j, in[e[u] + j]);
      }
    }
  }

  // Arithmetic (multiply rounded, add rounded, one rounding on store) and stores.
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    if (whole & (1u << u)) {
      if (a.in_place && km[u] == 0u) continue;
      P o;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (km[u] & (1u << j)) {
          const C scaled = A::mul(scale, A::load(x[u].get(j)));
          o.set(j, A::store(sc != nullptr ? A::add(A::load(s[u].get(j)), scaled) : scaled));
        } else {
          o.set(j, sc != nullptr ? s[u].get(j) : A::store(C(0)));
        }
      }
      if (!a.in_place || km[u] == kFull) {
        *reinterpret_cast<P*>(out + e[u]) = o;
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if (km[u] & (1u << j)) out[e[u] + j] = o.get(j);
        }
      }
    } else {  // a chunk cut by either end of the tensor: element by element
#pragma unroll 1
      for (int j = 0; j < V; ++j) {
        const int64_t idx = e[u] + j;
        if (idx < 0 || idx >= a.numel) continue;
        if (keep_at(idx)) {
          const C scaled = A::mul(scale, A::load(in[idx]));
          out[idx] = A::store(sc != nullptr ? A::add(A::load(sc[idx]), scaled) : scaled);
        } else if (!a.in_place) {
          out[idx] = sc != nullptr ? sc[idx] : A::store(C(0));
        }
      }
    }
  }
}

// dst[0, bytes) = src[0, bytes), in 16-byte accesses when dst and src are aligned alike (kVector),
// bytes otherwise. Tiles as in drop_path_kernel, shifted by `lead` bytes so chunks are aligned.
template <bool kVector>
__global__ void __launch_bounds__(kThreads)
    stream_copy_kernel(uint8_t* dst, const uint8_t* __restrict__ src, int64_t bytes, int64_t lead) {
  constexpr int kV = kVector ? kVectorBytes : 1;
  constexpr int64_t kTile = int64_t{kThreads} * kChunksPerThread * kV;
  using P = typename std::conditional<kVector, uint4, uint8_t>::type;
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTile - lead;
  P buf[kChunksPerThread];
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    const int64_t e = tile_start + (int64_t{u} * kThreads + threadIdx.x) * kV;
    if (e >= 0 && e + kV <= bytes) buf[u] = *reinterpret_cast<const P*>(src + e);
  }
#pragma unroll
  for (int u = 0; u < kChunksPerThread; ++u) {
    const int64_t e = tile_start + (int64_t{u} * kThreads + threadIdx.x) * kV;
    if (e >= 0 && e + kV <= bytes) {
      *reinterpret_cast<P*>(dst + e) = buf[u];
    } else {
#pragma unroll 1
      for (int j = 0; j < kV; ++j) {
        if (e + j >= 0 && e + j < bytes) dst[e + j] = src[e + j];
      }
    }
  }
}

// ---- launchers

// Makes `device` current for the scope and restores the previous device afterwards, so that a
// tensor on device 1 works and the caller's (e.g. PyTorch's) current device is left alone.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    STOCHDEPTH_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      STOCHDEPTH_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) (void)cudaSetDevice(previous_);  // never throws from a destructor
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

uintptr_t addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

unsigned int grid_for(int64_t work, int64_t tile, const char* what) {
  const int64_t blocks = ceil_div(work, tile);
  if (blocks > INT_MAX) {
    throw std::runtime_error(std::string("stochdepth: ") + what + " is too large for one launch (" +
                             std::to_string(work) + " elements)");
  }
  return static_cast<unsigned int>(blocks);
}

template <typename T>
void launch_drop_path(const DropPathParams& p, cudaStream_t stream) {
  constexpr int kV = kVectorBytes / static_cast<int>(sizeof(T));
  KernelArgs a{};
  a.shortcut = p.shortcut;
  a.input = p.input;
  a.out = p.out;
  a.numel = p.numel();
  a.batch = p.batch;
  a.inner = p.inner;
  a.seed = p.seed;
  a.offset = p.offset;
  a.threshold = p.threshold;
  a.scale_f32 = p.scale_f32;
  a.scale_f64 = p.scale_f64;
  a.training = p.training;
  a.batch_mode = p.batch_mode;
  a.in_place = p.shortcut != nullptr && p.shortcut == p.out;

  // The vector path needs the three pointers at the same offset within 16 bytes (then one lead
  // of fewer than kV elements aligns them all) and each pointer aligned to its element size.
  const uintptr_t mis = addr(p.out) % kVectorBytes;
  const bool vector = addr(p.out) % sizeof(T) == 0 && addr(p.input) % kVectorBytes == mis &&
                      (p.shortcut == nullptr || addr(p.shortcut) % kVectorBytes == mis);
  if (vector) {
    a.lead = static_cast<int64_t>(mis / sizeof(T));
    const int64_t tile = int64_t{kThreads} * kChunksPerThread * kV;
    drop_path_kernel<T, kV><<<grid_for(a.numel + a.lead, tile, "tensor"), kThreads, 0, stream>>>(a);
  } else {
    a.lead = 0;
    const int64_t tile = int64_t{kThreads} * kChunksPerThread;
    drop_path_kernel<T, 1><<<grid_for(a.numel, tile, "tensor"), kThreads, 0, stream>>>(a);
  }
  STOCHDEPTH_LAUNCH_CHECK();
}

}  // namespace

bool cuda_compiled() { return true; }

std::string cuda_architectures() { return STOCHDEPTH_CUDA_ARCHS; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no GPU: clear the error, report none
    return 0;
  }
  return n;
}

void drop_path_cuda(const DropPathParams& params, int device, void* stream) {
  if (params.numel() == 0) return;
  if (params.input == nullptr || params.out == nullptr || params.batch <= 0 || params.inner <= 0 ||
      params.outer <= 0) {
    throw std::invalid_argument("drop_path_cuda: null pointer or non-positive extent");
  }
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  if (params.compact_input || params.compact_output) {
    launch_compact(params, s);  // StochasticResidual's scatter-add / gather (compact.cu)
    return;
  }
  switch (params.dtype) {
    case DType::kFloat16:
      launch_drop_path<__half>(params, s);
      return;
    case DType::kBFloat16:
      launch_drop_path<__nv_bfloat16>(params, s);
      return;
    case DType::kFloat32:
      launch_drop_path<float>(params, s);
      return;
    case DType::kFloat64:
      launch_drop_path<double>(params, s);
      return;
  }
  throw std::invalid_argument("drop_path_cuda: unknown dtype");
}

void stream_copy_cuda(void* dst, const void* src, size_t bytes, int device, void* stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device);
  const auto s = static_cast<cudaStream_t>(stream);
  const auto n = static_cast<int64_t>(bytes);
  const uintptr_t mis = addr(dst) % kVectorBytes;
  auto* d = static_cast<uint8_t*>(dst);
  const auto* sp = static_cast<const uint8_t*>(src);
  if (addr(src) % kVectorBytes == mis) {
    const auto lead = static_cast<int64_t>(mis);
    const int64_t tile = int64_t{kThreads} * kChunksPerThread * kVectorBytes;
    stream_copy_kernel<true><<<grid_for(n + lead, tile, "copy"), kThreads, 0, s>>>(d, sp, n, lead);
  } else {
    const int64_t tile = int64_t{kThreads} * kChunksPerThread;
    stream_copy_kernel<false><<<grid_for(n, tile, "copy"), kThreads, 0, s>>>(d, sp, n, 0);
  }
  STOCHDEPTH_LAUNCH_CHECK();
}

void* cuda_alloc(size_t bytes, int device, void* /*stream*/) {
  // cudaMalloc'ed memory is usable from every stream; freeing it (cudaFree) waits for the
  // device, so a buffer handed to another framework cannot be released under a running kernel.
  DeviceGuard guard(device);
  void* ptr = nullptr;
  STOCHDEPTH_CUDA_CHECK(cudaMalloc(&ptr, bytes == 0 ? 1 : bytes));
  return ptr;
}

void cuda_free(void* ptr, int device) {
  // Called from DLPack deleters and destructors: it must not throw. A failure here (e.g. the
  // runtime already unloading at interpreter exit) leaks the buffer and clears the error.
  if (ptr == nullptr) return;
  int previous = 0;
  const bool switch_device = cudaGetDevice(&previous) == cudaSuccess && previous != device &&
                             cudaSetDevice(device) == cudaSuccess;
  if (cudaFree(ptr) != cudaSuccess) (void)cudaGetLastError();
  if (switch_device) (void)cudaSetDevice(previous);
}

}  // namespace stochdepth
