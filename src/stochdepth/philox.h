// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// exactly as Random123 defines it: its constants and its ten rounds, written once (philox_rounds)
// over a lane type: one 32-bit word per block for the scalar CPU path and the CUDA kernels (through
// mask.h), a vector of 8, 16 or 4 blocks for the AVX2, AVX-512 and NEON units. Two Python copies of
// the same stream exist beside it: stochdepth.reference (NumPy, the yardstick) and
// stochdepth/keras/_philox.py (keras.ops integer ops, for the Keras layer on backends without the
// kernels, i.e. TensorFlow). All of them give the same words. Header-only, no includes beyond
// <cstdint>, callable from host and device.
#pragma once
#include <cstdint>

#include "portability.h"

namespace stochdepth {

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {
// Multipliers and Weyl (key-schedule) constants from Random123's philox.h:
// PHILOX_M4x32_0/1 and PHILOX_W32_0/1 (the golden ratio and sqrt(3) - 1, scaled to 2^32).
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

STOCHDEPTH_HOST_DEVICE STOCHDEPTH_FORCEINLINE void mulhilo(uint32_t a, uint32_t b, uint32_t& hi,
                                                           uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}
}  // namespace philox_detail

// The ten rounds (Random123's R = 10 default, the key bumped between rounds) on independent
// blocks at once, as structure of arrays: c[w] holds word w of every block, one lane per block.
// L is the lane type, a struct of static functions on its vector L::V:
//   V set1(uint32_t)                 every lane set to the value
//   V bit_xor(V, V)                  lane by lane
//   void mulhilo(uint32_t m, V c, V& hi, V& lo)   the hi and lo words of m * c, lane by lane
// An ISA unit instantiates it with a lane type of its own anonymous namespace, so the instance
// (compiled with that unit's flags) has internal linkage and is never merged with another unit's.
template <class L>
STOCHDEPTH_HOST_DEVICE STOCHDEPTH_FORCEINLINE void philox_rounds(typename L::V c[4], uint32_t k0,
                                                                 uint32_t k1) {
  using namespace philox_detail;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    typename L::V hi0, lo0, hi1, lo1;
    L::mulhilo(kM0, c[0], hi0, lo0);
    L::mulhilo(kM1, c[2], hi1, lo1);
    const typename L::V n0 = L::bit_xor(L::bit_xor(hi1, c[1]), L::set1(k0));
    const typename L::V n2 = L::bit_xor(L::bit_xor(hi0, c[3]), L::set1(k1));
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// One block per call: the lane is one 32-bit word.
struct ScalarLanes {
  using V = uint32_t;
  STOCHDEPTH_HOST_DEVICE STOCHDEPTH_FORCEINLINE static V set1(uint32_t x) { return x; }
  STOCHDEPTH_HOST_DEVICE STOCHDEPTH_FORCEINLINE static V bit_xor(V a, V b) { return a ^ b; }
  STOCHDEPTH_HOST_DEVICE STOCHDEPTH_FORCEINLINE static void mulhilo(uint32_t m, V c, V& hi, V& lo) {
    philox_detail::mulhilo(m, c, hi, lo);
  }
};

// One Philox4x32-10 block.
STOCHDEPTH_HOST_DEVICE inline Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  philox_rounds<ScalarLanes>(ctr.v, k0, k1);
  return ctr;
}

}  // namespace stochdepth
