// The fused pre-norm block tail (docs/design.md, "Fused residual and norm"): the residual add of
// stochastic depth followed by LayerNorm or RMSNorm over the last axis, and its backward pass.
// One entry per pass, owning the CPU/CUDA choice (norm.cc). The arithmetic and its order are
// pinned by the design document, so that every ISA, thread count and device gives the same bits.
#pragma once
#include <cstdint>

#include "drop_path.h"

namespace stochdepth {

enum class NormKind : uint8_t { kLayer = 0, kRms = 1 };

// One call. Every tensor is contiguous: the inputs are [batch, rows_per_sample, width] (rows =
// batch * rows_per_sample), the vectors [width]. Optional pointers are nullptr when absent.
//   forward:  shortcut, residual, gamma?, weight?, bias?  ->  y, n
//   backward: grad_y, grad_n, y, residual (read with gamma only), gamma?, weight?
//             ->  grad_shortcut, grad_residual, grad_gamma (iff gamma), grad_weight (iff weight),
//                 grad_bias?
struct NormParams {
  const void* shortcut = nullptr;
  const void* residual = nullptr;
  const void* gamma = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  void* n = nullptr;
  const void* grad_y = nullptr;
  const void* grad_n = nullptr;
  const void* y_in = nullptr;  // backward: the forward's y
  void* grad_shortcut = nullptr;
  void* grad_residual = nullptr;
  void* grad_gamma = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;

  int64_t batch = 0, rows_per_sample = 1, width = 1;
  DType dtype = DType::kFloat32;
  NormKind kind = NormKind::kLayer;
  double eps = 1e-6;  // rounded once to the compute type by the kernels
  bool training = true;
  bool batch_mode = false;
  uint64_t seed = 0, offset = 0;
  // When set, the two words [seed, offset] the kernels read in place of seed and offset, as they
  // are when the kernels run: on a GPU, device memory the host never reads (the JAX adapter's
  // key operand; docs/design.md, "Fused residual and norm").
  const uint64_t* rng_words = nullptr;
  uint64_t threshold = 0;  // from set_norm_scalars
  float scale_f32 = 1.0f;
  double scale_f64 = 1.0;

  int64_t rows() const { return batch * rows_per_sample; }
};

// threshold and scale exactly as drop_path's set_scalars derives them (docs/design.md,
// "Arithmetic"), by calling it.
inline void set_norm_scalars(NormParams& params, double survival_prob, Scaling scaling) {
  DropPathParams d;
  d.training = params.training;
  set_scalars(d, survival_prob, scaling);
  params.threshold = d.threshold;
  params.scale_f32 = d.scale_f32;
  params.scale_f64 = d.scale_f64;
}

// Throws std::invalid_argument for parameters the kernels cannot run (a CUDA device in a build
// without CUDA); CUDA work is queued on `stream` without host synchronisation.
void norm_forward(const NormParams& params, Device device, void* stream);
void norm_backward(const NormParams& params, Device device, void* stream);

// Rows per block of the column sums (docs/design.md, "Fused residual and norm").
constexpr int64_t kNormRowBlock = 64;

}  // namespace stochdepth
