// CUDA kernels for the compact-row forms behind StochasticResidual (drop_path.h): the forward
// scatter-add of a residual computed for the kept samples only, and the backward gather of
// grad_out at the kept samples. One block per tile of one row of the full tensor; the block
// computes its sample's keep bit and its index among the kept samples (counting the kept samples
// before it from the same Philox stream), so there is no mask or index tensor and no host sync.
// Not here: the dense op (drop_path.cu) and validation (the bindings and the torch adapter).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>

#include "arith.cuh"
#include "compact.cuh"
#include "cuda_check.h"
#include "stochdepth/cuda_api.h"
#include "stochdepth/mask.h"

namespace stochdepth {
namespace {

// ---- launch configuration
constexpr int kThreads = 256;
constexpr int kElemsPerThread = 8;
constexpr int64_t kTile = int64_t{kThreads} * kElemsPerThread;

// ---- kernels

struct CompactArgs {
  const void* shortcut;  // [batch, inner] or nullptr
  const void* input;     // forward: [n_kept, inner]; backward: [batch, inner]
  void* out;             // forward: [batch, inner]; backward: [n_kept, inner]
  int64_t batch, inner, tiles_per_row;
  uint64_t seed, offset, threshold;
  float scale_f32;
  double scale_f64;
  bool batch_mode, compact_input, in_place;
};

// Number of kept samples among [0, b) of the row-mode stream, summed over the block.
__device__ int64_t kept_before(const CompactArgs& a, int64_t b) {
  __shared__ unsigned long long count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  unsigned long long mine = 0;
  const uint64_t blocks = (static_cast<uint64_t>(b) + 3) >> 2;  // Philox blocks touching [0, b)
  for (uint64_t q = threadIdx.x; q < blocks; q += kThreads) {
    const Philox4x32 w = mask_block(a.seed, a.offset, q);
    for (int j = 0; j < 4; ++j) {
      const uint64_t sample = 4 * q + j;
      mine += (sample < static_cast<uint64_t>(b) && w.v[j] < a.threshold) ? 1 : 0;
    }
  }
  atomicAdd(&count, mine);
  __syncthreads();
  return static_cast<int64_t>(count);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) compact_kernel(const CompactArgs a) {
  using A = Arith<T>;
  using C = typename A::C;
  const int64_t row = static_cast<int64_t>(blockIdx.x) / a.tiles_per_row;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) % a.tiles_per_row;
  const int64_t col0 = tile * kTile;
  const int64_t cols = min(kTile, a.inner - col0);
  __shared__ bool keep;
  if (threadIdx.x == 0) {
    keep =
        keep_sample(a.seed, a.offset, a.batch_mode ? 0 : static_cast<uint64_t>(row), a.threshold);
  }
  __syncthreads();
  const T* sc = static_cast<const T*>(a.shortcut);
  const T* in = static_cast<const T*>(a.input);
  T* out = static_cast<T*>(a.out);
  const int64_t full = row * a.inner + col0;
  if (!keep) {
    if (!a.compact_input || a.in_place) return;  // backward: no row; in place: already shortcut
    for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
      out[full + i] = sc ? sc[full + i] : A::store(C(0));
    }
    return;
  }
  const int64_t kidx = a.batch_mode ? row : kept_before(a, row);
  const int64_t compact = kidx * a.inner + col0;
  const C s = A::scale(a.scale_f32, a.scale_f64);
  if (a.compact_input) {
    for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
      const C scaled = A::mul(s, A::load(in[compact + i]));
      out[full + i] = A::store(sc ? A::add(A::load(sc[full + i]), scaled) : scaled);
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += kThreads) {
      out[compact + i] = A::store(A::mul(s, A::load(in[full + i])));
    }
  }
}

}  // namespace

// ---- launcher

void launch_compact(const DropPathParams& p, cudaStream_t stream) {
  if (p.outer != 1) {
    throw std::invalid_argument("CUDA compact rows need the sample axis first (outer == 1)");
  }
  if (p.numel() == 0) return;
  CompactArgs a{p.shortcut,      p.input,
                p.out,           p.batch,
                p.inner,         (p.inner + kTile - 1) / kTile,
                p.seed,          p.offset,
                p.threshold,     p.scale_f32,
                p.scale_f64,     p.batch_mode,
                p.compact_input, p.shortcut != nullptr && p.shortcut == p.out};
  const int64_t blocks = p.batch * a.tiles_per_row;
  if (blocks > INT32_MAX) throw std::invalid_argument("tensor too large for the compact kernel");
  switch (p.dtype) {
    case DType::kFloat16:
      compact_kernel<__half><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      break;
    case DType::kBFloat16:
      compact_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      break;
    case DType::kFloat32:
      compact_kernel<float><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      break;
    case DType::kFloat64:
      compact_kernel<double><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      break;
  }
  STOCHDEPTH_LAUNCH_CHECK();
}

}  // namespace stochdepth
