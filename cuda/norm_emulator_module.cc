// stochdepth._cuda_emulator.norm: the fused norm's CUDA kernels run on the CPU (norm_emulator.h)
// on host pointers, for tests/test_norm_cuda_emulated.py. Arguments mirror NormParams.
#include "norm_emulator_module.h"

#include <string>

#include "norm_emulator.h"

namespace py = pybind11;

namespace stochdepth {
namespace emulator {
namespace {

DType norm_dtype(const std::string& name) {
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  throw py::value_error("unknown dtype " + name);
}

template <class P>
P* ptr(uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

}  // namespace

void register_norm_emulator(py::module_& m) {
  m.def(
      "norm",
      [](bool backward, py::dict ptrs, int64_t batch, int64_t rows_per_sample, int64_t width,
         const std::string& dtype, const std::string& norm, double eps, double survival_prob,
         bool training, bool batch_mode, const std::string& scaling, uint64_t seed, uint64_t offset,
         bool reverse_threads) {
        if (!(survival_prob >= 0.0 && survival_prob <= 1.0)) {
          throw py::value_error("survival_prob must be in [0, 1]");
        }
        auto get = [&](const char* k) -> uintptr_t {
          return ptrs.contains(k) ? ptrs[k].cast<uintptr_t>() : 0;
        };
        NormParams p;
        p.shortcut = ptr<const void>(get("shortcut"));
        p.residual = ptr<const void>(get("residual"));
        p.gamma = ptr<const void>(get("gamma"));
        p.weight = ptr<const void>(get("weight"));
        p.bias = ptr<const void>(get("bias"));
        p.y = ptr<void>(get("y"));
        p.n = ptr<void>(get("n"));
        p.grad_y = ptr<const void>(get("grad_y"));
        p.grad_n = ptr<const void>(get("grad_n"));
        p.y_in = ptr<const void>(get("y_in"));
        p.grad_shortcut = ptr<void>(get("grad_shortcut"));
        p.grad_residual = ptr<void>(get("grad_residual"));
        p.grad_gamma = ptr<void>(get("grad_gamma"));
        p.grad_weight = ptr<void>(get("grad_weight"));
        p.grad_bias = ptr<void>(get("grad_bias"));
        p.batch = batch;
        p.rows_per_sample = rows_per_sample;
        p.width = width;
        p.dtype = norm_dtype(dtype);
        if (norm != "layer" && norm != "rms") throw py::value_error("bad norm");
        p.kind = norm == "layer" ? NormKind::kLayer : NormKind::kRms;
        p.eps = eps;
        p.training = training;
        p.batch_mode = batch_mode;
        p.seed = seed;
        p.offset = offset;
        p.rng_words = ptr<const uint64_t>(get("rng_words"));
        if (scaling != "training" && scaling != "inference") throw py::value_error("bad scaling");
        set_norm_scalars(p, survival_prob,
                         scaling == "training" ? Scaling::kTraining : Scaling::kInference);
        py::gil_scoped_release release;
        emulator::norm(p, backward, reverse_threads);
      },
      py::arg("backward"), py::arg("ptrs"), py::arg("batch"), py::arg("rows_per_sample"),
      py::arg("width"), py::arg("dtype"), py::arg("norm"), py::arg("eps"), py::arg("survival_prob"),
      py::arg("training"), py::arg("batch_mode"), py::arg("scaling"), py::arg("seed"),
      py::arg("offset"), py::arg("reverse_threads") = false,
      "The fused norm's CUDA kernels on the CPU; `ptrs` maps NormParams' pointer names to host "
      "addresses (absent: null).");
}

}  // namespace emulator
}  // namespace stochdepth
