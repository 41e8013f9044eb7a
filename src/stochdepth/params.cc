// The host-side derivations of params.h that need no kernel: the scale and threshold of a call
// (set_scalars) and device names. Kept apart from drop_path.cc so that the CUDA emulator module
// (cuda/emulator_module.cc) links exactly the scalars the real launches use, and nothing else.
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

}  // namespace stochdepth
