// The fused norm's bindings (docs/design.md, "Fused residual and norm"): _core.forward_norm and
// _core.backward_norm validate their arguments (scalars with args.h, arrays with array_view.h),
// in the order types, shapes, layout, device, translate them once into NormParams and make one
// call into the core (norm.h) with the GIL released. No arithmetic, RNG or kernel choice here.
#include "bindings/norm.h"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "bindings/args.h"
#include "bindings/array_view.h"
#include "stochdepth/norm.h"
#include "stochdepth/norm_entry.h"

namespace py = pybind11;

namespace stochdepth {
namespace {

// The messages of the op's own checks (docs/design.md, "Errors").
void check_layout(const ArrayView& v, const char* name) {
  if (!v.contiguous) {
    value_error(std::string(name) +
                " must be C-contiguous (np.ascontiguousarray(x) or "
                "x.contiguous() make a contiguous copy), got a strided view of shape " +
                shape_str(v.shape));
  }
  if (!v.aligned) {
    value_error(std::string(name) + " must be aligned to its " +
                std::to_string(dtype_size(v.dtype)) + "-byte items, got an unaligned buffer");
  }
}

double eps_arg(py::handle obj) {
  if (py::isinstance<py::bool_>(obj) || PyComplex_Check(obj.ptr()) ||
      py::isinstance<py::str>(obj) ||
      !(PyFloat_Check(obj.ptr()) || PyLong_Check(obj.ptr()) || py::hasattr(obj, "__float__"))) {
    type_error("eps must be a positive real number, got " + type_name(obj));
  }
  const double eps = PyFloat_AsDouble(obj.ptr());
  if (PyErr_Occurred()) PyErr_Clear();
  if (!(eps > 0.0) || !std::isfinite(eps)) {  // also NaN and an integer too large for a double
    value_error("eps must be a positive finite number, got " + std::string(py::repr(obj)));
  }
  return eps;
}

// The scalar arguments shared by both passes.
struct Scalars {
  NormKind kind;
  double eps, p;
  bool training, batch_mode;
  uint64_t seed, offset;
  Scaling scaling;
  std::optional<int64_t> stream;
};

Scalars scalars(py::handle survival_prob, py::handle norm, py::handle eps, py::handle training,
                py::handle seed, py::handle offset, py::handle mode, py::handle scaling,
                py::handle stream) {
  Scalars s;
  s.p = survival_prob_arg(survival_prob);
  s.kind = choice_arg(norm, "norm", "layer", "rms") ? NormKind::kRms : NormKind::kLayer;
  s.eps = eps_arg(eps);
  s.training = bool_arg(training, "training");
  s.seed = seed_arg(seed, s.training);
  s.offset = u64_arg(offset, "offset");
  s.batch_mode = choice_arg(mode, "mode", "row", "batch");
  s.scaling = scaling_arg(scaling);
  s.stream = stream_arg(stream);
  return s;
}

// An optional array argument; None gives nothing.
std::optional<ArrayView> optional_view(py::handle obj, const char* name,
                                       std::optional<int64_t> stream) {
  if (obj.is_none()) return std::nullopt;
  return view_of(obj, name, stream);
}

// `v` against the main input `ref` (named `ref_name`): same dtype and shape.
void check_like(const ArrayView& v, const char* name, const ArrayView& ref, const char* ref_name) {
  if (v.dtype != ref.dtype) {
    type_error(std::string(name) + " must have dtype " + dtype_name(ref.dtype) + " like " +
               ref_name + ", got " + dtype_name(v.dtype));
  }
  if (v.shape != ref.shape) {
    value_error(std::string(name) + " must have shape " + shape_str(ref.shape) + " like " +
                ref_name + ", got " + shape_str(v.shape));
  }
}

// A per-channel vector (gamma, weight, bias): dtype of the inputs, shape (C,).
void check_vector(const std::optional<ArrayView>& v, const char* name, const ArrayView& ref,
                  const char* ref_name) {
  if (!v) return;
  if (v->dtype != ref.dtype) {
    type_error(std::string(name) + " must have dtype " + dtype_name(ref.dtype) + " like " +
               ref_name + ", got " + dtype_name(v->dtype));
  }
  const int64_t c = ref.shape.back();
  if (v->shape != std::vector<int64_t>{c}) {
    value_error(std::string(name) + " must have shape (" + std::to_string(c) +
                ",) (the last axis of " + ref_name + "), got " + shape_str(v->shape));
  }
}

void check_rank(const ArrayView& v, const char* name) {
  if (v.shape.size() < 2) {
    value_error(std::string(name) +
                " must have rank >= 2 (samples along axis 0, channels along the last axis), "
                "got shape " +
                shape_str(v.shape));
  }
}

struct Arrays {
  std::vector<std::pair<const ArrayView*, const char*>> all;
  void add(const std::optional<ArrayView>& v, const char* name) {
    if (v) all.emplace_back(&*v, name);
  }
  void add(const ArrayView& v, const char* name) { all.emplace_back(&v, name); }
  // Layout, then device, against the first.
  void check() const {
    for (const auto& [v, name] : all) check_layout(*v, name);
    for (const auto& [v, name] : all) check_device(*v, *all[0].first, name, all[0].second);
    check_cuda_available(*all[0].first, all[0].second);
  }
};

NormParams params_of(const Scalars& s, const ArrayView& like) {
  NormParams p;
  p.dtype = like.dtype;
  p.kind = s.kind;
  p.eps = s.eps;
  p.training = s.training;
  p.batch_mode = s.batch_mode;
  p.seed = s.seed;
  p.offset = s.offset;
  p.batch = like.shape[0];
  p.width = like.shape.back();
  int64_t per = 1;
  for (size_t i = 1; i + 1 < like.shape.size(); ++i) per *= like.shape[i];
  p.rows_per_sample = per;
  set_norm_scalars(p, s.p, s.scaling);
  return p;
}

// A fresh output like `like` (NumPy for NumPy inputs), and its data pointer.
py::object fresh(const std::vector<int64_t>& shape, const ArrayView& like,
                 std::optional<int64_t> stream, void** data) {
  py::object o = like.is_numpy ? py::object(new_numpy(shape, like.dtype))
                               : new_array(shape, like.dtype, like.device,
                                           reinterpret_cast<void*>(stream.value_or(0)));
  *data = view_of(o, "out", stream).data;
  return o;
}

template <class F>
void without_gil(F&& f) {  // as module.cc's: reacquired in plain code (interpreter exit)
  PyThreadState* state = PyEval_SaveThread();
  try {
    f();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

void check_bias_kind(const Scalars& s, py::handle bias) {
  if (s.kind == NormKind::kRms && !bias.is_none()) {
    value_error("bias must be None for norm='rms' (RMSNorm has no bias)");
  }
}

py::tuple forward_norm(py::object shortcut, py::object residual, py::object survival_prob,
                       py::object weight, py::object bias, py::object norm, py::object eps,
                       py::object gamma, py::object training, py::object seed, py::object offset,
                       py::object mode, py::object scaling, py::object stream) {
  const Scalars s =
      scalars(survival_prob, norm, eps, training, seed, offset, mode, scaling, stream);
  check_bias_kind(s, bias);
  const ArrayView sc = view_of(shortcut, "shortcut", s.stream);
  const ArrayView res = view_of(residual, "residual", s.stream);
  const auto g = optional_view(gamma, "gamma", s.stream);
  const auto w = optional_view(weight, "weight", s.stream);
  const auto b = optional_view(bias, "bias", s.stream);
  // Types and shapes
  if (res.dtype != sc.dtype) {
    type_error(std::string("shortcut and residual must have the same dtype, got ") +
               dtype_name(sc.dtype) + " and " + dtype_name(res.dtype));
  }
  check_rank(sc, "shortcut");
  check_like(res, "residual", sc, "shortcut");
  check_vector(g, "gamma", sc, "shortcut");
  check_vector(w, "weight", sc, "shortcut");
  check_vector(b, "bias", sc, "shortcut");
  // Layout, device
  Arrays arrays;
  arrays.add(sc, "shortcut");
  arrays.add(res, "residual");
  arrays.add(g, "gamma");
  arrays.add(w, "weight");
  arrays.add(b, "bias");
  arrays.check();

  NormParams p = params_of(s, sc);
  p.shortcut = sc.data;
  p.residual = res.data;
  p.gamma = g ? g->data : nullptr;
  p.weight = w ? w->data : nullptr;
  p.bias = b ? b->data : nullptr;
  py::object y = fresh(sc.shape, sc, s.stream, &p.y);
  py::object n = fresh(sc.shape, sc, s.stream, &p.n);
  if (sc.numel() > 0) {
    without_gil([&] { norm_forward(p, sc.device, reinterpret_cast<void*>(s.stream.value_or(0))); });
  }
  return py::make_tuple(y, n);
}

py::tuple backward_norm(py::object grad_y, py::object grad_n, py::object y_obj, py::object residual,
                        py::object survival_prob, py::object weight, py::object bias,
                        py::object norm, py::object eps, py::object gamma, py::object training,
                        py::object seed, py::object offset, py::object mode, py::object scaling,
                        py::object stream) {
  const Scalars s =
      scalars(survival_prob, norm, eps, training, seed, offset, mode, scaling, stream);
  check_bias_kind(s, bias);
  const ArrayView y = view_of(y_obj, "y", s.stream);
  const ArrayView gy = view_of(grad_y, "grad_y", s.stream);
  const ArrayView gn = view_of(grad_n, "grad_n", s.stream);
  const auto g = optional_view(gamma, "gamma", s.stream);
  const auto w = optional_view(weight, "weight", s.stream);
  const auto b = optional_view(bias, "bias", s.stream);
  // residual is read only with gamma (grad_gamma); without it, it is not even looked at.
  const auto res =
      g ? std::optional<ArrayView>(view_of(residual, "residual", s.stream)) : std::nullopt;
  check_rank(y, "y");
  check_like(gy, "grad_y", y, "y");
  check_like(gn, "grad_n", y, "y");
  if (res) check_like(*res, "residual", y, "y");
  check_vector(g, "gamma", y, "y");
  check_vector(w, "weight", y, "y");
  check_vector(b, "bias", y, "y");
  Arrays arrays;
  arrays.add(y, "y");
  arrays.add(gy, "grad_y");
  arrays.add(gn, "grad_n");
  arrays.add(res, "residual");
  arrays.add(g, "gamma");
  arrays.add(w, "weight");
  arrays.add(b, "bias");
  arrays.check();

  NormParams p = params_of(s, y);
  p.y_in = y.data;
  p.grad_y = gy.data;
  p.grad_n = gn.data;
  p.residual = res ? res->data : nullptr;
  p.gamma = g ? g->data : nullptr;
  p.weight = w ? w->data : nullptr;
  py::object gs = fresh(y.shape, y, s.stream, &p.grad_shortcut);
  py::object gr = fresh(y.shape, y, s.stream, &p.grad_residual);
  const std::vector<int64_t> vec{y.shape.back()};
  py::object gg = py::none(), gw = py::none(), gb = py::none();
  if (g) gg = fresh(vec, y, s.stream, &p.grad_gamma);
  if (w) gw = fresh(vec, y, s.stream, &p.grad_weight);
  if (b) gb = fresh(vec, y, s.stream, &p.grad_bias);
  // Even with no rows: the parameter gradients are then +0, which the core writes.
  if (vec[0] > 0) {
    without_gil([&] { norm_backward(p, y.device, reinterpret_cast<void*>(s.stream.value_or(0))); });
  }
  return py::make_tuple(gs, gr, gg, gw, gb);
}

}  // namespace

void register_norm(py::module_& m) {
  m.def("forward_norm", &forward_norm, py::arg("shortcut"), py::arg("residual"),
        py::arg("survival_prob"), py::arg("weight"), py::arg("bias"), py::arg("norm"),
        py::arg("eps"), py::arg("gamma"), py::arg("training"), py::arg("seed"), py::arg("offset"),
        py::arg("mode"), py::arg("scaling"), py::arg("stream"));
  m.def("backward_norm", &backward_norm, py::arg("grad_y"), py::arg("grad_n"), py::arg("y"),
        py::arg("residual"), py::arg("survival_prob"), py::arg("weight"), py::arg("bias"),
        py::arg("norm"), py::arg("eps"), py::arg("gamma"), py::arg("training"), py::arg("seed"),
        py::arg("offset"), py::arg("mode"), py::arg("scaling"), py::arg("stream"));
  // For stochdepth._jax_ffi's norm handlers (src/stochdepth/norm_entry.h).
  m.attr("_norm_entry") =
      py::capsule(const_cast<NormCoreEntry*>(norm_core_entry()), kNormEntryCapsuleName);
}

}  // namespace stochdepth
