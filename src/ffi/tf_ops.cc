// stochdepth/_tf_ops.so: the op as TensorFlow custom ops and CPU kernels, written against
// TensorFlow's C API for ops and kernels (tensorflow/c/ops.h, tensorflow/c/kernels.h), so that
// the library depends on TensorFlow's C symbols only, never on its C++ ABI. Loaded by
// stochdepth.tensorflow with tf.load_op_library; the registrations below run when it is loaded.
// The kernels fill the core's DropPathParams (ffi/op_params.h) and run the core that `_core`
// loaded, through the entry table it hands over (core_entry.h), set by stochdepth_tf_connect, as
// the XLA FFI handlers (jax_ffi.cc) do. (seed, offset) arrive as a uint32[4] input, so
// a new key under tf.function reuses the traced graph (docs/design.md, "Randomness in the
// adapters"). The survival probability is a float64 input: an op attribute "float" is a
// float32, and the threshold floor(p * 2^32) needs p exactly.
//
//   StochdepthResidual(shortcut: T, residual: T, key: uint32[4], survival_prob: float64) -> T
//   StochdepthScale(x: T, key: uint32[4], survival_prob: float64) -> T
//   attrs: T in {half, bfloat16, float, double}, axis, training, batch_mode, training_scaling
#include <atomic>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

#include "ffi/ieee_subnormals.h"
#include "ffi/op_params.h"
#include "stochdepth/core_entry.h"
#include "stochdepth/drop_path.h"
#include "tensorflow/c/kernels.h"
#include "tensorflow/c/ops.h"
#include "tensorflow/c/tf_datatype.h"
#include "tensorflow/c/tf_status.h"
#include "tensorflow/c/tf_tensor.h"

namespace {

using stochdepth::CoreEntry;
using stochdepth::Device;
using stochdepth::DeviceKind;
using stochdepth::DropPathParams;
using stochdepth::DType;
using stochdepth::Scaling;

std::atomic<const CoreEntry*> g_entry{nullptr};

constexpr const char* kResidualOp = "StochdepthResidual";
constexpr const char* kScaleOp = "StochdepthScale";
constexpr const char* kTypeAttr = "T: {half, bfloat16, float, double}";

bool to_dtype(TF_DataType t, DType* out) {
  switch (t) {
    case TF_HALF:
      *out = DType::kFloat16;
      return true;
    case TF_BFLOAT16:
      *out = DType::kBFloat16;
      return true;
    case TF_FLOAT:
      *out = DType::kFloat32;
      return true;
    case TF_DOUBLE:
      *out = DType::kFloat64;
      return true;
    default:
      return false;
  }
}

// ---- the ops' definitions

// The output has the shape of the first input (the wrapper and the kernel check the others).
void same_shape_as_first(TF_ShapeInferenceContext* ctx, TF_Status* status) {
  TF_ShapeHandle* shape = TF_NewShapeHandle();
  TF_ShapeInferenceContextGetInput(ctx, 0, shape, status);
  if (TF_GetCode(status) == TF_OK) TF_ShapeInferenceContextSetOutput(ctx, 0, shape, status);
  TF_DeleteShapeHandle(shape);
}

void register_op(const char* name, bool residual) {
  TF_OpDefinitionBuilder* b = TF_NewOpDefinitionBuilder(name);
  if (residual) {
    TF_OpDefinitionBuilderAddInput(b, "shortcut: T");
    TF_OpDefinitionBuilderAddInput(b, "residual: T");
  } else {
    TF_OpDefinitionBuilderAddInput(b, "x: T");
  }
  TF_OpDefinitionBuilderAddInput(b, "key: uint32");
  TF_OpDefinitionBuilderAddInput(b, "survival_prob: double");
  TF_OpDefinitionBuilderAddOutput(b, "out: T");
  TF_OpDefinitionBuilderAddAttr(b, kTypeAttr);
  TF_OpDefinitionBuilderAddAttr(b, "axis: int");
  TF_OpDefinitionBuilderAddAttr(b, "training: bool");
  TF_OpDefinitionBuilderAddAttr(b, "batch_mode: bool");
  TF_OpDefinitionBuilderAddAttr(b, "training_scaling: bool");
  TF_OpDefinitionBuilderSetShapeInferenceFunction(b, &same_shape_as_first);
  TF_Status* status = TF_NewStatus();
  TF_RegisterOpDefinition(b, status);
  TF_DeleteStatus(status);  // a second load of the library: TensorFlow keeps the first
}

// ---- the kernels

struct Config {
  int64_t axis = 0;
  bool training = true;
  bool batch_mode = false;
  bool training_scaling = false;
  bool residual = false;
};

template <bool kResidual>
void* create_kernel(TF_OpKernelConstruction* ctx) {
  auto* cfg = new Config;
  cfg->residual = kResidual;
  TF_Status* status = TF_NewStatus();
  TF_Bool flag = 0;
  TF_OpKernelConstruction_GetAttrInt64(ctx, "axis", &cfg->axis, status);
  if (TF_GetCode(status) == TF_OK) {
    TF_OpKernelConstruction_GetAttrBool(ctx, "training", &flag, status);
    cfg->training = flag != 0;
  }
  if (TF_GetCode(status) == TF_OK) {
    TF_OpKernelConstruction_GetAttrBool(ctx, "batch_mode", &flag, status);
    cfg->batch_mode = flag != 0;
  }
  if (TF_GetCode(status) == TF_OK) {
    TF_OpKernelConstruction_GetAttrBool(ctx, "training_scaling", &flag, status);
    cfg->training_scaling = flag != 0;
  }
  if (TF_GetCode(status) != TF_OK) TF_OpKernelConstruction_Failure(ctx, status);
  TF_DeleteStatus(status);
  return cfg;
}

void delete_kernel(void* kernel) { delete static_cast<Config*>(kernel); }

// The inputs of one call, deleted on every path out of compute().
struct Inputs {
  TF_Tensor* shortcut = nullptr;
  TF_Tensor* input = nullptr;
  TF_Tensor* key = nullptr;
  TF_Tensor* prob = nullptr;
  TF_Tensor* out = nullptr;
  std::vector<int64_t> dims;  // the input's shape, the output's too
  ~Inputs() {
    for (TF_Tensor* t : {shortcut, input, key, prob, out}) {
      if (t != nullptr) TF_DeleteTensor(t);
    }
  }
};

bool same_shape(const TF_Tensor* a, const TF_Tensor* b) {
  if (TF_TensorType(a) != TF_TensorType(b) || TF_NumDims(a) != TF_NumDims(b)) return false;
  for (int i = 0; i < TF_NumDims(a); ++i) {
    if (TF_Dim(a, i) != TF_Dim(b, i)) return false;
  }
  return true;
}

// The checks the Python wrapper already made, repeated here so that a direct call of the raw op
// with bad inputs or attributes is an InvalidArgumentError, never a crash. Returns "" when the
// call can run, else the message.
std::string fill_params(DropPathParams& params, const Config& cfg, Inputs& in) {
  if (g_entry.load() == nullptr) {
    return "stochdepth: the TensorFlow ops are not connected to the core (import "
           "stochdepth.tensorflow, which loads and connects them)";
  }
  if (TF_TensorType(in.prob) != TF_DOUBLE || TF_NumDims(in.prob) != 0) {
    return "stochdepth: survival_prob must be a float64 scalar";
  }
  const double p = *static_cast<const double*>(TF_TensorData(in.prob));
  if (!(p >= 0.0 && p <= 1.0)) return "survival_prob must be in [0, 1], got " + std::to_string(p);
  if (TF_TensorType(in.key) != TF_UINT32 || TF_NumDims(in.key) != 1 ||
      TF_TensorElementCount(in.key) != 4) {
    return "stochdepth: the key input must be uint32[4]";
  }
  if (!to_dtype(TF_TensorType(in.input), &params.dtype)) {
    return "stochdepth: inputs must be float16, bfloat16, float32 or float64";
  }
  if (in.shortcut != nullptr && !same_shape(in.shortcut, in.input)) {
    return "stochdepth: shortcut and residual must have the same shape and dtype";
  }
  const int rank = TF_NumDims(in.input);
  in.dims.resize(static_cast<size_t>(rank));
  for (int i = 0; i < rank; ++i) in.dims[static_cast<size_t>(i)] = TF_Dim(in.input, i);
  if (!stochdepth::set_layout(params, in.dims, rank, cfg.axis)) {
    return "stochdepth: axis " + std::to_string(cfg.axis) + " is out of range for rank " +
           std::to_string(rank);
  }
  params.shortcut = in.shortcut != nullptr ? TF_TensorData(in.shortcut) : nullptr;
  params.input = TF_TensorData(in.input);
  params.training = cfg.training;
  params.batch_mode = cfg.batch_mode;
  stochdepth::set_key(params, static_cast<const uint32_t*>(TF_TensorData(in.key)));
  g_entry.load()->set_scalars(params, p,
                              cfg.training_scaling ? Scaling::kTraining : Scaling::kInference);
  return "";
}

void fail(TF_OpKernelContext* ctx, TF_Code code, const std::string& message) {
  TF_Status* status = TF_NewStatus();
  TF_SetStatus(status, code, message.c_str());
  TF_OpKernelContext_Failure(ctx, status);
  TF_DeleteStatus(status);
}

void compute_kernel(void* kernel, TF_OpKernelContext* ctx) {
  const Config& cfg = *static_cast<const Config*>(kernel);
  Inputs in;
  TF_Status* status = TF_NewStatus();
  int next = 0;
  if (cfg.residual) TF_GetInput(ctx, next++, &in.shortcut, status);
  if (TF_GetCode(status) == TF_OK) TF_GetInput(ctx, next++, &in.input, status);
  if (TF_GetCode(status) == TF_OK) TF_GetInput(ctx, next++, &in.key, status);
  if (TF_GetCode(status) == TF_OK) TF_GetInput(ctx, next++, &in.prob, status);
  if (TF_GetCode(status) != TF_OK) {
    TF_OpKernelContext_Failure(ctx, status);
    TF_DeleteStatus(status);
    return;
  }
  DropPathParams params;
  const std::string error = fill_params(params, cfg, in);
  if (!error.empty()) {
    TF_DeleteStatus(status);
    fail(ctx, g_entry.load() == nullptr ? TF_FAILED_PRECONDITION : TF_INVALID_ARGUMENT, error);
    return;
  }
  in.out = TF_AllocateOutput(ctx, 0, TF_TensorType(in.input), in.dims.data(),
                             static_cast<int>(in.dims.size()), TF_TensorByteSize(in.input), status);
  if (TF_GetCode(status) != TF_OK) {
    TF_OpKernelContext_Failure(ctx, status);
    TF_DeleteStatus(status);
    return;
  }
  TF_DeleteStatus(status);
  if (params.numel() == 0) return;
  params.out = TF_TensorData(in.out);
  stochdepth::IeeeSubnormals ieee;
  try {
    g_entry.load()->drop_path(params, Device{DeviceKind::kCPU, 0}, nullptr);
  } catch (const std::invalid_argument& e) {
    fail(ctx, TF_INVALID_ARGUMENT, std::string("stochdepth: ") + e.what());
  } catch (const std::exception& e) {
    fail(ctx, TF_INTERNAL, std::string("stochdepth: ") + e.what());
  }
}

template <bool kResidual>
void register_kernel(const char* op, TF_DataType type) {
  TF_KernelBuilder* b =
      TF_NewKernelBuilder(op, "CPU", &create_kernel<kResidual>, &compute_kernel, &delete_kernel);
  TF_Status* status = TF_NewStatus();
  TF_KernelBuilder_TypeConstraint(b, "T", type, status);
  if (TF_GetCode(status) == TF_OK) {
    const std::string kernel_name = std::string(op) + "Cpu" + std::to_string(type);
    TF_RegisterKernelBuilder(kernel_name.c_str(), b, status);
  } else {
    TF_DeleteKernelBuilder(b);
  }
  TF_DeleteStatus(status);
}

// Runs when tf.load_op_library opens the library: TensorFlow collects what it registers.
struct Registrations {
  Registrations() {
    register_op(kResidualOp, true);
    register_op(kScaleOp, false);
    for (TF_DataType t : {TF_HALF, TF_BFLOAT16, TF_FLOAT, TF_DOUBLE}) {
      register_kernel<true>(kResidualOp, t);
      register_kernel<false>(kScaleOp, t);
    }
  }
};
const Registrations g_registrations;

}  // namespace

// Called by stochdepth.tensorflow (ctypes) with the pointer in `_core`'s entry capsule. Returns
// 0 when connected, 1 when the entry comes from another build of the package.
extern "C" __attribute__((visibility("default"))) int stochdepth_tf_connect(const void* entry) {
  const auto* e = static_cast<const CoreEntry*>(entry);
  if (e == nullptr || e->abi != stochdepth::kCoreEntryAbi ||
      e->params_size != sizeof(DropPathParams)) {
    return 1;
  }
  g_entry.store(e);
  return 0;
}

// The TensorFlow version whose headers the library was compiled with.
extern "C" __attribute__((visibility("default"))) const char* stochdepth_tf_build_version() {
  return STOCHDEPTH_TF_BUILD_VERSION;
}
