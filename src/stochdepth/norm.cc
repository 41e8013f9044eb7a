// The fused norm's entries (norm.h): the CPU/CUDA choice, and the CPU runner, which computes the
// mask once per call (compute_mask, the op's own) and splits rows, or blocks of rows, over the
// thread pool, calling the active ISA's norm table. The arithmetic is in norm_kernel_impl.inc.
#include "norm.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "drop_path.h"
#include "norm_kernels.h"
#include "thread_pool.h"

namespace stochdepth {

#if defined(STOCHDEPTH_NORM_CUDA)
void norm_forward_cuda(const NormParams& params, Device device, void* stream);  // cuda/norm.cu
void norm_backward_cuda(const NormParams& params, Device device, void* stream);
#endif

const NormKernels& norm_kernels(Isa isa) {
  switch (isa) {
#if defined(STOCHDEPTH_HAVE_AVX512)
    case Isa::kAvx512Bf16:
    case Isa::kAvx512:
      return norm_avx512::kernels();
#endif
#if defined(STOCHDEPTH_HAVE_AVX2)
    case Isa::kAvx2:
      return norm_avx2::kernels();
#endif
#if defined(STOCHDEPTH_HAVE_NEON)
    case Isa::kNeon:
      return norm_neon::kernels();
#endif
    default:
      return norm_scalar::kernels();
  }
}

namespace {

void check_cuda(Device device) {
#if !defined(STOCHDEPTH_NORM_CUDA)
  if (device.kind == DeviceKind::kCUDA) {
    throw std::invalid_argument(
        "stochdepth was built without CUDA: the fused norm runs on the CPU");
  }
#else
  (void)device;
#endif
}

std::vector<uint8_t> cpu_mask(const NormParams& p) {
  std::vector<uint8_t> keep;
  if (p.training) {
    keep.resize(static_cast<size_t>(p.batch));
    const uint64_t seed = p.rng_words ? p.rng_words[0] : p.seed;
    const uint64_t offset = p.rng_words ? p.rng_words[1] : p.offset;
    compute_mask(keep.data(), p.batch, seed, offset, p.threshold, p.batch_mode);
  }
  return keep;
}

int64_t row_bytes(const NormParams& p) {
  return p.width * static_cast<int64_t>(dtype_size(p.dtype));
}

}  // namespace

void norm_forward(const NormParams& p, Device device, void* stream) {
  check_cuda(device);
#if defined(STOCHDEPTH_NORM_CUDA)
  if (device.kind == DeviceKind::kCUDA) return norm_forward_cuda(p, device, stream);
#else
  (void)stream;
#endif
  const int64_t rows = p.rows();
  if (rows == 0 || p.width == 0) return;
  const NormKernels& k = norm_kernels(active_isa());
  const std::vector<uint8_t> keep = cpu_mask(p);
  // Rows are independent and each is computed whole by one thread: the result does not depend
  // on the split.
  // Outputs past the store threshold are written with non-temporal stores, as the op's are.
  const int64_t moved = 4 * rows * row_bytes(p);
  const bool nontemporal = moved >= cpu_stream_threshold_bytes();
  parallel_for(rows, 1, threads_for(moved), [&](int64_t begin, int64_t end) {
    k.forward_rows(p, keep.data(), begin, end, nontemporal);
  });
}

void norm_backward(const NormParams& p, Device device, void* stream) {
  check_cuda(device);
#if defined(STOCHDEPTH_NORM_CUDA)
  if (device.kind == DeviceKind::kCUDA) return norm_backward_cuda(p, device, stream);
#else
  (void)stream;
#endif
  const int64_t rows = p.rows(), c = p.width;
  if (c == 0) return;  // no rows: the column sums are +0, written below
  const NormKernels& k = norm_kernels(active_isa());
  const std::vector<uint8_t> keep = cpu_mask(p);
  const size_t compute_size = p.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t blocks = (rows + kNormRowBlock - 1) / kNormRowBlock;
  // Block sums of a wave of blocks are computed in parallel, then added to the totals in block
  // order: the order of docs/design.md, "Fused residual and norm", whatever the thread count;
  // the wave only bounds the memory of the partial sums.
  const int64_t wave = std::max<int64_t>(1, std::min<int64_t>(blocks, (int64_t{1} << 20) / c));
  std::vector<unsigned char> partials(static_cast<size_t>(wave * 3 * c) * compute_size);
  std::vector<unsigned char> totals(static_cast<size_t>(3 * c) * compute_size, 0);  // +0
  const int64_t moved = 6 * rows * row_bytes(p);
  const int threads = threads_for(moved);
  const bool nontemporal = moved >= cpu_stream_threshold_bytes();
  for (int64_t first = 0; first < blocks; first += wave) {
    const int64_t count = std::min(wave, blocks - first);
    parallel_for(count, 1, threads, [&](int64_t begin, int64_t end) {
      k.backward_blocks(p, keep.data(), first + begin, first + end, first, partials.data(),
                        nontemporal);
    });
    k.add_partials(p, partials.data(), count, totals.data());
  }
  k.store_totals(p, totals.data());
}

}  // namespace stochdepth
