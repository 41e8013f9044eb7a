// The translation of a framework op's call into the core's DropPathParams (params.h) that does
// not depend on the framework: the [outer, batch, inner] view around the sample axis and the
// key operand's four words. A framework module (src/ffi/tf_ops.cc) reads its own buffers and
// attributes, then fills the rest of the block here and calls set_scalars and drop_path through
// the core's entry table (core_entry.h), as src/ffi/jax_ffi.cc does.
#pragma once
#include <cstdint>

#include "stochdepth/params.h"

namespace stochdepth {

// outer, batch and inner of a contiguous tensor of `rank` dimensions `dims` around `axis`.
// Returns false, leaving params unchanged, when axis is not in [0, rank) (rank 0 included).
template <class Dim>
bool set_layout(DropPathParams& params, const Dim& dims, int64_t rank, int64_t axis) {
  if (rank < 1 || axis < 0 || axis >= rank) return false;
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < axis; ++i) outer *= static_cast<int64_t>(dims[i]);
  for (int64_t i = axis + 1; i < rank; ++i) inner *= static_cast<int64_t>(dims[i]);
  params.outer = outer;
  params.batch = static_cast<int64_t>(dims[axis]);
  params.inner = inner;
  return true;
}

// (seed, offset) from the key operand [seed_lo, seed_hi, offset_lo, offset_hi]
// (docs/design.md, "The mask stream").
inline void set_key(DropPathParams& params, const uint32_t* k) {
  params.seed = (static_cast<uint64_t>(k[1]) << 32) | k[0];
  params.offset = (static_cast<uint64_t>(k[3]) << 32) | k[2];
}

}  // namespace stochdepth
