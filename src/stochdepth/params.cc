// The host-side derivations of params.h that need no kernel: the scale and threshold of a call
// (set_scalars), the parameters of a raw call (params_from_raw) and device names. Kept apart from
// drop_path.cc so that the CUDA emulator module (cuda/emulator_module.cc) links exactly the scalars
// the real launches use, and nothing else.
#include <stdexcept>
#include <string>
#include "drop_path.h"

#include "mask.h"  // keep_threshold

namespace stochdepth {

std::string Device::str() const {
  return kind == DeviceKind::kCPU ? "cpu" : "cuda:" + std::to_string(id);
}

void set_scalars(DropPathParams& params, double p, Scaling scaling) {
  params.threshold = keep_threshold(p);
  double s = 1.0;
  if (params.training) {
    // Train-time ("inverted") scaling divides by p; with p = 0 nothing is kept: no division.
    if (scaling == Scaling::kTraining && p > 0.0) s = 1.0 / p;
  } else if (scaling == Scaling::kInference) {
    s = p;  // the paper's inference rule: shortcut + p * residual
  }
  params.scale_f64 = s;
  params.scale_f32 = static_cast<float>(s);  // one rounding, from the double
}

DropPathParams params_from_raw(uintptr_t shortcut, uintptr_t input, uintptr_t out, int64_t outer,
                               int64_t batch, int64_t inner, DType dtype, double survival_prob,
                               bool training, bool batch_mode, Scaling scaling, uint64_t seed,
                               uint64_t offset, bool compact_input, bool compact_output,
                               uintptr_t rng_words, uintptr_t gamma, int64_t channels) {
  if (!(survival_prob >= 0.0 && survival_prob <= 1.0)) {
    throw std::invalid_argument("survival_prob must be in [0, 1], got " +
                                std::to_string(survival_prob));
  }
  if (outer < 0 || batch < 0 || inner < 0) {
    throw std::invalid_argument("outer, batch and inner must be >= 0");
  }
  if (rng_words % alignof(uint64_t) != 0) {
    throw std::invalid_argument("rng_words_ptr must be aligned to 8 bytes");
  }
  if (gamma != 0 && !(channels >= 1 && channels <= INT32_MAX && inner % channels == 0)) {
    throw std::invalid_argument("channels must be in [1, 2**31) and divide inner, got " +
                                std::to_string(channels));
  }
  DropPathParams p;
  p.gamma = reinterpret_cast<const void*>(gamma);
  p.channels = gamma != 0 ? static_cast<int32_t>(channels) : 1;
  p.shortcut = reinterpret_cast<const void*>(shortcut);
  p.input = reinterpret_cast<const void*>(input);
  p.out = reinterpret_cast<void*>(out);
  p.outer = outer;
  p.batch = batch;
  p.inner = inner;
  p.dtype = dtype;
  p.training = training;
  p.batch_mode = batch_mode;
  p.seed = seed;
  p.offset = offset;
  p.compact_input = compact_input;
  p.compact_output = compact_output;
  p.rng_words = reinterpret_cast<const uint64_t*>(rng_words);
  set_scalars(p, survival_prob, scaling);
  return p;
}

}  // namespace stochdepth
