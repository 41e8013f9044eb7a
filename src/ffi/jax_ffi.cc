// stochdepth._jax_ffi: the op as typed XLA FFI handlers (headers from the installed jaxlib) for
// jax.ffi.ffi_call, exported as capsules: CPU handlers always, CUDA ones (XLA's stream, command-
// buffer compatible) when the core has CUDA. The handlers run the core that `_core` loaded,
// through the entry table it hands over (core_entry.h); (seed, offset) arrive as a u32[4]
// operand, so a new key under jax.jit is a new mask without recompiling (docs/design.md,
// "Randomness in the adapters"). This module never links CUDA: the stream is a void*.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

#include "ffi/ieee_subnormals.h"
#include "ffi/jax_norm_ffi.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "stochdepth/core_entry.h"
#include "stochdepth/drop_path.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace py = pybind11;
namespace ffi = xla::ffi;

namespace {

using stochdepth::CoreEntry;
using stochdepth::Device;
using stochdepth::DeviceKind;
using stochdepth::DropPathParams;
using stochdepth::DType;
using stochdepth::IeeeSubnormals;
using stochdepth::Scaling;

std::atomic<const CoreEntry*> g_entry{nullptr};

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

// The checks the Python wrapper already made, repeated here so that a direct ffi_call with bad
// operands or attributes gets an error, never a crash.
ffi::Error fill_params(DropPathParams& params, const ffi::AnyBuffer* shortcut,
                       const ffi::AnyBuffer& input, const ffi::AnyBuffer& key,
                       const ffi::AnyBuffer& out, double p, int64_t axis, int64_t training,
                       int64_t batch_mode, int64_t scaling) {
  if (g_entry.load() == nullptr) {
    return ffi::Error::Internal(
        "stochdepth._jax_ffi: the core entry is not set (import "
        "stochdepth.jax, which connects it)");
  }
  if (!(p >= 0.0 && p <= 1.0)) {
    return ffi::Error::InvalidArgument("survival_prob must be in [0, 1], got " + std::to_string(p));
  }
  if (scaling != 0 && scaling != 1) return ffi::Error::InvalidArgument("scaling must be 0 or 1");
  if (!to_dtype(input.element_type(), &params.dtype)) {
    return ffi::Error::InvalidArgument(
        "stochdepth: inputs must be float16, bfloat16, float32 or float64");
  }
  if (key.element_type() != ffi::DataType::U32 || key.element_count() != 4) {
    return ffi::Error::InvalidArgument("stochdepth: the key operand must be uint32[4]");
  }
  const auto dims = input.dimensions();
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (rank < 1 || axis < 0 || axis >= rank) {
    return ffi::Error::InvalidArgument("stochdepth: axis " + std::to_string(axis) +
                                       " is out of range for rank " + std::to_string(rank));
  }
  auto same = [&](const ffi::AnyBuffer& b) {
    const auto d = b.dimensions();
    if (b.element_type() != input.element_type() || d.size() != dims.size()) return false;
    for (size_t i = 0; i < d.size(); ++i) {
      if (d[i] != dims[i]) return false;
    }
    return true;
  };
  if ((shortcut && !same(*shortcut)) || !same(out)) {
    return ffi::Error::InvalidArgument(
        "stochdepth: operands and result must have the same shape and dtype");
  }
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < axis; ++i) outer *= dims[i];
  for (int64_t i = axis + 1; i < rank; ++i) inner *= dims[i];
  params.outer = outer;
  params.batch = dims[axis];
  params.inner = inner;
  params.shortcut = shortcut ? shortcut->untyped_data() : nullptr;
  params.input = input.untyped_data();
  params.out = out.untyped_data();
  params.training = training != 0;
  params.batch_mode = batch_mode != 0;
  g_entry.load()->set_scalars(params, p, scaling == 1 ? Scaling::kTraining : Scaling::kInference);
  return ffi::Error::Success();
}

// The layer scale (docs/design.md, "Layer scale"): gamma of the input's dtype and shape (C,), C
// the last axis, which must not be the sample axis; checked by the Python wrapper first, as above.
ffi::Error set_gamma(DropPathParams& params, const ffi::AnyBuffer* gamma,
                     const ffi::AnyBuffer& input, int64_t axis) {
  if (gamma == nullptr) return ffi::Error::Success();
  const auto dims = input.dimensions();
  const auto g = gamma->dimensions();
  const int64_t rank = static_cast<int64_t>(dims.size());
  if (gamma->element_type() != input.element_type() || axis == rank - 1 || g.size() != 1 ||
      g[0] != dims[rank - 1] || g[0] > INT32_MAX) {
    return ffi::Error::InvalidArgument(
        "stochdepth: gamma must have the inputs' dtype and shape (C,), C their last axis, "
        "which must not be the sample axis");
  }
  params.gamma = gamma->untyped_data();
  params.channels = static_cast<int32_t>(g[0]);
  return ffi::Error::Success();
}

// The backward pass's extra buffers: the forward's residual like grad_out, grad_gamma like gamma.
ffi::Error check_backward_gamma(const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& residual,
                                const ffi::AnyBuffer& gamma, const ffi::AnyBuffer& grad_gamma) {
  auto same = [](const ffi::AnyBuffer& a, const ffi::AnyBuffer& b) {
    const auto da = a.dimensions(), db = b.dimensions();
    if (a.element_type() != b.element_type() || da.size() != db.size()) return false;
    for (size_t i = 0; i < da.size(); ++i) {
      if (da[i] != db[i]) return false;
    }
    return true;
  };
  if (!same(residual, grad_out) || !same(grad_gamma, gamma)) {
    return ffi::Error::InvalidArgument(
        "stochdepth: residual must be like grad_out, and grad_gamma like gamma");
  }
  return ffi::Error::Success();
}

void read_key(DropPathParams& params, const uint32_t* k) {
  params.seed = (static_cast<uint64_t>(k[1]) << 32) | k[0];
  params.offset = (static_cast<uint64_t>(k[3]) << 32) | k[2];
}

// XLA:CPU allocates each output afresh (glibc mmaps a large one), so the first write to every
// 4 KiB page faults and the kernel zeroes it: 18,913 faults per call for a 74 MiB output.
// Advising huge pages on the buffer's 2 MiB-aligned interior before writing takes one fault per
// 2 MiB instead, as NumPy does for its large arrays (docs/design.md, "XLA:CPU buffers"). Advice
// only: the contents are kept, and where THP is off it changes nothing.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < int64_t{4} << 20) return;  // NumPy's threshold: below it, one huge page at most
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end =
      (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// The op, or with grad_gamma the backward pass with gamma, on `device` (the CPU: stream nullptr).
ffi::Error run(const DropPathParams& params, void* grad_gamma, const void* residual, Device device,
               void* stream) {
  try {
    if (grad_gamma == nullptr) {
      g_entry.load()->drop_path(params, device, stream);
    } else if (params.channels > 0) {  // no channels: no element, and grad_gamma is empty
      g_entry.load()->backward_gamma(params, residual, grad_gamma, device, stream);
    }
  } catch (const std::invalid_argument& e) {
    return ffi::Error::InvalidArgument(std::string("stochdepth: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("stochdepth: ") + e.what());
  }
  return ffi::Error::Success();
}

// One op on the CPU: shortcut = nullptr is the single-input form (and the backward pass);
// gamma = nullptr is the op without the layer scale; grad_gamma (with gamma, no shortcut, and
// `residual` the forward's) makes it the backward pass with gamma.
ffi::Error op_cpu(const ffi::AnyBuffer* shortcut, const ffi::AnyBuffer& input,
                  const ffi::AnyBuffer* gamma, const ffi::AnyBuffer& key, ffi::AnyBuffer& out,
                  double p, int64_t axis, int64_t training, int64_t batch_mode, int64_t scaling,
                  const ffi::AnyBuffer* residual = nullptr, ffi::AnyBuffer* grad_gamma = nullptr) {
  DropPathParams params;
  ffi::Error err =
      fill_params(params, shortcut, input, key, out, p, axis, training, batch_mode, scaling);
  if (!err.success()) return err;
  err = set_gamma(params, gamma, input, axis);
  if (!err.success()) return err;
  read_key(params, static_cast<const uint32_t*>(key.untyped_data()));
  if (params.out != params.shortcut) {  // in place, the buffer is the shortcut's, already written
    advise_huge_pages(params.out,
                      params.numel() * static_cast<int64_t>(stochdepth::dtype_size(params.dtype)));
  }
  IeeeSubnormals ieee;
  return run(params, grad_gamma ? grad_gamma->untyped_data() : nullptr,
             residual ? residual->untyped_data() : nullptr, Device{DeviceKind::kCPU, 0}, nullptr);
}

// out = shortcut + keep * s * residual (docs/design.md, "Semantics").
ffi::Error residual_cpu(ffi::AnyBuffer shortcut, ffi::AnyBuffer residual, ffi::AnyBuffer key,
                        ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis, int64_t training,
                        int64_t batch_mode, int64_t scaling) {
  return op_cpu(&shortcut, residual, nullptr, key, *out, p, axis, training, batch_mode, scaling);
}

// out = shortcut + keep * s * (gamma * residual) (docs/design.md, "Layer scale").
ffi::Error residual_gamma_cpu(ffi::AnyBuffer shortcut, ffi::AnyBuffer residual,
                              ffi::AnyBuffer gamma, ffi::AnyBuffer key,
                              ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis,
                              int64_t training, int64_t batch_mode, int64_t scaling) {
  return op_cpu(&shortcut, residual, &gamma, key, *out, p, axis, training, batch_mode, scaling);
}

// out = keep * s * input: the backward pass (input = grad_out, out = grad_residual) and the
// single-input forward pass are the same op.
ffi::Error scale_cpu(ffi::AnyBuffer input, ffi::AnyBuffer key, ffi::Result<ffi::AnyBuffer> out,
                     double p, int64_t axis, int64_t training, int64_t batch_mode,
                     int64_t scaling) {
  return op_cpu(nullptr, input, nullptr, key, *out, p, axis, training, batch_mode, scaling);
}

// out = keep * s * (gamma * input): the single-input forward pass with the layer scale.
ffi::Error scale_gamma_cpu(ffi::AnyBuffer input, ffi::AnyBuffer gamma, ffi::AnyBuffer key,
                           ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis,
                           int64_t training, int64_t batch_mode, int64_t scaling) {
  return op_cpu(nullptr, input, &gamma, key, *out, p, axis, training, batch_mode, scaling);
}

// The backward pass with the layer scale, one pass through the core (drop_path_backward_gamma):
// grad_residual = keep * gamma * (s * grad_out), and grad_gamma, the column sums over the kept
// rows of (s * grad_out) * residual, in the order of docs/design.md, "Layer scale".
ffi::Error backward_gamma_cpu(ffi::AnyBuffer grad_out, ffi::AnyBuffer residual,
                              ffi::AnyBuffer gamma, ffi::AnyBuffer key,
                              ffi::Result<ffi::AnyBuffer> grad_residual,
                              ffi::Result<ffi::AnyBuffer> grad_gamma, double p, int64_t axis,
                              int64_t training, int64_t batch_mode, int64_t scaling) {
  ffi::Error err = check_backward_gamma(grad_out, residual, gamma, *grad_gamma);
  if (!err.success()) return err;
  return op_cpu(nullptr, grad_out, &gamma, key, *grad_residual, p, axis, training, batch_mode,
                scaling, &residual, &(*grad_gamma));
}

#if STOCHDEPTH_JAX_CUDA
// The key operand u32[4] = [seed_lo, seed_hi, offset_lo, offset_hi] is, on a little-endian
// host and device, the two u64 words [seed, offset] of DropPathParams::rng_words: the kernels
// read it where XLA put it, when they run. Nothing here reads device memory or allocates, and the
// same call always queues the same launch (only the pointers differ), so XLA may capture the
// call into a command buffer (a CUDA graph) and replay it with a new key each time
// (docs/design.md, "CUDA").
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "the key operand is read as [seed, offset] u64 words");

// One op on the GPU, on XLA's stream; shortcut, gamma, residual and grad_gamma as in op_cpu.
ffi::Error op_cuda(void* stream, int32_t device, const ffi::AnyBuffer* shortcut,
                   const ffi::AnyBuffer& input, const ffi::AnyBuffer* gamma,
                   const ffi::AnyBuffer& key, ffi::AnyBuffer& out, double p, int64_t axis,
                   int64_t training, int64_t batch_mode, int64_t scaling,
                   const ffi::AnyBuffer* residual = nullptr, ffi::AnyBuffer* grad_gamma = nullptr) {
  DropPathParams params;
  ffi::Error err =
      fill_params(params, shortcut, input, key, out, p, axis, training, batch_mode, scaling);
  if (!err.success()) return err;
  err = set_gamma(params, gamma, input, axis);
  if (!err.success()) return err;
  const void* words = key.untyped_data();
  if (reinterpret_cast<uintptr_t>(words) % alignof(uint64_t) != 0) {
    return ffi::Error::InvalidArgument("stochdepth: the key operand is not 8-byte aligned");
  }
  params.rng_words = static_cast<const uint64_t*>(words);
  return run(params, grad_gamma ? grad_gamma->untyped_data() : nullptr,
             residual ? residual->untyped_data() : nullptr, Device{DeviceKind::kCUDA, device},
             stream);
}

ffi::Error residual_cuda(void* stream, int32_t device, ffi::AnyBuffer shortcut,
                         ffi::AnyBuffer residual, ffi::AnyBuffer key,
                         ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis, int64_t training,
                         int64_t batch_mode, int64_t scaling) {
  return op_cuda(stream, device, &shortcut, residual, nullptr, key, *out, p, axis, training,
                 batch_mode, scaling);
}

ffi::Error residual_gamma_cuda(void* stream, int32_t device, ffi::AnyBuffer shortcut,
                               ffi::AnyBuffer residual, ffi::AnyBuffer gamma, ffi::AnyBuffer key,
                               ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis,
                               int64_t training, int64_t batch_mode, int64_t scaling) {
  return op_cuda(stream, device, &shortcut, residual, &gamma, key, *out, p, axis, training,
                 batch_mode, scaling);
}

ffi::Error scale_cuda(void* stream, int32_t device, ffi::AnyBuffer input, ffi::AnyBuffer key,
                      ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis, int64_t training,
                      int64_t batch_mode, int64_t scaling) {
  return op_cuda(stream, device, nullptr, input, nullptr, key, *out, p, axis, training, batch_mode,
                 scaling);
}

ffi::Error scale_gamma_cuda(void* stream, int32_t device, ffi::AnyBuffer input,
                            ffi::AnyBuffer gamma, ffi::AnyBuffer key,
                            ffi::Result<ffi::AnyBuffer> out, double p, int64_t axis,
                            int64_t training, int64_t batch_mode, int64_t scaling) {
  return op_cuda(stream, device, nullptr, input, &gamma, key, *out, p, axis, training, batch_mode,
                 scaling);
}

ffi::Error backward_gamma_cuda(void* stream, int32_t device, ffi::AnyBuffer grad_out,
                               ffi::AnyBuffer residual, ffi::AnyBuffer gamma, ffi::AnyBuffer key,
                               ffi::Result<ffi::AnyBuffer> grad_residual,
                               ffi::Result<ffi::AnyBuffer> grad_gamma, double p, int64_t axis,
                               int64_t training, int64_t batch_mode, int64_t scaling) {
  ffi::Error err = check_backward_gamma(grad_out, residual, gamma, *grad_gamma);
  if (!err.success()) return err;
  return op_cuda(stream, device, nullptr, grad_out, &gamma, key, *grad_residual, p, axis, training,
                 batch_mode, scaling, &residual, &(*grad_gamma));
}
#endif  // STOCHDEPTH_JAX_CUDA

// The op's attributes, in the order every handler above takes them after its buffers; one list,
// so that the four bindings and stochdepth.jax's keyword names cannot drift apart.
template <typename Binding>
auto with_op_attrs(Binding binding) {
  return std::move(binding)
      .template Attr<double>("survival_prob")
      .template Attr<int64_t>("axis")
      .template Attr<int64_t>("training")
      .template Attr<int64_t>("batch_mode")
      .template Attr<int64_t>("scaling");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER(kResidualCpu, residual_cpu,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Arg<ffi::AnyBuffer>()     // shortcut
                                         .Arg<ffi::AnyBuffer>()     // residual
                                         .Arg<ffi::AnyBuffer>()     // key
                                         .Ret<ffi::AnyBuffer>()));  // out

XLA_FFI_DEFINE_HANDLER(kScaleCpu, scale_cpu,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Arg<ffi::AnyBuffer>()     // input
                                         .Arg<ffi::AnyBuffer>()     // key
                                         .Ret<ffi::AnyBuffer>()));  // out

XLA_FFI_DEFINE_HANDLER(kResidualGammaCpu, residual_gamma_cpu,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Arg<ffi::AnyBuffer>()     // shortcut
                                         .Arg<ffi::AnyBuffer>()     // residual
                                         .Arg<ffi::AnyBuffer>()     // gamma
                                         .Arg<ffi::AnyBuffer>()     // key
                                         .Ret<ffi::AnyBuffer>()));  // out

XLA_FFI_DEFINE_HANDLER(kScaleGammaCpu, scale_gamma_cpu,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Arg<ffi::AnyBuffer>()     // input
                                         .Arg<ffi::AnyBuffer>()     // gamma
                                         .Arg<ffi::AnyBuffer>()     // key
                                         .Ret<ffi::AnyBuffer>()));  // out

XLA_FFI_DEFINE_HANDLER(kBackwardGammaCpu, backward_gamma_cpu,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Arg<ffi::AnyBuffer>()     // grad_out
                                         .Arg<ffi::AnyBuffer>()     // residual
                                         .Arg<ffi::AnyBuffer>()     // gamma
                                         .Arg<ffi::AnyBuffer>()     // key
                                         .Ret<ffi::AnyBuffer>()     // grad_residual
                                         .Ret<ffi::AnyBuffer>()));  // grad_gamma

#if STOCHDEPTH_JAX_CUDA
XLA_FFI_DEFINE_HANDLER(kResidualCuda, residual_cuda,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Ctx<ffi::PlatformStream<void*>>()
                                         .Ctx<ffi::DeviceOrdinal>()
                                         .Arg<ffi::AnyBuffer>()    // shortcut
                                         .Arg<ffi::AnyBuffer>()    // residual
                                         .Arg<ffi::AnyBuffer>()    // key
                                         .Ret<ffi::AnyBuffer>()),  // out
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER(kScaleCuda, scale_cuda,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Ctx<ffi::PlatformStream<void*>>()
                                         .Ctx<ffi::DeviceOrdinal>()
                                         .Arg<ffi::AnyBuffer>()    // input
                                         .Arg<ffi::AnyBuffer>()    // key
                                         .Ret<ffi::AnyBuffer>()),  // out
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER(kResidualGammaCuda, residual_gamma_cuda,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Ctx<ffi::PlatformStream<void*>>()
                                         .Ctx<ffi::DeviceOrdinal>()
                                         .Arg<ffi::AnyBuffer>()    // shortcut
                                         .Arg<ffi::AnyBuffer>()    // residual
                                         .Arg<ffi::AnyBuffer>()    // gamma
                                         .Arg<ffi::AnyBuffer>()    // key
                                         .Ret<ffi::AnyBuffer>()),  // out
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER(kScaleGammaCuda, scale_gamma_cuda,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Ctx<ffi::PlatformStream<void*>>()
                                         .Ctx<ffi::DeviceOrdinal>()
                                         .Arg<ffi::AnyBuffer>()    // input
                                         .Arg<ffi::AnyBuffer>()    // gamma
                                         .Arg<ffi::AnyBuffer>()    // key
                                         .Ret<ffi::AnyBuffer>()),  // out
                       {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER(kBackwardGammaCuda, backward_gamma_cuda,
                       with_op_attrs(ffi::Ffi::Bind()
                                         .Ctx<ffi::PlatformStream<void*>>()
                                         .Ctx<ffi::DeviceOrdinal>()
                                         .Arg<ffi::AnyBuffer>()    // grad_out
                                         .Arg<ffi::AnyBuffer>()    // residual
                                         .Arg<ffi::AnyBuffer>()    // gamma
                                         .Arg<ffi::AnyBuffer>()    // key
                                         .Ret<ffi::AnyBuffer>()    // grad_residual
                                         .Ret<ffi::AnyBuffer>()),  // grad_gamma
                       {ffi::Traits::kCmdBufferCompatible});
#endif  // STOCHDEPTH_JAX_CUDA

PYBIND11_MODULE(_jax_ffi, m) {
  m.doc() = "stochdepth's XLA FFI handlers. Use stochdepth.jax instead.";
  m.def(
      "connect",
      [](py::capsule entry) {
        if (std::string(entry.name() ? entry.name() : "") != stochdepth::kCoreEntryCapsuleName) {
          throw std::invalid_argument("not a stochdepth core entry capsule");
        }
        const auto* e = entry.get_pointer<const CoreEntry>();
        if (e->abi != stochdepth::kCoreEntryAbi || e->params_size != sizeof(DropPathParams)) {
          throw std::runtime_error(
              "stochdepth._jax_ffi and stochdepth._core come from different builds: reinstall "
              "stochdepth");
        }
        g_entry.store(e);
      },
      py::arg("entry"));
  // XLA's platform names; "CUDA" only when the core was built with CUDA.
#if STOCHDEPTH_JAX_CUDA
  m.attr("platforms") = py::make_tuple("cpu", "CUDA");
#else
  m.attr("platforms") = py::make_tuple("cpu");
#endif
  m.def(
      "handlers",
      [](const std::string& platform) {
        XLA_FFI_Handler* residual = nullptr;
        XLA_FFI_Handler* scale = nullptr;
        XLA_FFI_Handler* residual_gamma = nullptr;
        XLA_FFI_Handler* scale_gamma = nullptr;
        XLA_FFI_Handler* backward_gamma = nullptr;
        if (platform == "cpu") {
          residual = kResidualCpu;
          scale = kScaleCpu;
          residual_gamma = kResidualGammaCpu;
          scale_gamma = kScaleGammaCpu;
          backward_gamma = kBackwardGammaCpu;
#if STOCHDEPTH_JAX_CUDA
        } else if (platform == "CUDA") {
          residual = kResidualCuda;
          scale = kScaleCuda;
          residual_gamma = kResidualGammaCuda;
          scale_gamma = kScaleGammaCuda;
          backward_gamma = kBackwardGammaCuda;
#endif
        } else {
          throw std::invalid_argument("stochdepth._jax_ffi has no handlers for platform '" +
                                      platform + "'");
        }
        py::dict d;
        d["stochdepth_residual"] = py::capsule(reinterpret_cast<void*>(residual));
        d["stochdepth_scale"] = py::capsule(reinterpret_cast<void*>(scale));
        d["stochdepth_residual_gamma"] = py::capsule(reinterpret_cast<void*>(residual_gamma));
        d["stochdepth_scale_gamma"] = py::capsule(reinterpret_cast<void*>(scale_gamma));
        d["stochdepth_backward_gamma"] = py::capsule(reinterpret_cast<void*>(backward_gamma));
        return d;
      },
      py::arg("platform") = "cpu");
  // The XLA FFI API version of the headers this module was compiled with.
  m.attr("ffi_api_version") = py::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.attr("jaxlib_build_version") = STOCHDEPTH_JAXLIB_BUILD_VERSION;
  stochdepth::register_jax_norm(m);  // the fused norm's handlers (jax_norm_ffi.cc)
}
