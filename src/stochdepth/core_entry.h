// The core's op entries as a table of function pointers, handed by `_core` to other extension
// modules of the package (stochdepth._jax_ffi) in a capsule, so that every module runs the ONE
// core loaded by `_core` (its thread pool, active ISA, settings) instead of a copy of its own.
#pragma once
#include <cstdint>

#include "drop_path.h"

namespace stochdepth {

// Bumped whenever CoreEntry or DropPathParams changes layout; the receiver checks both.
// 2: DropPathParams::rng_words; 3: fields reordered; 4: gamma and channels; 5: backward_gamma
constexpr uint32_t kCoreEntryAbi = 5;
constexpr const char* kCoreEntryCapsuleName = "stochdepth._core.entry";

struct CoreEntry {
  uint32_t abi = kCoreEntryAbi;
  uint32_t params_size = sizeof(DropPathParams);
  void (*set_scalars)(DropPathParams&, double, Scaling) = nullptr;
  void (*drop_path)(const DropPathParams&, Device, void*) = nullptr;
  // drop_path_backward_gamma (drop_path.h): grad_residual and grad_gamma in one pass.
  void (*backward_gamma)(const DropPathParams&, const void*, void*, Device, void*) = nullptr;
};

// Only `_core` calls this (its definition binds the addresses of its own copy of the core).
inline const CoreEntry* core_entry() {
  static const CoreEntry entry{kCoreEntryAbi, sizeof(DropPathParams), &set_scalars, &drop_path,
                               &drop_path_backward_gamma};
  return &entry;
}

}  // namespace stochdepth
