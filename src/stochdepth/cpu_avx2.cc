// The AVX2/FMA/F16C CPU path. The ONLY translation unit compiled with -mavx2 -mfma -mf16c; the
// dispatcher calls into it only after CPUID + XGETBV said the CPU and OS support it. It defines
// 8-lane (4 for double) vector traits and includes the one shared algorithm, cpu_kernel_impl.inc.
// No namespace-scope SIMD constants: they would run at load time on any CPU.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu_kernels.h"
#include "half.h"

namespace stochdepth {
namespace avx2 {
namespace {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

template <class T> struct Vec;

// float, and the half types widened to float: 8 lanes of __m256.
struct Float8 {
  using C = float;
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static V set1(C s) { return _mm256_set1_ps(s); }
  // Separate multiply and add (never _mm256_fmadd_ps): DESIGN.md pins two roundings.
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
};

template <> struct Vec<float> : Float8 {
  static constexpr uintptr_t kStreamAlign = 32;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }
};

template <> struct Vec<Half> : Float8 {
  static constexpr uintptr_t kStreamAlign = 16;
  static V load(const Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static __m128i round(V v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(Half* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round(v)); }
  static void stream(Half* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), round(v)); }
};

template <> struct Vec<BFloat16> : Float8 {
  static constexpr uintptr_t kStreamAlign = 16;
  static V load(const BFloat16* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // Round to nearest even like float_to_bf16 in half.h; NaN becomes sign | 0x7FC0 (ml_dtypes).
  static __m128i round(V v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(x, 16);
    const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, bias), 16);
    const __m256i nan = _mm256_or_si256(_mm256_and_si256(hi, _mm256_set1_epi32(0x8000)),
                                        _mm256_set1_epi32(0x7FC0));
    const __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, nan, is_nan);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  }
  static void store(BFloat16* p, V v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), round(v)); }
  static void stream(BFloat16* p, V v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), round(v)); }
};

template <> struct Vec<double> {
  using C = double;
  using V = __m256d;
  static constexpr int64_t kWidth = 4;
  static constexpr uintptr_t kStreamAlign = 32;
  static V set1(C s) { return _mm256_set1_pd(s); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm256_stream_pd(p, v); }
};

// Byte copies and fills for dropped rows. Streaming: align the destination to 32 bytes, then
// non-temporal 32-byte stores, two per iteration (one cache line).
void copy_bytes(void* dst, const void* src, size_t n, bool stream) {
  if (!stream) {
    std::memcpy(dst, src, n);
    return;
  }
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const size_t head = std::min(n, static_cast<size_t>((32 - reinterpret_cast<uintptr_t>(d) % 32) % 32));
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
  const size_t head = std::min(n, static_cast<size_t>((32 - reinterpret_cast<uintptr_t>(d) % 32) % 32));
  std::memset(d, 0, head);
  size_t i = head;
  const __m256i z = _mm256_setzero_si256();
  for (; i + 32 <= n; i += 32) _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), z);
  std::memset(d + i, 0, n - i);
}

void store_fence() { _mm_sfence(); }

#include "cpu_kernel_impl.inc"

}  // namespace

const CpuKernels& kernels() {
  static const CpuKernels k{"avx2", &run_range, &copy_range};
  return k;
}

}  // namespace avx2
}  // namespace stochdepth
