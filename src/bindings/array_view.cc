// The array object of the bindings: NumPy arrays and stochdepth.Array <-> ArrayView (shape,
// dtype, flags), the outputs (NumPy views and stochdepth.Array, with its own DLPack export), and
// view_of / view_words, which hand a DLPack producer to dlpack_import.cc. Translation only: the
// checks of what an op accepts are in module.cc, and memory comes from the core.
#include "array_view.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <utility>

#include "bindings/args.h"
#include "bindings/dlpack.h"
#include "bindings/dlpack_import.h"

namespace stochdepth {
namespace {

using namespace dlpack;

py::object& bf16_dtype() {
  static py::object* d = new py::object();  // leaked on purpose: outlives interpreter teardown
  return *d;
}

DType dtype_from_numpy(const py::dtype& dt, const char* name) {
  // Read as native, a big-endian array gives garbage, not an error: refuse it.
  if (!dt.attr("isnative").cast<bool>()) {
    type_error(std::string(name) + " must have the machine's native byte order, got dtype '" +
               std::string(py::str(dt.attr("str"))) +
               "' (x.astype(x.dtype.newbyteorder('=')) makes a native copy)");
  }
  if (dt.kind() == 'f') {
    switch (dt.itemsize()) {
      case 2:
        return DType::kFloat16;
      case 4:
        return DType::kFloat32;
      case 8:
        return DType::kFloat64;
    }
  }
  if (bf16_dtype() && dt.equal(bf16_dtype())) return DType::kBFloat16;
  type_error(std::string(name) +
             " must have a floating dtype (float16, bfloat16, float32 or "
             "float64), got " +
             std::string(py::str(dt)));
}

ArrayView view_numpy(const py::array& arr, const char* name) {
  ArrayView v;
  v.is_numpy = true;
  v.dtype = dtype_from_numpy(arr.dtype(), name);
  v.data = const_cast<void*>(arr.data());
  v.shape.assign(arr.shape(), arr.shape() + arr.ndim());
  const int flags = py::detail::array_proxy(arr.ptr())->flags;
  v.contiguous = flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
  v.aligned = flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_;
  v.writable = flags & py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  v.keep_alive = std::shared_ptr<void>(new py::object(arr), [](void* p) {
    delete static_cast<py::object*>(p);  // views die in the binding, with the GIL held
  });
  return v;
}

// ---- stochdepth.Array's own DLPack export

// One export: the tensor a consumer gets, and what keeps the buffer alive. It is shared by the
// capsule and the consumer (two references) and freed when both are done, so that the deleter
// is idempotent: a consumer that calls it and then leaves the capsule unrenamed (torch does, on
// an error path) or calls it twice does not free anything twice.
struct ExportCtx {
  std::shared_ptr<Buffer> buffer;
  std::vector<int64_t> shape;
  DLManagedTensor managed{};
  std::atomic<int> refs{2};
  std::atomic<bool> released{false};
};

// Array.__dlpack__(stream=s): the consumer will use the array on stream s, which must wait for
// our kernels on the array's own stream (DLPack: None means the legacy default stream, -1 asks
// for no synchronisation).
void order_consumer(const Array& a, const py::object& stream) {
  if (a.buffer->device.kind != DeviceKind::kCUDA) return;
  const int64_t s = stream.is_none() ? 1 : stream.cast<int64_t>();
  if (s == -1) return;
  export_output(a.buffer->ptr, a.buffer->device, reinterpret_cast<void*>(s));
}

void unref(ExportCtx* ctx) {
  if (ctx->refs.fetch_sub(1) == 1) delete ctx;
}

void export_deleter(DLManagedTensor* m) {
  auto* ctx = static_cast<ExportCtx*>(m->manager_ctx);
  if (ctx->released.exchange(true)) return;  // already released: nothing more to do
  ctx->buffer.reset();
  unref(ctx);
}

void capsule_destructor(PyObject* cap) {
  // An unconsumed capsule still owns its tensor; a consumed one was renamed "used_dltensor" and
  // its consumer calls the deleter. Either way the capsule drops its own reference.
  auto* ctx = static_cast<ExportCtx*>(PyCapsule_GetContext(cap));
  if (!ctx) {
    PyErr_Clear();
    return;
  }
  if (PyCapsule_IsValid(cap, "dltensor")) export_deleter(&ctx->managed);
  unref(ctx);
}

DLDataType dl_dtype(DType d) {
  switch (d) {
    case DType::kFloat16:
      return {kDLFloat, 16, 1};
    case DType::kBFloat16:
      return {kDLBfloat, 16, 1};
    case DType::kFloat32:
      return {kDLFloat, 32, 1};
    case DType::kFloat64:
      return {kDLFloat, 64, 1};
  }
  return {kDLFloat, 32, 1};
}

py::capsule to_dlpack(const Array& a) {
  auto* ctx = new ExportCtx{a.buffer, a.shape, {}};
  DLTensor& t = ctx->managed.dl_tensor;
  t.data = a.buffer->ptr;
  t.device = {static_cast<int32_t>(a.buffer->device.kind), a.buffer->device.id};
  t.ndim = static_cast<int32_t>(ctx->shape.size());
  t.dtype = dl_dtype(a.dtype);
  t.shape = ctx->shape.data();
  t.strides = nullptr;  // compact row-major
  t.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = &export_deleter;
  PyObject* cap = PyCapsule_New(&ctx->managed, "dltensor", &capsule_destructor);
  if (!cap) {
    delete ctx;
    throw py::error_already_set();
  }
  if (PyCapsule_SetContext(cap, ctx) != 0) {  // cannot fail for a valid capsule
    Py_DECREF(cap);  // its destructor finds no context and leaves ctx alone
    delete ctx;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

py::object numpy_dtype(DType d) {
  switch (d) {
    case DType::kFloat16:
      return py::dtype("float16");
    case DType::kFloat32:
      return py::dtype("float32");
    case DType::kFloat64:
      return py::dtype("float64");
    case DType::kBFloat16:
      if (!bf16_dtype()) throw py::type_error("bfloat16 needs ml_dtypes (pip install ml_dtypes)");
      return bf16_dtype();
  }
  return py::none();
}

std::vector<py::ssize_t> c_strides(const std::vector<int64_t>& shape, size_t itemsize) {
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t s = static_cast<py::ssize_t>(itemsize);
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= static_cast<py::ssize_t>(std::max<int64_t>(shape[i], 1));
  }
  return strides;
}

// A NumPy array viewing `buffer`, keeping it alive through a capsule base.
py::array numpy_view(const std::shared_ptr<Buffer>& buffer, const std::vector<int64_t>& shape,
                     DType dtype) {
  auto* owner = new std::shared_ptr<Buffer>(buffer);
  py::capsule base(owner, [](void* p) { delete static_cast<std::shared_ptr<Buffer>*>(p); });
  return py::array(py::dtype::from_args(numpy_dtype(dtype)),
                   std::vector<py::ssize_t>(shape.begin(), shape.end()),
                   c_strides(shape, dtype_size(dtype)), buffer->ptr, base);
}

// A dl_device argument of Array.__dlpack__: None, or (type, id) naming this array's device.
void check_export_device(const Array& a, py::object dl_device) {
  if (dl_device.is_none()) return;
  const Device own = a.buffer->device;
  bool same = false;
  try {
    const auto d = dl_device.cast<std::pair<int32_t, int32_t>>();
    same = d.first == static_cast<int32_t>(own.kind) && d.second == own.id;
  } catch (py::cast_error&) {
    throw py::type_error("dl_device must be a (device_type, device_id) pair of integers, got " +
                         std::string(py::repr(dl_device)));
  }
  if (!same) {  // as NumPy does: no cross-device export without a copy
    throw py::buffer_error("stochdepth.Array on " + own.str() +
                           " cannot be exported to DLPack device " +
                           std::string(py::repr(dl_device)) + " (copy is not supported)");
  }
}

int64_t product(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

}  // namespace

Buffer::Buffer(size_t n, Device d, void* stream)
    : ptr(alloc_output(n, d, stream)), bytes(n), device(d) {}

Buffer::~Buffer() { free_output(ptr, bytes, device); }

int64_t ArrayView::numel() const { return product(shape); }

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
    case DType::kFloat64:
      return "float64";
  }
  return "?";
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

void register_bfloat16(py::object dtype) { bf16_dtype() = std::move(dtype); }

ArrayView view_of(py::handle obj, const char* name, std::optional<int64_t> stream) {
  if (py::isinstance<py::array>(obj))
    return view_numpy(py::reinterpret_borrow<py::array>(obj), name);
  if (py::isinstance<Array>(obj)) {
    const Array& a = obj.cast<const Array&>();
    if (a.buffer->device.kind == DeviceKind::kCUDA) require_stream(stream, name, obj);
    ArrayView v;
    v.data = a.buffer->ptr;
    v.shape = a.shape;
    v.dtype = a.dtype;
    v.device = a.buffer->device;
    v.keep_alive = a.buffer;
    return v;
  }
  if (py::hasattr(obj, "__dlpack__") && py::hasattr(obj, "__dlpack_device__")) {
    refuse_lazy_negation(obj, name);
    ArrayView v = view_dlpack(obj, name, stream, false);
    if (immutable_producer(obj)) v.writable = false;
    return v;
  }
  type_error(std::string(name) +
             " must be a NumPy array or a DLPack producer (torch, JAX, CuPy), got " +
             type_name(obj));
}

ArrayView view_words(py::handle obj, const char* name, std::optional<int64_t> stream) {
  if (py::isinstance<py::array>(obj)) {
    const auto arr = py::reinterpret_borrow<py::array>(obj);
    const py::dtype dt = arr.dtype();
    if (!((dt.kind() == 'u' || dt.kind() == 'i') && dt.itemsize() == 8) ||
        !dt.attr("isnative").cast<bool>()) {
      type_error(std::string(name) +
                 " as an array must hold two 64-bit integers [seed, offset] (uint64 or int64, "
                 "native byte order), got dtype " +
                 std::string(py::str(dt)));
    }
    // The array's own shape, not the `.shape` a subclass may report.
    if (arr.ndim() != 1 || arr.shape(0) != 2) {
      value_error(std::string(name) +
                  " as an array must be the words [seed, offset]: a 1-d array of 2 elements, "
                  "got an array of shape " +
                  shape_str(std::vector<int64_t>(arr.shape(), arr.shape() + arr.ndim())));
    }
    ArrayView v;
    v.is_numpy = true;
    v.dtype = DType::kFloat64;  // the 8-byte stand-in, as words_from_dlpack
    v.data = const_cast<void*>(arr.data());
    v.shape.assign(arr.shape(), arr.shape() + arr.ndim());
    const int flags = py::detail::array_proxy(arr.ptr())->flags;
    v.contiguous = flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
    v.aligned = flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    v.keep_alive = std::shared_ptr<void>(new py::object(arr),
                                         [](void* p) { delete static_cast<py::object*>(p); });
    return v;
  }
  if (py::hasattr(obj, "__dlpack__") && py::hasattr(obj, "__dlpack_device__") &&
      !py::isinstance<Array>(obj)) {
    refuse_lazy_negation(obj, name);
    return view_dlpack(obj, name, stream, true);
  }
  type_error(std::string(name) +
             " as an array must be a NumPy array or a DLPack producer of two 64-bit integers, "
             "got " +
             type_name(obj));
}

py::array new_numpy(const std::vector<int64_t>& shape, DType dtype) {
  auto buffer = std::make_shared<Buffer>(static_cast<size_t>(product(shape)) * dtype_size(dtype),
                                         Device{}, nullptr);
  return numpy_view(buffer, shape, dtype);
}

py::object new_array(const std::vector<int64_t>& shape, DType dtype, Device device, void* stream) {
  Array a;
  a.buffer = std::make_shared<Buffer>(static_cast<size_t>(product(shape)) * dtype_size(dtype),
                                      device, stream);
  a.shape = shape;
  a.dtype = dtype;
  return py::cast(std::move(a));
}

void bind_array(py::module_& m) {
  py::class_<Array>(m, "Array", R"doc(
An array that stochdepth allocated for a DLPack input: pass it to torch.from_dlpack,
cupy.from_dlpack, jax.dlpack.from_dlpack or np.from_dlpack (no copy), or call .numpy()
(CPU only, bfloat16 included).)doc")
      .def_property_readonly("shape",
                             [](const Array& a) {
                               py::tuple t(a.shape.size());
                               for (size_t i = 0; i < a.shape.size(); ++i)
                                 t[i] = py::int_(a.shape[i]);
                               return t;
                             })
      .def_property_readonly("dtype", [](const Array& a) { return dtype_name(a.dtype); })
      .def_property_readonly("device", [](const Array& a) { return a.buffer->device.str(); })
      .def_property_readonly("nbytes", [](const Array& a) { return a.buffer->bytes; })
      .def(
          "__dlpack__",
          [](const Array& a, py::object stream, py::object /*max_version*/, py::object dl_device,
             py::object copy) {
            if (!copy.is_none() && copy.cast<bool>())
              throw py::buffer_error("stochdepth.Array: copy=True is not supported");
            check_export_device(a, dl_device);
            order_consumer(a, stream);
            return to_dlpack(a);
          },
          py::kw_only(), py::arg("stream") = py::none(), py::arg("max_version") = py::none(),
          py::arg("dl_device") = py::none(), py::arg("copy") = py::none())
      .def("__dlpack_device__",
           [](const Array& a) {
             return py::make_tuple(static_cast<int>(a.buffer->device.kind), a.buffer->device.id);
           })
      .def(
          "numpy",
          [](const Array& a) {
            if (a.buffer->device.kind != DeviceKind::kCPU) {
              throw py::value_error("Array.numpy() needs a CPU array, this one is on " +
                                    a.buffer->device.str());
            }
            return numpy_view(a.buffer, a.shape, a.dtype);
          },
          "A NumPy view of this CPU array (no copy).")
      .def(
          "__array__",
          [](const Array& a, py::object dtype, py::object copy) {
            if (a.buffer->device.kind != DeviceKind::kCPU) {
              throw py::value_error("cannot convert a " + a.buffer->device.str() +
                                    " Array to NumPy");
            }
            py::object arr = numpy_view(a.buffer, a.shape, a.dtype);
            if (!dtype.is_none()) arr = arr.attr("astype")(dtype);
            if (!copy.is_none() && copy.cast<bool>()) arr = arr.attr("copy")();
            return arr;
          },
          py::arg("dtype") = py::none(), py::arg("copy") = py::none())
      .def("__repr__", [](const Array& a) {
        return "stochdepth.Array(shape=" + shape_str(a.shape) + ", dtype=" + dtype_name(a.dtype) +
               ", device=" + a.buffer->device.str() + ")";
      });
}

void check_device(const ArrayView& v, const ArrayView& ref, const char* name,
                  const char* ref_name) {
  if (!(v.device == ref.device)) {
    value_error(std::string(name) + " must be on the same device as " + ref_name + " (" +
                ref.device.str() + "), got " + v.device.str());
  }
}

void check_cuda_available(const ArrayView& v, const char* name) {
  if (v.device.kind != DeviceKind::kCUDA) return;
  if (!cuda_compiled()) {
    value_error(std::string(name) + " is a CUDA array (" + v.device.str() +
                "), but stochdepth was built without CUDA: rebuild with nvcc available "
                "(STOCHDEPTH_CUDA=AUTO or ON)");
  }
  if (v.device.id >= cuda_device_count()) {
    value_error(std::string(name) + " is on " + v.device.str() + ", but this process sees " +
                std::to_string(cuda_device_count()) + " CUDA device(s)");
  }
}

}  // namespace stochdepth
