// Portable float16 / bfloat16 <-> float conversions (bit manipulation, no intrinsics), rounding to
// nearest even like NumPy (float16) and ml_dtypes (bfloat16), so the reference and every CPU path
// agree bit for bit. Internal linkage (anonymous namespace) on purpose: this header is compiled
// into the scalar and the AVX2 translation units, and an inline function with external linkage
// could be merged across them by the linker (an AVX2 body reaching a CPU without AVX2).
#pragma once
#include <cstdint>
#include <cstring>

namespace stochdepth {
namespace {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1F) return bits_float(sign | 0x7F800000u | (mant << 13));  // Inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);  // +-0
  // Subnormal half: normalise into a float.
  uint32_t e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return bits_float(sign | (e << 23) | ((mant & 0x3FFu) << 13));
}

inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) {
    if (ax == 0x7F800000u) return sign | 0x7C00u;
    // NaN: keep the top payload bits as NumPy does, and never turn it into Inf.
    uint16_t r = static_cast<uint16_t>(0x7C00u + (ax >> 13 & 0x3FFu));
    if (r == 0x7C00u) ++r;
    return sign | r;
  }
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504: Inf
  if (ax >= 0x38800000u) {                       // normal half
    const uint32_t rounded = ax + 0xFFFu + ((ax >> 13) & 1u);
    return sign | static_cast<uint16_t>((rounded - 0x38000000u) >> 13);
  }
  const uint32_t e = ax >> 23;
  if (e < 102) return sign;  // below half the smallest subnormal: +-0
  const uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
  const uint32_t shift = 126 - e;  // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return sign | static_cast<uint16_t>(q);
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u)
    return static_cast<uint16_t>(((x >> 16) & 0x8000u) | 0x7FC0u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace
}  // namespace stochdepth
