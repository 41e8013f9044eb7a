// Public C++ API of the stochdepth core: the dtype table, the POD parameter block and the
// entry points on raw pointers. It knows no framework, no Python and no intrinsics.
//
// Supported dtypes (the only instantiations anywhere):
//   | DType      | storage   | compute | rounding                |
//   | kFloat16   | IEEE half | float   | once, on store (RNE)    |
//   | kBFloat16  | bfloat16  | float   | once, on store (RNE)    |
//   | kFloat32   | float     | float   | -                       |
//   | kFloat64   | double    | double  | -                       |
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace stochdepth {

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
// The multiply and the add are rounded separately, never fused.
struct DropPathParams {
  const void* shortcut = nullptr;  // [outer, batch, inner] or nullptr
  const void* input = nullptr;     // [outer, batch, inner]
  void* out = nullptr;             // [outer, batch, inner]; may equal shortcut (in place)
  int64_t outer = 1, batch = 0, inner = 1;
  DType dtype = DType::kFloat32;
  bool training = true;
  bool batch_mode = false;  // one draw (sample index 0) for the whole batch
  uint64_t seed = 0, offset = 0;
  uint64_t threshold = 0;  // keep iff draw < threshold; set by set_scalars
  float scale_f32 = 1.0f;  // the scale rounded once to float (f16, bf16, f32 compute)
  double scale_f64 = 1.0;  // the scale in double (f64 compute)
  // Skipping the dropped samples' work (StochasticResidual; training only): the rows of `input`
  // (forward, a scatter-add) or of `out` (backward, a gather) hold the kept samples only, in
  // order: [outer, n_kept, inner]. A dropped sample has no row there: its output is the shortcut
  // (forward) or nothing is written (backward).
  bool compact_input = false;
  bool compact_output = false;

  int64_t numel() const { return outer * batch * inner; }
};

// Derives threshold and scale from (p, training, scaling) once, on the host (DESIGN.md):
// T = floor(p * 2^32); training scale 1/p (training scaling, p > 0) or 1; inference factor p
// (inference scaling) or 1. The factor is evaluated in double, then rounded once to float.
void set_scalars(DropPathParams& params, double survival_prob, Scaling scaling);

// keep[b] for b in [0, batch): the mask stream of DESIGN.md.
void compute_mask(uint8_t* keep, int64_t batch, uint64_t seed, uint64_t offset, uint64_t threshold,
                  bool batch_mode);

// One Philox4x32-10 block computed by the given CPU ISA's code (known-answer tests).
void philox_block(const std::string& isa, const uint32_t counter[4], const uint32_t key[2],
                  uint32_t out[4]);

// ---- CPU (dispatch.cc)
void drop_path_cpu(const DropPathParams& params);
// A plain streaming copy with the same threading and stores as the op: the bandwidth ceiling
// that the benchmark reports against.
void stream_copy_cpu(void* dst, const void* src, size_t bytes);

// ISA selection: "scalar" or "avx2". Compiled ISAs, those this CPU supports, the active one.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();
std::string active_isa();
void set_isa(const std::string& name);  // throws std::invalid_argument if unknown/unsupported

int num_threads();
void set_num_threads(int n);  // n >= 1
int64_t parallel_threshold_bytes();
void set_parallel_threshold_bytes(int64_t bytes);

// Output buffers for the CPU: 64-byte aligned, huge-page advised, recycled (see alloc.cc).
void* cpu_alloc(size_t bytes);
void cpu_free(void* ptr, size_t bytes);
size_t cpu_cache_bytes();
void cpu_cache_clear();

}  // namespace stochdepth
