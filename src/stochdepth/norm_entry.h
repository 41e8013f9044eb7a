// The fused norm's entries as a table of function pointers, handed by `_core` to
// stochdepth._jax_ffi in a capsule (`_core._norm_entry`), as core_entry.h does for the op: the
// XLA handlers run the one core that `_core` loaded (docs/design.md, "Fused residual and norm").
#pragma once
#include <cstdint>

#include "norm.h"

namespace stochdepth {

// Bumped whenever NormCoreEntry or NormParams changes layout; the receiver checks both.
constexpr uint32_t kNormEntryAbi = 1;  // NormParams with rng_words
constexpr const char* kNormEntryCapsuleName = "stochdepth._core.norm_entry";

struct NormCoreEntry {
  uint32_t abi = kNormEntryAbi;
  uint32_t params_size = sizeof(NormParams);
  void (*set_scalars)(NormParams&, double, Scaling) = nullptr;
  void (*forward)(const NormParams&, Device, void*) = nullptr;
  void (*backward)(const NormParams&, Device, void*) = nullptr;
};

// Only `_core` calls this (its definition binds the addresses of its own copy of the core).
inline const NormCoreEntry* norm_core_entry() {
  static const NormCoreEntry entry{kNormEntryAbi, sizeof(NormParams), &set_norm_scalars,
                                   &norm_forward, &norm_backward};
  return &entry;
}

}  // namespace stochdepth
