// The aarch64 NEON (Advanced SIMD) CPU path: 4-lane float, 2-lane double and 8-element half /
// bfloat16 vector traits around the shared algorithm (cpu_kernel_impl.inc), and the mask with
// Philox4x32-10 on 4 blocks at once. NEON is baseline on aarch64: no flags, no run-time check
// (isa.cc). No namespace-scope SIMD constants, like the x86 units.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_kernels.h"
#include "half.h"
#include "philox.h"  // philox_rounds, on a lane type of this unit (internal linkage)

namespace stochdepth {
namespace neon {
namespace {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <class T>
struct Vec;

// Lanes of `v` that hold a NaN (all ones), and whether any lane does.
inline uint32x4_t nan_lanes(float32x4_t v) { return vmvnq_u32(vceqq_f32(v, v)); }
inline bool any_lane(uint32x4_t m) { return vmaxvq_u32(m) != 0; }

// Non-temporal stores: plain stores. AArch64's only non-temporal store (STNP) is a hint with no
// ACLE intrinsic, and the cores that matter (Neoverse, Apple, Cortex-A7x) already detect a run
// of whole-line writes and stop fetching the lines they overwrite, which is what streaming
// saves on x86. So `stream` is `store`, and store_fence has nothing to order.
struct Float4 {
  using C = float;
  using V = float32x4_t;
  static constexpr int64_t kWidth = 4;
  static constexpr bool kPartial = false;  // no masked loads: tails go element by element
  static V set1(C s) { return vdupq_n_f32(s); }
  // Separate multiply and add (never vfmaq_f32): docs/design.md, "Arithmetic".
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
};

template <>
struct Vec<float> : Float4 {
  static V load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  static void stream(float* p, V v) { vst1q_f32(p, v); }
};

// The 16-bit types: 8 elements a step (one 16-byte load per input, one 16-byte store), as two
// float vectors.
struct Float4x2 {
  float32x4_t lo, hi;
};

struct Float4x2Ops {
  using C = float;
  using V = Float4x2;
  static constexpr int64_t kWidth = 8;
  static constexpr bool kPartial = false;
  static V set1(C s) { return {vdupq_n_f32(s), vdupq_n_f32(s)}; }
  static V mul(V a, V b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
  static V add(V a, V b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
};

// float16 with the hardware conversions (FCVTL/FCVTN, baseline AArch64): exact on the way in,
// rounded per FPCR on the way out, which Linux leaves at round to nearest even with no flush to
// zero, so subnormals and overflow to Inf agree with float_to_half. The one difference is a
// signalling NaN: the hardware sets its quiet bit, half.h (like NumPy) keeps the payload as is.
// The stored value always comes out of a multiply, so it is never signalling, but the store is
// made exact anyway (a NaN in the step is rare and checked once for the step). On the way in,
// a signalling NaN comes out quiet; the multiply or add it goes into would quiet it anyway, and
// AArch64 then returns the first NaN operand either way (as the scalar code does).
template <>
struct Vec<Half> : Float4x2Ops {
  static V load(const Half* p) {
    const float16x8_t h = vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p)));
    return {vcvt_f32_f16(vget_low_f16(h)), vcvt_high_f32_f16(h)};
  }
  // float_to_half's NaN, lane by lane: sign | 0x7C00 | the top 10 payload bits, 0x7C01 if those
  // are all zero (never Inf).
  static uint16x4_t nan4(float32x4_t v) {
    const uint32x4_t x = vreinterpretq_u32_f32(v);
    const uint32x4_t payload = vandq_u32(vshrq_n_u32(x, 13), vdupq_n_u32(0x3FF));
    const uint32x4_t quiet = vandq_u32(vceqzq_u32(payload), vdupq_n_u32(1));
    const uint32x4_t sign = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(0x8000));
    return vmovn_u32(vorrq_u32(vorrq_u32(sign, vdupq_n_u32(0x7C00)), vorrq_u32(payload, quiet)));
  }
  static uint16x8_t round(V v) {
    uint16x8_t r =
        vreinterpretq_u16_f16(vcvt_high_f16_f32(vcvt_f16_f32(v.lo), v.hi));  // RNE per FPCR
    const uint32x4_t nan_lo = nan_lanes(v.lo), nan_hi = nan_lanes(v.hi);
    if (any_lane(vorrq_u32(nan_lo, nan_hi))) {
      const uint16x8_t nan = vcombine_u16(nan4(v.lo), nan4(v.hi));
      r = vbslq_u16(vcombine_u16(vmovn_u32(nan_lo), vmovn_u32(nan_hi)), nan, r);
    }
    return r;
  }
  static void store(Half* p, V v) { vst1q_u16(reinterpret_cast<uint16_t*>(p), round(v)); }
  static void stream(Half* p, V v) { store(p, v); }
};

// bfloat16 with integer operations (no BF16 extension is assumed): widening is a shift left by
// 16; narrowing rounds to nearest even like float_to_bf16 in half.h (add 0x7FFF plus the kept
// lowest bit, keep the high half), and a NaN (rare: checked once for the step) becomes
// sign | 0x7FC0.
template <>
struct Vec<BFloat16> : Float4x2Ops {
  static V load(const BFloat16* p) {
    const uint16x8_t v = vld1q_u16(reinterpret_cast<const uint16_t*>(p));
    return {vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)),
            vreinterpretq_f32_u32(vshll_high_n_u16(v, 16))};
  }
  // The rounded value, still in the high half of each 32-bit lane.
  static uint32x4_t round4(float32x4_t v) {
    const uint32x4_t x = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(x, vaddq_u32(vdupq_n_u32(0x7FFF), lsb));
    const uint32x4_t nan = nan_lanes(v);
    if (any_lane(nan)) {
      const uint32x4_t qnan =
          vorrq_u32(vandq_u32(x, vdupq_n_u32(0x80000000u)), vdupq_n_u32(0x7FC00000u));
      r = vbslq_u32(nan, qnan, r);
    }
    return r;
  }
  static uint16x8_t round(V v) {
    return vshrn_high_n_u32(vshrn_n_u32(round4(v.lo), 16), round4(v.hi), 16);
  }
  static void store(BFloat16* p, V v) { vst1q_u16(reinterpret_cast<uint16_t*>(p), round(v)); }
  static void stream(BFloat16* p, V v) { store(p, v); }
};

template <>
struct Vec<double> {
  using C = double;
  using V = float64x2_t;
  static constexpr int64_t kWidth = 2;
  static constexpr bool kPartial = false;
  static V set1(C s) { return vdupq_n_f64(s); }
  static V mul(V a, V b) { return vmulq_f64(a, b); }
  static V add(V a, V b) { return vaddq_f64(a, b); }
  static V load(const double* p) { return vld1q_f64(p); }
  static void store(double* p, V v) { vst1q_f64(p, v); }
  static void stream(double* p, V v) { vst1q_f64(p, v); }
};

// Dropped rows: glibc's aarch64 memset zeroes whole lines with DC ZVA (no read of the line),
// and memcpy uses paired 16-byte stores, so there is nothing to gain over them here.
void copy_bytes(void* dst, const void* src, size_t n, bool) { std::memcpy(dst, src, n); }
void zero_bytes(void* dst, size_t n, bool) { std::memset(dst, 0, n); }
void store_fence() {}

// ---- Philox4x32-10 on 4 independent blocks (philox.h's rounds, one block per 32-bit lane)

struct Lanes4 {
  using V = uint32x4_t;
  static V set1(uint32_t x) { return vdupq_n_u32(x); }
  static V bit_xor(V a, V b) { return veorq_u32(a, b); }
  // hi and lo words of the 32x32 -> 64-bit products m * c, lane by lane: UMULL/UMULL2 give the
  // four 64-bit products, UZP1/UZP2 split them into low and high words.
  static void mulhilo(uint32_t m, V c, V& hi, V& lo) {
    const uint32x4_t p01 = vreinterpretq_u32_u64(vmull_n_u32(vget_low_u32(c), m));
    const uint32x4_t p23 = vreinterpretq_u32_u64(vmull_high_n_u32(c, m));
    lo = vuzp1q_u32(p01, p23);
    hi = vuzp2q_u32(p01, p23);
  }
};

void philox4(uint32x4_t c[4], uint32_t key0, uint32_t key1) {
  philox_rounds<Lanes4>(c, key0, key1);
}

constexpr int kMaskBlocks = 4;  // Philox blocks drawn at once by mask_blocks

// Blocks q0 .. q0+3 of the mask stream: words[w][j] is word w of block q0 + j.
void mask_blocks(uint64_t q0, uint64_t seed, uint64_t offset, uint32_t words[4][kMaskBlocks]) {
  uint32_t lo[4], hi[4];
  for (int j = 0; j < 4; ++j) {
    const uint64_t q = q0 + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(q);
    hi[j] = static_cast<uint32_t>(q >> 32);
  }
  uint32x4_t c[4] = {vld1q_u32(lo), vld1q_u32(hi), vdupq_n_u32(static_cast<uint32_t>(offset)),
                     vdupq_n_u32(static_cast<uint32_t>(offset >> 32))};
  philox4(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int w = 0; w < 4; ++w) vst1q_u32(words[w], c[w]);
}

void philox_neon(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  uint32x4_t c[4];
  for (int w = 0; w < 4; ++w) c[w] = vdupq_n_u32(counter[w]);
  philox4(c, key[0], key[1]);
  for (int w = 0; w < 4; ++w) out[w] = vgetq_lane_u32(c[w], 0);
}

// The shared algorithm, compute_mask included (it calls mask_blocks above).
#include "cpu_kernel_impl.inc"

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{Isa::kNeon,          &run_range,         &copy_range,
                            &compute_mask,       &philox_neon,       &gamma_backward_blocks,
                            &gamma_add_partials, &gamma_store_totals};
  return k;
}

}  // namespace neon
}  // namespace stochdepth
