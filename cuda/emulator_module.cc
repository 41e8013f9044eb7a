// PYBIND11_MODULE(_cuda_emulator): the CPU emulation of the CUDA kernels (emulator.h) for the
// tests, built whenever the CUDA kernels are. `run` mirrors _core.run_raw with host pointers (the
// same params_from_raw, params.h);
// the launch configuration queries are the functions the real launches call (launch_config.h).
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "emulator.h"
#include "launch_config.h"
#include "norm_emulator_module.h"

namespace py = pybind11;
using namespace stochdepth;

namespace {

DType dtype_of(const std::string& name) {
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  throw py::value_error("unknown dtype " + name);
}

void run(uintptr_t shortcut, uintptr_t input, uintptr_t out, int64_t outer, int64_t batch,
         int64_t inner, const std::string& dtype, double survival_prob, bool training,
         bool batch_mode, const std::string& scaling, uint64_t seed, uint64_t offset,
         bool compact_input, bool compact_output, bool reverse_threads, uintptr_t words,
         uintptr_t gamma, int64_t channels) {
  if (scaling != "training" && scaling != "inference") throw py::value_error("bad scaling");
  const DropPathParams p = params_from_raw(
      shortcut, input, out, outer, batch, inner, dtype_of(dtype), survival_prob, training,
      batch_mode, scaling == "training" ? Scaling::kTraining : Scaling::kInference, seed, offset,
      compact_input, compact_output, words,  // words: [seed, offset]; 0: the arguments
      gamma, channels);                      // gamma: 0, or `channels` elements
  py::gil_scoped_release release;
  emulator::drop_path(p, reverse_threads);
}

// The layer scale's backward pass, as _core.backward_gamma_raw: grad_out at input, grad_residual
// at out.
void backward_gamma(uintptr_t input, uintptr_t out, uintptr_t residual, uintptr_t gamma,
                    uintptr_t grad_gamma, int64_t outer, int64_t batch, int64_t inner,
                    const std::string& dtype, double survival_prob, bool training, bool batch_mode,
                    const std::string& scaling, uint64_t seed, uint64_t offset, int64_t channels,
                    bool reverse_threads, uintptr_t words) {
  if (scaling != "training" && scaling != "inference") throw py::value_error("bad scaling");
  if (gamma == 0 || grad_gamma == 0) throw py::value_error("gamma_ptr and grad_gamma_ptr");
  const DropPathParams p =
      params_from_raw(0, input, out, outer, batch, inner, dtype_of(dtype), survival_prob, training,
                      batch_mode, scaling == "training" ? Scaling::kTraining : Scaling::kInference,
                      seed, offset, false, false, words, gamma, channels);
  py::gil_scoped_release release;
  emulator::drop_path_backward_gamma(p, reinterpret_cast<const void*>(residual),
                                     reinterpret_cast<void*>(grad_gamma), reverse_threads);
}

}  // namespace

PYBIND11_MODULE(_cuda_emulator, m) {
  m.doc() = "The CUDA kernels' own source run on the CPU, every block and thread (tests only).";
  m.attr("THREADS") = launch::kThreads;
  m.attr("CHUNKS_PER_THREAD") = launch::kChunksPerThread;
  m.attr("MAX_GRID") = launch::kMaxGrid;
  emulator::register_norm_emulator(m);
  m.def("run", &run, py::arg("shortcut_ptr"), py::arg("input_ptr"), py::arg("out_ptr"),
        py::arg("outer"), py::arg("batch"), py::arg("inner"), py::arg("dtype"),
        py::arg("survival_prob"), py::arg("training"), py::arg("batch_mode"), py::arg("scaling"),
        py::arg("seed"), py::arg("offset"), py::arg("compact_input") = false,
        py::arg("compact_output") = false, py::arg("reverse_threads") = false,
        py::arg("words_ptr") = 0, py::arg("gamma_ptr") = 0, py::arg("channels") = 1);
  m.def("backward_gamma", &backward_gamma, py::arg("input_ptr"), py::arg("out_ptr"),
        py::arg("residual_ptr"), py::arg("gamma_ptr"), py::arg("grad_gamma_ptr"), py::arg("outer"),
        py::arg("batch"), py::arg("inner"), py::arg("dtype"), py::arg("survival_prob"),
        py::arg("training"), py::arg("batch_mode"), py::arg("scaling"), py::arg("seed"),
        py::arg("offset"), py::arg("channels"), py::arg("reverse_threads") = false,
        py::arg("words_ptr") = 0);
  m.def(
      "stream_copy",
      [](uintptr_t dst, uintptr_t src, size_t nbytes, bool reverse_threads) {
        py::gil_scoped_release release;
        emulator::stream_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src),
                              nbytes, reverse_threads);
      },
      py::arg("dst_ptr"), py::arg("src_ptr"), py::arg("nbytes"),
      py::arg("reverse_threads") = false);
  m.def("last_launch", [] {
    const emulator::LastLaunch l = emulator::last_launch();
    py::dict d;
    d["grid"] = l.grid;
    d["kernel"] = l.kernel;
    d["vec"] = l.vec;
    return d;
  });
  // The configuration functions of the real launches, on addresses only (nothing allocated).
  m.def(
      "layer_scale_grids",
      [](int64_t rows, int64_t channels) {
        const emulator::LayerScaleGrid g = emulator::layer_scale_grids(rows, channels);
        py::dict d;
        d["blocks"] = g.blocks;
        d["totals"] = g.totals;
        return d;
      },
      py::arg("rows"), py::arg("channels"));
  m.def(
      "dense_config",
      [](const std::string& dtype, int64_t numel, uintptr_t shortcut, uintptr_t input,
         uintptr_t out) {
        const launch::DenseConfig c =
            launch::dense_config(dtype_of(dtype), numel, shortcut, input, out);
        py::dict d;
        d["vec"] = c.vec;
        d["lead"] = c.lead;
        d["tile"] = c.tile;
        d["grid"] = c.grid;
        return d;
      },
      py::arg("dtype"), py::arg("numel"), py::arg("shortcut"), py::arg("input"), py::arg("out"));
  m.def(
      "compact_config",
      [](const std::string& dtype, int64_t batch, int64_t inner, uintptr_t shortcut,
         uintptr_t input, uintptr_t out) {
        const launch::CompactConfig c =
            launch::compact_config(dtype_of(dtype), batch, inner, shortcut, input, out);
        py::dict d;
        d["vec"] = c.vec;
        d["tile"] = c.tile;
        d["tiles_per_row"] = c.tiles_per_row;
        d["grid"] = c.grid;
        return d;
      },
      py::arg("dtype"), py::arg("batch"), py::arg("inner"), py::arg("shortcut"), py::arg("input"),
      py::arg("out"));
}
