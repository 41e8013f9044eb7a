// PYBIND11_MODULE(_core): validates Python arguments (scalars in args.cc, arrays here) and
// translates them, once, into DropPathParams and the core's enums, then makes one call into the
// core's entries (drop_path.h) with the GIL released. No arithmetic, no RNG, no kernel choice and
// no CPU/CUDA branch here: those live in src/stochdepth/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <string>
#include <vector>

#include "bindings/args.h"
#include "bindings/array_view.h"
#include "bindings/norm.h"
#include "stochdepth/alloc.h"
#include "stochdepth/core_entry.h"
#include "stochdepth/drop_path.h"
#include "stochdepth/isa.h"
#include "stochdepth/mask.h"
#include "stochdepth/thread_pool.h"

namespace py = pybind11;
using namespace stochdepth;

namespace {

// ---- array checks, in the order Types, Shapes, Layout, Device

bool overlaps(const ArrayView& a, const ArrayView& b) {
  if (!(a.device == b.device) || a.nbytes() == 0 || b.nbytes() == 0) return false;
  const auto a0 = reinterpret_cast<uintptr_t>(a.data), b0 = reinterpret_cast<uintptr_t>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

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

// `inputs` are (view, name) pairs already known to share dtype and shape.
void check_out(const ArrayView& out, const ArrayView& like, const char* like_name) {
  if (out.dtype != like.dtype) {
    type_error(std::string("out must have dtype ") + dtype_name(like.dtype) + " like " + like_name +
               ", got " + dtype_name(out.dtype));
  }
  if (out.shape != like.shape) {
    value_error("out must have shape " + shape_str(like.shape) + " like " + like_name + ", got " +
                shape_str(out.shape));
  }
  check_layout(out, "out");
  if (!out.writable) {
    value_error(
        "out must be writable, got a read-only array (a read-only NumPy array, a read-only "
        "DLPack tensor, or an immutable JAX or TensorFlow array)");
  }
}

void set_geometry(DropPathParams& p, const std::vector<int64_t>& shape, int64_t axis) {
  p.outer = 1;
  p.inner = 1;
  for (int64_t i = 0; i < axis; ++i) p.outer *= shape[i];
  p.batch = shape[axis];
  for (size_t i = axis + 1; i < shape.size(); ++i) p.inner *= shape[i];
}

void* stream_ptr(std::optional<int64_t> stream) {
  return reinterpret_cast<void*>(stream.value_or(0));
}

// Runs f() with the GIL released. Not py::gil_scoped_release: at interpreter exit CPython ends a
// daemon thread that asks for the GIL back with pthread_exit, and that forced unwind leaving a
// destructor (noexcept) would abort the whole process ("terminate called without an active
// exception"). Reacquired here in plain code, the unwind ends the thread quietly.
template <class F>
void without_gil(F&& f) {
  PyThreadState* state = PyEval_SaveThread();
  try {
    f();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

void run(const DropPathParams& p, Device device, std::optional<int64_t> stream) {
  if (p.numel() == 0) return;
  without_gil([&] { drop_path(p, device, stream_ptr(stream)); });
}

// run_raw's and stream_copy_raw's device: a CUDA ordinal, or negative for the CPU.
Device raw_device(int device) {
  return device < 0 ? Device{} : Device{DeviceKind::kCUDA, static_cast<int32_t>(device)};
}

// seed= given as the words [seed, offset] (docs/design.md, "CUDA"): a 1-d array of 2 elements.
// Every other array keeps the integer path (and its TypeError naming the shape). The object's
// `.shape` only picks the path: view_words checks the array itself, or the tensor it exports,
// before anything reads a word.
bool is_words_array(py::handle obj) {
  if (obj.is_none() || PyLong_Check(obj.ptr())) return false;
  if (!py::isinstance<py::array>(obj) && !py::hasattr(obj, "__dlpack__")) return false;
  try {
    const py::tuple shape(obj.attr("shape"));
    return shape.size() == 1 && shape[0].cast<int64_t>() == 2;
  } catch (py::error_already_set&) {
    return false;
  } catch (py::cast_error&) {
    return false;
  }
}

struct Common {
  bool training;
  uint64_t seed, offset;
  bool batch_mode;
  Scaling scaling;
  double p;
  std::optional<int64_t> stream;
  std::optional<ArrayView> words;  // seed= as a [seed, offset] array: read by the kernel
};

Common common_args(py::handle survival_prob, py::handle training, py::handle seed,
                   py::handle offset, py::handle mode, py::handle scaling, py::handle stream) {
  Common c;
  c.p = survival_prob_arg(survival_prob);
  c.training = bool_arg(training, "training");
  const bool words = is_words_array(seed);
  c.seed = words ? 0 : seed_arg(seed, c.training);
  c.offset = u64_arg(offset, "offset");
  c.batch_mode = choice_arg(mode, "mode", "row", "batch");
  c.scaling = scaling_arg(scaling);
  c.stream = stream_arg(stream);
  if (words) {
    if (c.offset != 0) {
      value_error(
          "offset must be 0 when seed is a [seed, offset] array (its second word is "
          "the offset), got " +
          std::to_string(c.offset));
    }
    c.words = view_words(seed, "seed", c.stream);
  }
  return c;
}

// The words array against the data it keys: C-contiguous, aligned, on the same device.
void check_words(const Common& c, const ArrayView& data, const char* data_name) {
  if (!c.words) return;
  check_layout(*c.words, "seed");
  check_device(*c.words, data, "seed", data_name);
}

// The layer scale (docs/design.md, "Layer scale") against the array it scales, `ref` (named
// `ref_name`, sample axis `axis`): the dtype of ref, shape (C,) with C ref's last axis, which must
// not be the sample axis. Types and shapes here; layout and device with the other arrays.
void check_gamma(const ArrayView& g, const ArrayView& ref, const char* ref_name, int64_t axis) {
  if (g.dtype != ref.dtype) {
    type_error(std::string("gamma must have dtype ") + dtype_name(ref.dtype) + " like " + ref_name +
               ", got " + dtype_name(g.dtype));
  }
  const int64_t rank = static_cast<int64_t>(ref.shape.size());
  if (axis == rank - 1) {
    value_error(std::string("gamma scales the channels (the last axis of ") + ref_name +
                "), which must not be the sample axis; got axis " + std::to_string(axis) + " for " +
                ref_name + " of shape " + shape_str(ref.shape));
  }
  const int64_t c = ref.shape.back();
  if (g.shape != std::vector<int64_t>{c}) {
    value_error("gamma must have shape (" + std::to_string(c) + ",) (the last axis of " + ref_name +
                "), got " + shape_str(g.shape));
  }
  if (c > INT32_MAX) {
    value_error("gamma must have fewer than 2**31 elements, got " + std::to_string(c));
  }
}

// gamma's layout and device (after the data's), and that the output does not overlap it.
void check_gamma_layout_device(const ArrayView& g, const ArrayView& ref, const char* ref_name) {
  check_layout(g, "gamma");
  check_device(g, ref, "gamma", ref_name);
}

DropPathParams make_params(const Common& c, const ArrayView& input, int64_t axis) {
  DropPathParams p;
  p.dtype = input.dtype;
  p.training = c.training;
  p.batch_mode = c.batch_mode;
  p.seed = c.seed;
  p.offset = c.offset;
  if (c.words) p.rng_words = static_cast<const uint64_t*>(c.words->data);
  set_geometry(p, input.shape, axis);
  set_scalars(p, c.p, c.scaling);
  return p;
}

// A fresh output like `input`: NumPy for NumPy inputs, stochdepth.Array for DLPack inputs.
py::object new_output(const ArrayView& like, std::optional<int64_t> stream) {
  if (like.is_numpy) return new_numpy(like.shape, like.dtype);
  return new_array(like.shape, like.dtype, like.device, stream_ptr(stream));
}

// The output of a call computing from `input`: the caller's `out` (checked against `input`:
// dtype, shape, layout, writable, device, no overlap) or a fresh one. `view` is set to it.
py::object output(py::object out, const ArrayView& input, const char* input_name,
                  std::optional<int64_t> stream, ArrayView& view) {
  if (out.is_none()) {
    py::object fresh = new_output(input, stream);
    view = view_of(fresh, "out", stream);
    return fresh;
  }
  view = view_of(out, "out", stream);
  check_out(view, input, input_name);
  check_device(view, input, "out", input_name);
  if (overlaps(view, input)) value_error(std::string("out must not overlap ") + input_name);
  return out;
}

py::object forward(py::object shortcut, py::object residual, py::object survival_prob,
                   py::object training, py::object seed, py::object offset, py::object mode,
                   py::object axis_obj, py::object scaling, py::object out, py::object stream,
                   py::object gamma) {
  const Common c = common_args(survival_prob, training, seed, offset, mode, scaling, stream);
  ArrayView res = view_of(residual, "residual", c.stream);
  std::optional<ArrayView> sc, gm;
  if (!shortcut.is_none()) sc = view_of(shortcut, "shortcut", c.stream);
  if (!gamma.is_none()) gm = view_of(gamma, "gamma", c.stream);
  // Types
  if (sc && sc->dtype != res.dtype) {
    type_error(std::string("shortcut and residual must have the same dtype, got ") +
               dtype_name(sc->dtype) + " and " + dtype_name(res.dtype));
  }
  // Shapes
  if (res.shape.empty())
    value_error("residual must have rank >= 1 (a sample axis), got a 0-d array");
  if (sc && sc->shape != res.shape) {
    value_error("residual must have shape " + shape_str(sc->shape) + " like shortcut, got " +
                shape_str(res.shape));
  }
  const int64_t axis = axis_arg(axis_obj, res.shape.size());
  if (gm) check_gamma(*gm, res, "residual", axis);
  // Layout
  if (sc) check_layout(*sc, "shortcut");
  check_layout(res, "residual");
  // Device
  if (sc) check_device(res, *sc, "residual", "shortcut");
  check_cuda_available(res, "residual");
  check_words(c, res, "residual");
  if (gm) check_gamma_layout_device(*gm, res, "residual");

  ArrayView o;
  const py::object result = output(out, res, "residual", c.stream, o);
  if (sc && overlaps(o, *sc) && o.data != sc->data) {
    value_error(
        "out must either be shortcut itself (in place) or not overlap it; it partially overlaps");
  }
  if (gm && overlaps(o, *gm)) value_error("out must not overlap gamma");

  DropPathParams p = make_params(c, res, axis);
  p.shortcut = sc ? sc->data : nullptr;
  p.input = res.data;
  p.out = o.data;
  if (gm) {
    p.gamma = gm->data;
    p.channels = static_cast<int32_t>(res.shape.back());
  }
  run(p, res.device, c.stream);
  return result;
}

py::tuple backward(py::object grad_out, py::object survival_prob, py::object training,
                   py::object seed, py::object offset, py::object mode, py::object axis_obj,
                   py::object scaling, py::object out, py::object stream, py::object gamma,
                   py::object residual) {
  const Common c = common_args(survival_prob, training, seed, offset, mode, scaling, stream);
  ArrayView g = view_of(grad_out, "grad_out", c.stream);
  // residual is read only with gamma (grad_gamma); without it, it is not even looked at.
  std::optional<ArrayView> gm, res;
  if (!gamma.is_none()) {
    gm = view_of(gamma, "gamma", c.stream);
    if (residual.is_none()) {
      value_error(
          "residual is needed with gamma: grad_gamma sums grad_out * residual over the kept "
          "samples (pass the forward's residual)");
    }
    res = view_of(residual, "residual", c.stream);
    if (res->dtype != g.dtype) {
      type_error(std::string("residual must have dtype ") + dtype_name(g.dtype) +
                 " like grad_out, got " + dtype_name(res->dtype));
    }
  }
  if (g.shape.empty()) value_error("grad_out must have rank >= 1 (a sample axis), got a 0-d array");
  const int64_t axis = axis_arg(axis_obj, g.shape.size());
  if (gm) {
    check_gamma(*gm, g, "grad_out", axis);
    if (res->shape != g.shape) {
      value_error("residual must have shape " + shape_str(g.shape) + " like grad_out, got " +
                  shape_str(res->shape));
    }
  }
  check_layout(g, "grad_out");
  check_cuda_available(g, "grad_out");
  check_words(c, g, "grad_out");
  if (gm) {
    check_layout(*res, "residual");
    check_device(*res, g, "residual", "grad_out");
    check_gamma_layout_device(*gm, g, "grad_out");
  }

  ArrayView o;
  const py::object result = output(out, g, "grad_out", c.stream, o);
  DropPathParams p = make_params(c, g, axis);
  p.input = g.data;
  p.out = o.data;
  if (!gm) {
    run(p, g.device, c.stream);
    return py::make_tuple(grad_out, result);
  }
  if (overlaps(o, *gm)) value_error("out must not overlap gamma");
  if (overlaps(o, *res)) value_error("out must not overlap residual");
  p.gamma = gm->data;
  p.channels = static_cast<int32_t>(g.shape.back());
  py::object grad_gamma = new_output(*gm, c.stream);
  const ArrayView gg = view_of(grad_gamma, "grad_gamma", c.stream);
  if (p.channels > 0) {  // no channels: no element, and grad_gamma is empty
    without_gil(
        [&] { drop_path_backward_gamma(p, res->data, gg.data, g.device, stream_ptr(c.stream)); });
  }
  return py::make_tuple(grad_out, result, grad_gamma);
}

py::array mask(py::object batch_obj, py::object survival_prob, py::object seed, py::object offset,
               py::object mode) {
  const int64_t batch = i64_arg(batch_obj, "batch", "a non-negative integer");
  if (batch < 0) value_error("batch must be >= 0, got " + std::to_string(batch));
  if (batch > (int64_t{1} << 40))
    value_error("batch must be at most 2**40, got " + std::to_string(batch));
  if (seed.is_none()) seed_arg(seed, true, "(mask always draws)");  // before the others
  if (is_words_array(seed)) {
    type_error(
        "mask takes seed and offset as integers; read a [seed, offset] array with "
        "int(words[0]), int(words[1])");
  }
  const Common c = common_args(survival_prob, py::bool_(true), seed, offset, mode,
                               py::str("inference"), py::none());
  py::array_t<bool> keep(batch);
  compute_mask(reinterpret_cast<uint8_t*>(keep.mutable_data()), batch, c.seed, c.offset,
               keep_threshold(c.p), c.batch_mode);
  return std::move(keep);
}

// The adapters' entry: pointers they validated themselves, minimal overhead (params.h).
void run_raw(uintptr_t shortcut, uintptr_t input, uintptr_t out, int64_t outer, int64_t batch,
             int64_t inner, DType dtype, double survival_prob, bool training, bool batch_mode,
             Scaling scaling, uint64_t seed, uint64_t offset, int device, int64_t stream,
             bool compact_input, bool compact_output, uintptr_t rng_words, uintptr_t gamma,
             int64_t channels) {
  const DropPathParams p = params_from_raw(
      shortcut, input, out, outer, batch, inner, dtype, survival_prob, training, batch_mode,
      scaling, seed, offset, compact_input, compact_output, rng_words, gamma, channels);
  run(p, raw_device(device), stream);
}

// The backward pass with gamma for the adapters (drop_path_backward_gamma): grad_out at input,
// grad_residual at out, the forward's residual, grad_gamma (channels elements).
void backward_gamma_raw(uintptr_t input, uintptr_t out, uintptr_t residual, uintptr_t gamma,
                        uintptr_t grad_gamma, int64_t outer, int64_t batch, int64_t inner,
                        int64_t channels, DType dtype, double survival_prob, bool training,
                        bool batch_mode, Scaling scaling, uint64_t seed, uint64_t offset,
                        int device, int64_t stream, uintptr_t rng_words) {
  if (gamma == 0 || grad_gamma == 0) throw std::invalid_argument("gamma_ptr and grad_gamma_ptr");
  const DropPathParams p =
      params_from_raw(0, input, out, outer, batch, inner, dtype, survival_prob, training,
                      batch_mode, scaling, seed, offset, false, false, rng_words, gamma, channels);
  without_gil([&] {
    drop_path_backward_gamma(p, reinterpret_cast<const void*>(residual),
                             reinterpret_cast<void*>(grad_gamma), raw_device(device),
                             stream_ptr(stream));
  });
}

void stream_copy_arrays(py::object dst, py::object src) {
  ArrayView d = view_of(dst, "dst", std::nullopt), s = view_of(src, "src", std::nullopt);
  if (d.nbytes() != s.nbytes()) {
    value_error("dst and src must have the same number of bytes, got " +
                std::to_string(d.nbytes()) + " and " + std::to_string(s.nbytes()));
  }
  check_layout(d, "dst");
  check_layout(s, "src");
  if (!d.writable) value_error("dst must be writable");
  if (overlaps(d, s)) value_error("dst must not overlap src");
  check_device(d, s, "dst", "src");
  if (d.device.kind != DeviceKind::kCPU)
    value_error("stream_copy takes CPU arrays; use stream_copy_raw for CUDA");
  without_gil([&] { stochdepth::stream_copy(d.data, s.data, d.nbytes(), d.device, nullptr); });
}

void stream_copy_raw(uintptr_t dst, uintptr_t src, size_t nbytes, int device, int64_t stream) {
  without_gil([&] {
    stochdepth::stream_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                            nbytes, raw_device(device), reinterpret_cast<void*>(stream));
  });
}

std::vector<std::string> names(const std::vector<Isa>& isas) {
  std::vector<std::string> v;
  for (Isa isa : isas) v.emplace_back(isa_name(isa));
  return v;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "stochdepth's compiled core. Use the functions of the stochdepth package instead.";
  bind_array(m);
  register_norm(m);

  // Enums, not strings, past this boundary: the adapters convert once (at import), and the
  // per-call entry run_raw takes the enum values.
  py::enum_<DType>(m, "DType")
      .value("float16", DType::kFloat16)
      .value("bfloat16", DType::kBFloat16)
      .value("float32", DType::kFloat32)
      .value("float64", DType::kFloat64);
  py::enum_<Scaling>(m, "Scaling")
      .value("inference", Scaling::kInference)
      .value("training", Scaling::kTraining);

  m.def("forward", &forward, py::arg("shortcut"), py::arg("residual"), py::arg("survival_prob"),
        py::arg("training"), py::arg("seed"), py::arg("offset"), py::arg("mode"), py::arg("axis"),
        py::arg("scaling"), py::arg("out"), py::arg("stream"), py::arg("gamma"));
  m.def("backward", &backward, py::arg("grad_out"), py::arg("survival_prob"), py::arg("training"),
        py::arg("seed"), py::arg("offset"), py::arg("mode"), py::arg("axis"), py::arg("scaling"),
        py::arg("out"), py::arg("stream"), py::arg("gamma"), py::arg("residual"));
  m.def("mask", &mask, py::arg("batch"), py::arg("survival_prob"), py::arg("seed"),
        py::arg("offset"), py::arg("mode"));
  m.def("run_raw", &run_raw, py::arg("shortcut_ptr"), py::arg("input_ptr"), py::arg("out_ptr"),
        py::arg("outer"), py::arg("batch"), py::arg("inner"), py::arg("dtype"),
        py::arg("survival_prob"), py::arg("training"), py::arg("batch_mode"), py::arg("scaling"),
        py::arg("seed"), py::arg("offset"), py::arg("device"), py::arg("stream"),
        py::arg("compact_input") = false, py::arg("compact_output") = false,
        py::arg("rng_words_ptr") = 0, py::arg("gamma_ptr") = 0, py::arg("channels") = 1);
  m.def("backward_gamma_raw", &backward_gamma_raw, py::arg("input_ptr"), py::arg("out_ptr"),
        py::arg("residual_ptr"), py::arg("gamma_ptr"), py::arg("grad_gamma_ptr"), py::arg("outer"),
        py::arg("batch"), py::arg("inner"), py::arg("channels"), py::arg("dtype"),
        py::arg("survival_prob"), py::arg("training"), py::arg("batch_mode"), py::arg("scaling"),
        py::arg("seed"), py::arg("offset"), py::arg("device"), py::arg("stream"),
        py::arg("rng_words_ptr") = 0);
  m.def(
      "write_device_words",
      [](uintptr_t dst, py::object seed, py::object offset, int device) {
        if (dst == 0 || dst % alignof(uint64_t) != 0) {
          value_error("dst_ptr must be a non-null, 8-byte aligned device pointer");
        }
        const uint64_t s = u64_arg(seed, "seed"), o = u64_arg(offset, "offset");
        without_gil([&] { write_words(reinterpret_cast<void*>(dst), s, o, raw_device(device)); });
      },
      py::arg("dst_ptr"), py::arg("seed"), py::arg("offset"), py::arg("device"),
      "Writes [seed, offset] at dst now (device < 0: the CPU), outside any CUDA graph capture.");
  m.def("stream_copy", &stream_copy_arrays, py::arg("dst"), py::arg("src"));
  m.def("stream_copy_raw", &stream_copy_raw, py::arg("dst_ptr"), py::arg("src_ptr"),
        py::arg("nbytes"), py::arg("device"), py::arg("stream"));
  m.def(
      "philox4x32_10",
      [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key, const std::string& isa) {
        std::array<uint32_t, 4> out{};
        philox_block(supported_isa(isa), ctr.data(), key.data(), out.data());
        return py::make_tuple(out[0], out[1], out[2], out[3]);
      },
      py::arg("counter"), py::arg("key"), py::arg("isa") = "scalar",
      "One Philox4x32-10 block from the given CPU ISA's code (for the known-answer tests).");
  m.def("register_bfloat16", &register_bfloat16, py::arg("dtype"));

  m.def("build_info", [] {
    py::dict d;
    d["version"] = STOCHDEPTH_VERSION;
    d["cpu_isas_compiled"] = names(compiled_isas());
    d["cpu_isas_supported"] = names(supported_isas());
    d["cpu_isa"] = isa_name(active_isa());
    d["cuda_compiled"] = cuda_compiled();
    d["cuda_architectures"] = cuda_architectures();
#ifdef STOCHDEPTH_HAS_CUDA_EMULATOR
    d["cuda_emulator"] = true;  // stochdepth._cuda_emulator, the tests' module, is installed
#else
    d["cuda_emulator"] = false;
#endif
    d["cuda_device_count"] = cuda_device_count();
    d["num_threads"] = num_threads();
    d["parallel_threshold_bytes"] = parallel_threshold_bytes();
    d["stream_threshold_bytes"] = cpu_stream_threshold_bytes();
    d["max_threads"] = kMaxThreads;
    d["cache_limit_bytes"] = cpu_cache_limit_bytes();  // reads STOCHDEPTH_CACHE_MB
    return d;
  });
  // ISA names are converted here, once; the core sees the Isa enum.
  m.def("set_isa", [](const std::string& name) { set_isa(supported_isa(name)); }, py::arg("name"));
  m.def("get_isa", [] { return std::string(isa_name(active_isa())); });
  m.def(
      "set_num_threads", [](py::object n) { set_num_threads(num_threads_arg(n, kMaxThreads)); },
      py::arg("n"));
  m.def("get_num_threads", &num_threads);
  m.def("set_parallel_threshold", &set_parallel_threshold_bytes, py::arg("bytes"));
  m.def("get_parallel_threshold", &parallel_threshold_bytes);
  m.def("set_stream_threshold", &set_cpu_stream_threshold_bytes, py::arg("bytes"));
  m.def("get_stream_threshold", &cpu_stream_threshold_bytes);
  m.def("cache_bytes", &cpu_cache_bytes);
  m.def("cache_clear", &release_cached_outputs);
  // For stochdepth._jax_ffi: its XLA handlers run this module's core (src/stochdepth/core_entry.h).
  m.attr("_core_entry") = py::capsule(const_cast<CoreEntry*>(core_entry()), kCoreEntryCapsuleName);
}
