// Array inputs and outputs of the bindings: a NumPy array, a stochdepth.Array, or any DLPack
// producer becomes an ArrayView (pointer, shape, dtype, device, flags) that keeps its source
// alive; outputs are NumPy arrays or stochdepth.Array (a DLPack producer owning its buffer).
// Defined in array_view.cc (the array object, NumPy) and dlpack_import.cc (DLPack producers).
// Translation only: no arithmetic, no RNG, no choice of kernel.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "stochdepth/drop_path.h"

namespace stochdepth {
namespace py = pybind11;

// Memory owned by the library (an output it allocated with the core's alloc_output).
struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  Device device;
  Buffer(size_t bytes, Device device, void* stream);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// The Python-visible output type for DLPack inputs: stochdepth.Array.
struct Array {
  std::shared_ptr<Buffer> buffer;
  std::vector<int64_t> shape;
  DType dtype;
};

struct ArrayView {
  void* data = nullptr;
  std::vector<int64_t> shape;
  DType dtype = DType::kFloat32;
  Device device;
  bool writable = true;
  bool contiguous = true;
  bool aligned = true;
  bool is_numpy = false;
  std::shared_ptr<void> keep_alive;  // the NumPy array, the Array's buffer or the DLPack tensor

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
};

// `name` is the argument's name for error messages. `stream` is handed to a CUDA producer's
// __dlpack__ so that it orders its work before ours.
ArrayView view_of(py::handle obj, const char* name, std::optional<int64_t> stream);

// The words array of seed= [seed, offset] (docs/design.md, "CUDA"): a NumPy array or DLPack
// tensor of 64-bit integers (uint64, or int64 read as two's complement). Its dtype is recorded as
// float64 (same item size). The shape (2,) is checked here, on the array itself or the exported
// DLPack tensor (its strides and alignment too); the caller checks layout and the device.
ArrayView view_words(py::handle obj, const char* name, std::optional<int64_t> stream);

const char* dtype_name(DType d);
std::string shape_str(const std::vector<int64_t>& shape);

// The bfloat16 NumPy dtype (ml_dtypes), registered once at import by the Python package.
void register_bfloat16(py::object dtype);

// A NumPy array owning a fresh CPU buffer / a stochdepth.Array on `device`.
py::array new_numpy(const std::vector<int64_t>& shape, DType dtype);
py::object new_array(const std::vector<int64_t>& shape, DType dtype, Device device, void* stream);

void bind_array(py::module_& m);

// The device checks every op's bindings make (ValueError, docs/design.md "Errors"): `v` on the
// device of `ref`; a CUDA array only where this build has CUDA and the device exists.
void check_device(const ArrayView& v, const ArrayView& ref, const char* name, const char* ref_name);
void check_cuda_available(const ArrayView& v, const char* name);

}  // namespace stochdepth
