// The fused residual + norm (docs/design.md, "Fused residual and norm") as typed XLA FFI
// handlers for stochdepth.jax.stochastic_depth_norm, compiled into stochdepth._jax_ffi next to
// the op's (jax_ffi.cc): CPU handlers always, CUDA ones (XLA's stream) when the core has CUDA.
// The handlers run the norm entries of the core that `_core` loaded, through the table it hands
// over (norm_entry.h); (seed, offset) arrive as the op's u32[4] key operand, which the kernels
// read where XLA put it (NormParams::rng_words), so a new key under jax.jit is a new mask
// without recompiling and the host never reads a device key.
//
// Absent parameters: XLA FFI has no optional operand, so gamma, weight and bias are always
// passed, a zero-length vector when absent, and the attributes has_gamma, has_weight, has_bias
// say which are real; the backward pass returns a zero-length gradient for each absent one.
#include "ffi/jax_norm_ffi.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "ffi/ieee_subnormals.h"
#include "stochdepth/norm_entry.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace py = pybind11;
namespace ffi = xla::ffi;

namespace stochdepth {
namespace {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the key operand is read as [seed, offset] u64 words");

std::atomic<const NormCoreEntry*> g_norm_entry{nullptr};

bool to_dtype(ffi::DataType t, DType* out) {
  switch (t) {
    case ffi::DataType::F16:
      *out = DType::kFloat16;
      return true;
    case ffi::DataType::BF16:
      *out = DType::kBFloat16;
      return true;
    case ffi::DataType::F32:
      *out = DType::kFloat32;
      return true;
    case ffi::DataType::F64:
      *out = DType::kFloat64;
      return true;
    default:
      return false;
  }
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("stochdepth: " + what);
}

bool same_shape(const ffi::AnyBuffer& a, const ffi::AnyBuffer& ref) {
  const auto d = a.dimensions(), r = ref.dimensions();
  if (a.element_type() != ref.element_type() || d.size() != r.size()) return false;
  for (size_t i = 0; i < d.size(); ++i) {
    if (d[i] != r[i]) return false;
  }
  return true;
}

// A parameter (or its gradient): shape (C,) and the inputs' dtype when present, (0,) when not.
bool vector_ok(const ffi::AnyBuffer& v, bool present, const ffi::AnyBuffer& ref, int64_t c) {
  const auto d = v.dimensions();
  return v.element_type() == ref.element_type() && d.size() == 1 && d[0] == (present ? c : 0);
}

// The attributes' and the main input's checks, shared by both passes. The Python wrapper made
// them already with the raw API's messages; repeated here so that a direct ffi_call with bad
// operands or attributes gets an error status, never a crash.
ffi::Error fill_norm_params(NormParams& params, const ffi::AnyBuffer& like,
                            const ffi::AnyBuffer& key, double p, int64_t norm, double eps,
                            int64_t training, int64_t batch_mode, int64_t scaling,
                            int64_t has_bias) {
  const NormCoreEntry* entry = g_norm_entry.load();
  if (entry == nullptr) {
    return ffi::Error::Internal(
        "stochdepth._jax_ffi: the norm entry is not set (import stochdepth.jax.norm, which "
        "connects it)");
  }
  if (!(p >= 0.0 && p <= 1.0)) {
    return ffi::Error::InvalidArgument("survival_prob must be in [0, 1], got " + std::to_string(p));
  }
  if (scaling != 0 && scaling != 1) return ffi::Error::InvalidArgument("scaling must be 0 or 1");
  if (norm != 0 && norm != 1) return ffi::Error::InvalidArgument("norm must be 0 or 1");
  if (!(eps > 0.0) || !std::isfinite(eps)) return invalid("eps must be a positive finite number");
  if (norm == 1 && has_bias != 0) {
    return invalid("bias must be None for norm='rms' (RMSNorm has no bias)");
  }
  if (!to_dtype(like.element_type(), &params.dtype)) {
    return invalid("inputs must be float16, bfloat16, float32 or float64");
  }
  if (key.element_type() != ffi::DataType::U32 || key.element_count() != 4) {
    return invalid("the key operand must be uint32[4]");
  }
  const auto dims = like.dimensions();
  if (dims.size() < 2) {
    return invalid(
        "the inputs must have rank >= 2 (samples along axis 0, channels along the "
        "last axis)");
  }
  int64_t per = 1;
  for (size_t i = 1; i + 1 < dims.size(); ++i) per *= dims[i];
  params.batch = dims[0];
  params.rows_per_sample = per;
  params.width = dims[dims.size() - 1];
  params.kind = norm == 1 ? NormKind::kRms : NormKind::kLayer;
  params.eps = eps;
  params.training = training != 0;
  params.batch_mode = batch_mode != 0;
  // u32 [seed_lo, seed_hi, offset_lo, offset_hi] is, on a little-endian machine, the u64 words
  // [seed, offset] of NormParams::rng_words, read by the kernels when they run.
  const void* words = key.untyped_data();
  if (reinterpret_cast<uintptr_t>(words) % alignof(uint64_t) != 0) {
    return invalid("the key operand is not 8-byte aligned");
  }
  params.rng_words = static_cast<const uint64_t*>(words);
  entry->set_scalars(params, p, scaling == 1 ? Scaling::kTraining : Scaling::kInference);
  return ffi::Error::Success();
}

// One pass on `device`: the CPU in IEEE subnormal mode, or CUDA on XLA's stream (queued only:
// nothing here reads device memory or synchronises).
ffi::Error run(bool backward, const NormParams& params, Device device, void* stream) {
  try {
    const NormCoreEntry& e = *g_norm_entry.load();
    std::optional<IeeeSubnormals> ieee;
    if (device.kind == DeviceKind::kCPU) ieee.emplace();
    (backward ? e.backward : e.forward)(params, device, stream);
  } catch (const std::invalid_argument& e) {
    return invalid(e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("stochdepth: ") + e.what());
  }
  return ffi::Error::Success();
}

void* data_if(const ffi::AnyBuffer& b, int64_t present) {
  return present != 0 ? b.untyped_data() : nullptr;
}

// (y, n) = forward_norm(shortcut, residual, ...) on `device`.
ffi::Error norm_fwd(Device device, void* stream, ffi::AnyBuffer shortcut, ffi::AnyBuffer residual,
                    ffi::AnyBuffer gamma, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                    ffi::AnyBuffer key, ffi::Result<ffi::AnyBuffer> y,
                    ffi::Result<ffi::AnyBuffer> n, double p, int64_t norm, double eps,
                    int64_t training, int64_t batch_mode, int64_t scaling, int64_t has_gamma,
                    int64_t has_weight, int64_t has_bias) {
  NormParams params;
  ffi::Error err = fill_norm_params(params, shortcut, key, p, norm, eps, training, batch_mode,
                                    scaling, has_bias);
  if (!err.success()) return err;
  if (!same_shape(residual, shortcut) || !same_shape(*y, shortcut) || !same_shape(*n, shortcut)) {
    return invalid("residual, y and n must have the shape and dtype of shortcut");
  }
  const int64_t c = params.width;
  if (!vector_ok(gamma, has_gamma != 0, shortcut, c) ||
      !vector_ok(weight, has_weight != 0, shortcut, c) ||
      !vector_ok(bias, has_bias != 0, shortcut, c)) {
    return invalid(
        "gamma, weight and bias must have shape (C,) and the inputs' dtype (shape "
        "(0,) when absent)");
  }
  if (shortcut.element_count() == 0) return ffi::Error::Success();  // as the raw API
  params.shortcut = shortcut.untyped_data();
  params.residual = residual.untyped_data();
  params.gamma = data_if(gamma, has_gamma);
  params.weight = data_if(weight, has_weight);
  params.bias = data_if(bias, has_bias);
  params.y = y->untyped_data();
  params.n = n->untyped_data();
  return run(false, params, device, stream);
}

// (grad_shortcut, grad_residual, grad_gamma, grad_weight, grad_bias) = backward_norm(grad_y,
// grad_n, y, residual, ...) on `device`; residual is read with gamma only (a zero-length vector
// without).
ffi::Error norm_bwd(Device device, void* stream, ffi::AnyBuffer grad_y, ffi::AnyBuffer grad_n,
                    ffi::AnyBuffer y, ffi::AnyBuffer residual, ffi::AnyBuffer gamma,
                    ffi::AnyBuffer weight, ffi::AnyBuffer key,
                    ffi::Result<ffi::AnyBuffer> grad_shortcut,
                    ffi::Result<ffi::AnyBuffer> grad_residual,
                    ffi::Result<ffi::AnyBuffer> grad_gamma, ffi::Result<ffi::AnyBuffer> grad_weight,
                    ffi::Result<ffi::AnyBuffer> grad_bias, double p, int64_t norm, double eps,
                    int64_t training, int64_t batch_mode, int64_t scaling, int64_t has_gamma,
                    int64_t has_weight, int64_t has_bias) {
  NormParams params;
  ffi::Error err =
      fill_norm_params(params, y, key, p, norm, eps, training, batch_mode, scaling, has_bias);
  if (!err.success()) return err;
  if (!same_shape(grad_y, y) || !same_shape(grad_n, y) || !same_shape(*grad_shortcut, y) ||
      !same_shape(*grad_residual, y) || (has_gamma != 0 && !same_shape(residual, y))) {
    return invalid(
        "grad_y, grad_n, residual (with gamma) and the input gradients must have the "
        "shape and dtype of y");
  }
  const int64_t c = params.width;
  if (!vector_ok(gamma, has_gamma != 0, y, c) || !vector_ok(weight, has_weight != 0, y, c) ||
      !vector_ok(*grad_gamma, has_gamma != 0, y, c) ||
      !vector_ok(*grad_weight, has_weight != 0, y, c) ||
      !vector_ok(*grad_bias, has_bias != 0, y, c)) {
    return invalid(
        "gamma, weight and the parameter gradients must have shape (C,) and the "
        "inputs' dtype (shape (0,) when absent)");
  }
  if (c == 0) return ffi::Error::Success();  // as the raw API
  params.y_in = y.untyped_data();
  params.grad_y = grad_y.untyped_data();
  params.grad_n = grad_n.untyped_data();
  params.residual = data_if(residual, has_gamma);
  params.gamma = data_if(gamma, has_gamma);
  params.weight = data_if(weight, has_weight);
  params.grad_shortcut = grad_shortcut->untyped_data();
  params.grad_residual = grad_residual->untyped_data();
  params.grad_gamma = data_if(*grad_gamma, has_gamma);
  params.grad_weight = data_if(*grad_weight, has_weight);
  params.grad_bias = data_if(*grad_bias, has_bias);
  return run(true, params, device, stream);
}

// The handlers: the passes on the CPU, and on XLA's CUDA stream and device in a CUDA build.
ffi::Error norm_fwd_cpu(ffi::AnyBuffer shortcut, ffi::AnyBuffer residual, ffi::AnyBuffer gamma,
                        ffi::AnyBuffer weight, ffi::AnyBuffer bias, ffi::AnyBuffer key,
                        ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> n, double p,
                        int64_t norm, double eps, int64_t training, int64_t batch_mode,
                        int64_t scaling, int64_t has_gamma, int64_t has_weight, int64_t has_bias) {
  return norm_fwd(Device{DeviceKind::kCPU, 0}, nullptr, shortcut, residual, gamma, weight, bias,
                  key, y, n, p, norm, eps, training, batch_mode, scaling, has_gamma, has_weight,
                  has_bias);
}

ffi::Error norm_bwd_cpu(ffi::AnyBuffer grad_y, ffi::AnyBuffer grad_n, ffi::AnyBuffer y,
                        ffi::AnyBuffer residual, ffi::AnyBuffer gamma, ffi::AnyBuffer weight,
                        ffi::AnyBuffer key, ffi::Result<ffi::AnyBuffer> grad_shortcut,
                        ffi::Result<ffi::AnyBuffer> grad_residual,
                        ffi::Result<ffi::AnyBuffer> grad_gamma,
                        ffi::Result<ffi::AnyBuffer> grad_weight,
                        ffi::Result<ffi::AnyBuffer> grad_bias, double p, int64_t norm, double eps,
                        int64_t training, int64_t batch_mode, int64_t scaling, int64_t has_gamma,
                        int64_t has_weight, int64_t has_bias) {
  return norm_bwd(Device{DeviceKind::kCPU, 0}, nullptr, grad_y, grad_n, y, residual, gamma, weight,
                  key, grad_shortcut, grad_residual, grad_gamma, grad_weight, grad_bias, p, norm,
                  eps, training, batch_mode, scaling, has_gamma, has_weight, has_bias);
}

#if STOCHDEPTH_JAX_CUDA
ffi::Error norm_fwd_cuda(void* stream, int32_t device, ffi::AnyBuffer shortcut,
                         ffi::AnyBuffer residual, ffi::AnyBuffer gamma, ffi::AnyBuffer weight,
                         ffi::AnyBuffer bias, ffi::AnyBuffer key, ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> n, double p, int64_t norm, double eps,
                         int64_t training, int64_t batch_mode, int64_t scaling, int64_t has_gamma,
                         int64_t has_weight, int64_t has_bias) {
  return norm_fwd(Device{DeviceKind::kCUDA, device}, stream, shortcut, residual, gamma, weight,
                  bias, key, y, n, p, norm, eps, training, batch_mode, scaling, has_gamma,
                  has_weight, has_bias);
}

ffi::Error norm_bwd_cuda(
    void* stream, int32_t device, ffi::AnyBuffer grad_y, ffi::AnyBuffer grad_n, ffi::AnyBuffer y,
    ffi::AnyBuffer residual, ffi::AnyBuffer gamma, ffi::AnyBuffer weight, ffi::AnyBuffer key,
    ffi::Result<ffi::AnyBuffer> grad_shortcut, ffi::Result<ffi::AnyBuffer> grad_residual,
    ffi::Result<ffi::AnyBuffer> grad_gamma, ffi::Result<ffi::AnyBuffer> grad_weight,
    ffi::Result<ffi::AnyBuffer> grad_bias, double p, int64_t norm, double eps, int64_t training,
    int64_t batch_mode, int64_t scaling, int64_t has_gamma, int64_t has_weight, int64_t has_bias) {
  return norm_bwd(Device{DeviceKind::kCUDA, device}, stream, grad_y, grad_n, y, residual, gamma,
                  weight, key, grad_shortcut, grad_residual, grad_gamma, grad_weight, grad_bias, p,
                  norm, eps, training, batch_mode, scaling, has_gamma, has_weight, has_bias);
}
#endif  // STOCHDEPTH_JAX_CUDA

// The buffers of each pass, in the order its handlers take them (after the CUDA context).
template <typename Binding>
auto fwd_buffers(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // shortcut
      .template Arg<ffi::AnyBuffer>()   // residual
      .template Arg<ffi::AnyBuffer>()   // gamma
      .template Arg<ffi::AnyBuffer>()   // weight
      .template Arg<ffi::AnyBuffer>()   // bias
      .template Arg<ffi::AnyBuffer>()   // key
      .template Ret<ffi::AnyBuffer>()   // y
      .template Ret<ffi::AnyBuffer>();  // n
}

template <typename Binding>
auto bwd_buffers(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()   // grad_y
      .template Arg<ffi::AnyBuffer>()   // grad_n
      .template Arg<ffi::AnyBuffer>()   // y
      .template Arg<ffi::AnyBuffer>()   // residual
      .template Arg<ffi::AnyBuffer>()   // gamma
      .template Arg<ffi::AnyBuffer>()   // weight
      .template Arg<ffi::AnyBuffer>()   // key
      .template Ret<ffi::AnyBuffer>()   // grad_shortcut
      .template Ret<ffi::AnyBuffer>()   // grad_residual
      .template Ret<ffi::AnyBuffer>()   // grad_gamma
      .template Ret<ffi::AnyBuffer>()   // grad_weight
      .template Ret<ffi::AnyBuffer>();  // grad_bias
}

// The attributes, in the order both handlers take them after their buffers; one list, so that
// the bindings and stochdepth.jax.norm's keyword names cannot drift apart.
template <typename Binding>
auto with_norm_attrs(Binding binding) {
  return std::move(binding)
      .template Attr<double>("survival_prob")
      .template Attr<int64_t>("norm")
      .template Attr<double>("eps")
      .template Attr<int64_t>("training")
      .template Attr<int64_t>("batch_mode")
      .template Attr<int64_t>("scaling")
      .template Attr<int64_t>("has_gamma")
      .template Attr<int64_t>("has_weight")
      .template Attr<int64_t>("has_bias");
}

}  // namespace
}  // namespace stochdepth

// The backward pass on the GPU allocates its scratch from the library's pool, so the CUDA
// handlers are not marked command-buffer compatible (docs/design.md, "The JAX adapter").
XLA_FFI_DEFINE_HANDLER(kNormFwdCpu, stochdepth::norm_fwd_cpu,
                       stochdepth::with_norm_attrs(stochdepth::fwd_buffers(ffi::Ffi::Bind())));
XLA_FFI_DEFINE_HANDLER(kNormBwdCpu, stochdepth::norm_bwd_cpu,
                       stochdepth::with_norm_attrs(stochdepth::bwd_buffers(ffi::Ffi::Bind())));
#if STOCHDEPTH_JAX_CUDA
XLA_FFI_DEFINE_HANDLER(
    kNormFwdCuda, stochdepth::norm_fwd_cuda,
    stochdepth::with_norm_attrs(stochdepth::fwd_buffers(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>().Ctx<ffi::DeviceOrdinal>())));
XLA_FFI_DEFINE_HANDLER(
    kNormBwdCuda, stochdepth::norm_bwd_cuda,
    stochdepth::with_norm_attrs(stochdepth::bwd_buffers(
        ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>().Ctx<ffi::DeviceOrdinal>())));
#endif  // STOCHDEPTH_JAX_CUDA

namespace stochdepth {

void register_jax_norm(py::module_& m) {
  m.def(
      "connect_norm",
      [](py::capsule entry) {
        if (std::string(entry.name() ? entry.name() : "") != kNormEntryCapsuleName) {
          throw std::invalid_argument("not a stochdepth norm entry capsule");
        }
        const auto* e = entry.get_pointer<const NormCoreEntry>();
        if (e->abi != kNormEntryAbi || e->params_size != sizeof(NormParams)) {
          throw std::runtime_error(
              "stochdepth._jax_ffi and stochdepth._core come from different builds: reinstall "
              "stochdepth");
        }
        g_norm_entry.store(e);
      },
      py::arg("entry"));
  // XLA's platform names, as the op's `platforms`: "CUDA" only when the core has CUDA.
#if STOCHDEPTH_JAX_CUDA
  m.attr("norm_platforms") = py::make_tuple("cpu", "CUDA");
#else
  m.attr("norm_platforms") = py::make_tuple("cpu");
#endif
  m.def(
      "norm_handlers",
      [](const std::string& platform) {
        XLA_FFI_Handler* fwd = nullptr;
        XLA_FFI_Handler* bwd = nullptr;
        if (platform == "cpu") {
          fwd = kNormFwdCpu;
          bwd = kNormBwdCpu;
#if STOCHDEPTH_JAX_CUDA
        } else if (platform == "CUDA") {
          fwd = kNormFwdCuda;
          bwd = kNormBwdCuda;
#endif
        } else {
          throw std::invalid_argument("stochdepth._jax_ffi has no norm handlers for platform '" +
                                      platform + "'");
        }
        py::dict d;
        d["stochdepth_norm_fwd"] = py::capsule(reinterpret_cast<void*>(fwd));
        d["stochdepth_norm_bwd"] = py::capsule(reinterpret_cast<void*>(bwd));
        return d;
      },
      py::arg("platform") = "cpu");
}

}  // namespace stochdepth
