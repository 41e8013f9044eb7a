// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// exactly as Random123 defines it: the compiled code's constants and its one-block rounds.
// The scalar CPU path and the CUDA kernels draw their masks with it (through mask.h); the AVX2,
// AVX-512 and NEON units take only its constants and run the same rounds on 8, 16 or 4 blocks at
// once. Two Python copies of the same stream exist beside it: stochdepth.reference (NumPy, the
// yardstick) and stochdepth/keras/_philox.py (keras.ops integer ops, for the Keras layer on
// backends without the kernels, i.e. TensorFlow). All of them give the same words.
// Header-only, no includes beyond <cstdint>, callable from host and device.
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

// One Philox4x32 block: ten rounds, the key bumped between rounds (Random123's R = 10 default).
STOCHDEPTH_HOST_DEVICE inline Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, ctr.v[0], hi0, lo0);
    mulhilo(kM1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

}  // namespace stochdepth
