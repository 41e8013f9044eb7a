// The keep decision for one sample: a pure function of (seed, offset, sample index), so that
// every backend, any thread layout and the NumPy reference agree, and backward can recompute
// the forward's mask instead of storing it. The layout is frozen by docs/design.md, "The mask
// stream".
#pragma once
#include <cstdint>

#include "philox.h"

namespace stochdepth {

// Threshold T = floor(p * 2^32) evaluated in double on the host; keep iff x < T.
// T is 64-bit so that p = 1 (T = 2^32) keeps every 32-bit draw and p = 0 keeps none.
inline uint64_t keep_threshold(double survival_prob) {
  return static_cast<uint64_t>(survival_prob * 4294967296.0);  // p in [0,1]: truncation == floor
}

// The Philox block holding the draws of samples 4q .. 4q+3 (sample b's draw is word b & 3).
STOCHDEPTH_HOST_DEVICE inline Philox4x32 mask_block(uint64_t seed, uint64_t offset, uint64_t q) {
  const Philox4x32 ctr{{static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32),
                        static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Raw 32-bit draw for sample `sample` (use sample = 0 for every sample in "batch" mode).
STOCHDEPTH_HOST_DEVICE inline uint32_t mask_draw(uint64_t seed, uint64_t offset, uint64_t sample) {
  return mask_block(seed, offset, sample >> 2).v[sample & 3];
}

STOCHDEPTH_HOST_DEVICE inline bool keep_sample(uint64_t seed, uint64_t offset, uint64_t sample,
                                               uint64_t threshold) {
  return static_cast<uint64_t>(mask_draw(seed, offset, sample)) < threshold;
}

}  // namespace stochdepth
