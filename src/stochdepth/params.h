// The one vocabulary of a call of the op: its element types and scaling rules, and the POD block
// that every kernel reads (the CPU kernels of cpu_kernel_impl.inc and the CUDA kernels of cuda/,
// which add only their launch configuration: cuda/kernel_common.cuh), so that a new per-call
// input is one field here and nothing else to copy by hand. Derivations from the user's values
// are in params.cc. Plain C++, callable from host and device: no intrinsics, no CUDA header.
#pragma once
#include <cstddef>
#include <cstdint>

#include "portability.h"

namespace stochdepth {

// Supported dtypes (the only instantiations anywhere):
//   | DType      | storage   | compute | rounding                |
//   | kFloat16   | IEEE half | float   | once, on store (RNE)    |
//   | kBFloat16  | bfloat16  | float   | once, on store (RNE)    |
//   | kFloat32   | float     | float   | -                       |
//   | kFloat64   | double    | double  | -                       |
enum class DType : uint8_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };
enum class Scaling : uint8_t { kInference = 0, kTraining = 1 };  // paper/kerasfactory vs timm

inline size_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
  }
  return 0;
}

// One call of the op. Every tensor is contiguous and seen as [outer, batch, inner] around the
// sample axis. The same block serves the forward pass and the backward pass:
//   forward:  shortcut = shortcut (or nullptr: single-input form), input = residual
//   backward: shortcut = nullptr, input = grad_out, out = grad_residual
// Per row (o, b), with keep = keep_sample(seed, offset, batch_mode ? 0 : b, threshold):
//   training && keep:   out = shortcut + (scale * input)      (or scale * input)
//   training && !keep:  out = shortcut, input not read          (or 0, input not read)
//   !training:          out = shortcut + (scale * input)      (or scale * input)
// The multiply and the add are rounded separately, never fused (docs/design.md, "Arithmetic").
// With `gamma` (the layer scale, docs/design.md, "Layer scale") the forward pass scales the input
// by gamma[e % channels] first: out = shortcut + (scale * (gamma * input)); the backward pass with
// gamma is its own entry (drop_path_backward_gamma, drop_path.h), which reads this block too.
// The fields are ordered by size, without padding: the CUDA kernels take the block by value, and
// a kernel argument over 128 bytes made nvcc 13 keep a pointer to it in a register and spill
// (cuda/kernel_common.cuh, KernelParams). The layout is part of the core's entry table
// (core_entry.h): a change bumps kCoreEntryAbi.
struct DropPathParams {
  const void* shortcut = nullptr;  // [outer, batch, inner] or nullptr
  const void* input = nullptr;     // [outer, batch, inner]
  void* out = nullptr;             // [outer, batch, inner]; may equal shortcut (in place)
  // The layer scale over the last axis of the caller's tensor, `channels` elements, or nullptr.
  // The bindings ensure that the sample axis is not that axis, so inner % channels == 0: a row of
  // `channels` elements lies within one sample.
  const void* gamma = nullptr;
  int64_t outer = 1, batch = 0, inner = 1;
  uint64_t seed = 0, offset = 0;
  // When set: (seed, offset) are read from these two words, [seed, offset], in memory on the
  // op's device, when the op runs rather than when it is queued, and `seed` and `offset` above
  // are ignored. A captured CUDA graph replays the launch with the same pointer, so whatever
  // the words hold at each replay decides that replay's mask (docs/design.md, "CUDA"). The
  // host never reads device memory for it: no synchronisation.
  const uint64_t* rng_words = nullptr;
  uint64_t threshold = 0;  // keep iff draw < threshold; set by set_scalars
  double scale_f64 = 1.0;  // the scale in double (f64 compute)
  float scale_f32 = 1.0f;  // the scale rounded once to float (f16, bf16, f32 compute)
  // gamma's length (the last axis), >= 1; 32 bits so that the CUDA kernels' argument block stays
  // within 128 bytes (cuda/kernel_common.cuh); the bindings refuse a longer gamma.
  int32_t channels = 1;
  DType dtype = DType::kFloat32;
  bool training = true;
  bool batch_mode = false;  // one draw (sample index 0) for the whole batch
  // Skipping the dropped samples' work (docs/design.md, "Skipping dropped samples"; training
  // only): the rows of `input` (forward, a scatter-add) or of `out` (backward, a gather) hold the
  // kept samples only, in order: [outer, n_kept, inner]. A dropped sample has no row there: its
  // output is the shortcut (forward) or nothing is written (backward).
  bool compact_input = false;
  bool compact_output = false;

  STOCHDEPTH_HOST_DEVICE int64_t numel() const { return outer * batch * inner; }
};

// Derives threshold and scale from (p, training, scaling) once, on the host (docs/design.md,
// "The mask stream" and "Arithmetic"): T = floor(p * 2^32); training scale 1/p (training
// scaling, p > 0) or 1; inference factor p (inference scaling) or 1. The factor is evaluated in
// double, then rounded once to float.
void set_scalars(DropPathParams& params, double survival_prob, Scaling scaling);

// The scale of a call in the kernels' compute type C (float for f16, bf16 and f32, double for
// f64; the table above): the float that set_scalars rounded once, or the double. Every kernel, CPU
// and CUDA, takes its factor from here. Force-inlined: the CPU ISA units, each compiled with its
// own flags, call it, and no out-of-line copy from one of them may serve another.
template <class C>
STOCHDEPTH_HOST_DEVICE STOCHDEPTH_FORCEINLINE C scale_in(const DropPathParams& p) {
  static_assert(sizeof(C) == sizeof(float) || sizeof(C) == sizeof(double),
                "the compute type is float or double");
  if constexpr (sizeof(C) == sizeof(double)) {
    return p.scale_f64;
  } else {
    return p.scale_f32;
  }
}

// The parameters of a raw call: addresses and values that the adapters checked themselves
// (_core.run_raw) or that a test passes (the CUDA emulator's run). Checks what the kernels cannot
// survive and no caller can have checked for them: survival_prob in [0, 1], outer, batch and
// inner >= 0, rng_words (0: none) aligned to 8 bytes, channels in [1, 2**31) dividing inner
// (with gamma); std::invalid_argument otherwise. Then
// set_scalars.
DropPathParams params_from_raw(uintptr_t shortcut, uintptr_t input, uintptr_t out, int64_t outer,
                               int64_t batch, int64_t inner, DType dtype, double survival_prob,
                               bool training, bool batch_mode, Scaling scaling, uint64_t seed,
                               uint64_t offset, bool compact_input, bool compact_output,
                               uintptr_t rng_words, uintptr_t gamma = 0, int64_t channels = 1);

}  // namespace stochdepth
