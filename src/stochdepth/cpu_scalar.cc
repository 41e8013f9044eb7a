// The portable CPU path: plain C++ (baseline x86-64 / any target), always compiled, also the
// fallback on CPUs without AVX2/FMA/F16C. The algorithm itself is in cpu_kernel_impl.inc.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_kernels.h"
#include "half.h"
#include "mask.h"

namespace stochdepth {
namespace scalar {
namespace {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Width-1 "vectors": the scalar path is the shared loop with one element per step.
template <class T>
struct Vec;
template <class T>
struct ScalarVec {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  using V = C;
  static constexpr int64_t kWidth = 1;
  static constexpr bool kPartial = false;
  static V set1(C s) { return s; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
};
template <>
struct Vec<float> : ScalarVec<float> {
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static void stream(float* p, V v) { *p = v; }
};
template <>
struct Vec<double> : ScalarVec<double> {
  static V load(const double* p) { return *p; }
  static void store(double* p, V v) { *p = v; }
  static void stream(double* p, V v) { *p = v; }
};
template <>
struct Vec<Half> : ScalarVec<Half> {
  static V load(const Half* p) { return half_to_float(p->bits); }
  static void store(Half* p, V v) { p->bits = float_to_half(v); }
  static void stream(Half* p, V v) { p->bits = float_to_half(v); }
};
template <>
struct Vec<BFloat16> : ScalarVec<BFloat16> {
  static V load(const BFloat16* p) { return bf16_to_float(p->bits); }
  static void store(BFloat16* p, V v) { p->bits = float_to_bf16(v); }
  static void stream(BFloat16* p, V v) { p->bits = float_to_bf16(v); }
};

// No portable non-temporal store: `stream` is a plain store here.
void copy_bytes(void* dst, const void* src, size_t n, bool) { std::memcpy(dst, src, n); }
void zero_bytes(void* dst, size_t n, bool) { std::memset(dst, 0, n); }
void store_fence() {}

// One Philox block at a time: the header's own function (mask.h), which the vector units'
// known-answer tests are checked against.
constexpr int kMaskBlocks = 1;
void mask_blocks(uint64_t q0, uint64_t seed, uint64_t offset, uint32_t words[4][kMaskBlocks]) {
  const Philox4x32 x = mask_block(seed, offset, q0);
  for (int w = 0; w < 4; ++w) words[w][0] = x.v[w];
}

void philox_scalar(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  const Philox4x32 x =
      philox4x32_10(Philox4x32{{counter[0], counter[1], counter[2], counter[3]}}, key[0], key[1]);
  for (int i = 0; i < 4; ++i) out[i] = x.v[i];
}

// The shared algorithm, compute_mask included (it calls mask_blocks above).
#include "cpu_kernel_impl.inc"

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{Isa::kScalar,        &run_range,         &copy_range,
                            &compute_mask,       &philox_scalar,     &gamma_backward_blocks,
                            &gamma_add_partials, &gamma_store_totals};
  return k;
}

}  // namespace scalar
}  // namespace stochdepth
