// The AVX2/FMA/F16C CPU path: 8-lane (4 for double) vector traits around the shared algorithm
// (cpu_kernel_impl.inc), and the mask with Philox4x32-10 on 8 blocks at once. The ONLY unit
// compiled with -mavx2 -mfma -mf16c; isa.cc hands out its table only after CPUID + XGETBV said
// the CPU and OS support it. No namespace-scope SIMD constants: they would run at load time.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_kernels.h"
#include "half.h"
#include "philox.h"  // philox_rounds, on a lane type of this unit (internal linkage)

namespace stochdepth {
namespace avx2 {
namespace {

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <class T>
struct Vec;

// float, and the half types widened to float: 8 lanes of __m256.
struct Float8 {
  using C = float;
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr bool kPartial = false;  // tails go element by element
  static V set1(C s) { return _mm256_set1_ps(s); }
  // Separate multiply and add (never _mm256_fmadd_ps): docs/design.md, "Arithmetic".
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
};

template <>
struct Vec<float> : Float8 {
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
};

template <>
struct Vec<Half> : Float8 {
  static V load(const Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m128i round(V v) {
    return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static void store(Half* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round(v)); }
  static void stream(Half* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), round(v)); }
};

// bfloat16: 16 elements a step, as two float vectors. unpacklo/hi_epi16 with zeros widen
// within each 128-bit lane (elements 0-3 and 8-11, then 4-7 and 12-15) and packus_epi32 narrows
// back in the same lane order, so the original order comes out without a permute, and a step is
// one 32-byte load per input and one 32-byte store. This is where bfloat16 spends its time.
struct Float8x2 {
  __m256 lo, hi;
};

template <>
struct Vec<BFloat16> {
  using C = float;
  using V = Float8x2;
  static constexpr int64_t kWidth = 16;
  static constexpr bool kPartial = false;
  static V set1(C s) { return {_mm256_set1_ps(s), _mm256_set1_ps(s)}; }
  static V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  static V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  static V load(const BFloat16* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    return {_mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v)),
            _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v))};
  }
  // Round to nearest even like float_to_bf16 in half.h: add 0x7FFF plus the kept lowest bit,
  // keep the high half. NaN (rare: checked for the whole step at once) becomes sign | 0x7FC0.
  static __m256i round8(__m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)),
                             16);
  }
  static __m256i fix_nan8(__m256 v, __m256i r) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i nan =
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x8000)),
                        _mm256_set1_epi32(0x7FC0));
    return _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  }
  static __m256i round(V v) {
    __m256i lo = round8(v.lo), hi = round8(v.hi);
    const __m256 unordered = _mm256_or_ps(_mm256_cmp_ps(v.lo, v.lo, _CMP_UNORD_Q),
                                          _mm256_cmp_ps(v.hi, v.hi, _CMP_UNORD_Q));
    if (_mm256_movemask_ps(unordered) != 0) {
      lo = fix_nan8(v.lo, lo);
      hi = fix_nan8(v.hi, hi);
    }
    return _mm256_packus_epi32(lo, hi);
  }
  static void store(BFloat16* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round(v));
  }
  static void stream(BFloat16* p, V v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), round(v));
  }
};

template <>
struct Vec<double> {
  using C = double;
  using V = __m256d;
  static constexpr int64_t kWidth = 4;
  static constexpr bool kPartial = false;
  static V set1(C s) { return _mm256_set1_pd(s); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
};

// Byte copies and fills for dropped rows. Streaming: whole 64-byte lines of the destination get
// non-temporal stores, the partial lines at either end ordinary ones (never both on one line).
void copy_bytes(void* dst, const void* src, size_t n, bool stream) {
  if (!stream) {
    std::memcpy(dst, src, n);
    return;
  }
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const size_t head =
      std::min(n, static_cast<size_t>((64 - reinterpret_cast<uintptr_t>(d) % 64) % 64));
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 64 <= n; i += 64) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
  }
  std::memcpy(d + i, s + i, n - i);
}

void zero_bytes(void* dst, size_t n, bool stream) {
  if (!stream) {
    std::memset(dst, 0, n);
    return;
  }
  char* d = static_cast<char*>(dst);
  const size_t head =
      std::min(n, static_cast<size_t>((64 - reinterpret_cast<uintptr_t>(d) % 64) % 64));
  std::memset(d, 0, head);
  size_t i = head;
  const __m256i z = _mm256_setzero_si256();
  for (; i + 64 <= n; i += 64) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), z);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), z);
  }
  std::memset(d + i, 0, n - i);
}

void store_fence() { _mm_sfence(); }

// ---- Philox4x32-10 on 8 independent blocks (philox.h's rounds, one block per 32-bit lane)

struct Lanes8 {
  using V = __m256i;
  static V set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V bit_xor(V a, V b) { return _mm256_xor_si256(a, b); }
  // hi and lo words of the 32x32 -> 64-bit products m * c, lane by lane.
  static void mulhilo(uint32_t m, V c, V& hi, V& lo) {
    const V mv = set1(m);
    lo = _mm256_mullo_epi32(mv, c);
    const V even = _mm256_mul_epu32(mv, c);                                               // 0,2,4,6
    const V odd = _mm256_mul_epu32(_mm256_srli_epi64(mv, 32), _mm256_srli_epi64(c, 32));  // 1,3,5,7
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
};

void philox8(__m256i c[4], uint32_t key0, uint32_t key1) { philox_rounds<Lanes8>(c, key0, key1); }

constexpr int kMaskBlocks = 8;  // Philox blocks drawn at once by mask_blocks

// Blocks q0 .. q0+7 of the mask stream: words[w][j] is word w of block q0 + j.
void mask_blocks(uint64_t q0, uint64_t seed, uint64_t offset, uint32_t words[4][kMaskBlocks]) {
  alignas(32) uint32_t lo[8], hi[8];
  for (int j = 0; j < 8; ++j) {
    const uint64_t q = q0 + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(q);
    hi[j] = static_cast<uint32_t>(q >> 32);
  }
  __m256i c[4] = {_mm256_load_si256(reinterpret_cast<const __m256i*>(lo)),
                  _mm256_load_si256(reinterpret_cast<const __m256i*>(hi)),
                  _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset))),
                  _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)))};
  philox8(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int w = 0; w < 4; ++w) _mm256_storeu_si256(reinterpret_cast<__m256i*>(words[w]), c[w]);
}

void philox_avx2(const uint32_t counter[4], const uint32_t key[2], uint32_t out[4]) {
  __m256i c[4];
  for (int w = 0; w < 4; ++w) c[w] = _mm256_set1_epi32(static_cast<int>(counter[w]));
  philox8(c, key[0], key[1]);
  for (int w = 0; w < 4; ++w) out[w] = static_cast<uint32_t>(_mm256_extract_epi32(c[w], 0));
}

// The shared algorithm, compute_mask included (it calls mask_blocks above).
#include "cpu_kernel_impl.inc"

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{Isa::kAvx2,          &run_range,         &copy_range,
                            &compute_mask,       &philox_avx2,       &gamma_backward_blocks,
                            &gamma_add_partials, &gamma_store_totals};
  return k;
}

}  // namespace avx2
}  // namespace stochdepth
