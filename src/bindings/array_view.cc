// NumPy / DLPack <-> ArrayView translation and the stochdepth.Array output type. Translation
// only: the checks of what an op accepts are in module.cc, and memory comes from the core.
#include "array_view.h"

#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "bindings/args.h"
#include "bindings/dlpack.h"

namespace stochdepth {
namespace {

using namespace dlpack;

py::object& bf16_dtype() {
  static py::object* d = new py::object();  // leaked on purpose: outlives interpreter teardown
  return *d;
}

bool c_contiguous(const std::vector<int64_t>& shape, const int64_t* strides_elems) {
  if (!strides_elems) return true;
  int64_t expected = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    if (shape[i] == 0) return true;  // empty: nothing to lay out
    if (shape[i] != 1 && strides_elems[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
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

DType dtype_from_dlpack(DLDataType t, const char* name) {
  if (t.lanes == 1) {
    if (t.code == kDLFloat && t.bits == 16) return DType::kFloat16;
    if (t.code == kDLFloat && t.bits == 32) return DType::kFloat32;
    if (t.code == kDLFloat && t.bits == 64) return DType::kFloat64;
    if (t.code == kDLBfloat && t.bits == 16) return DType::kBFloat16;
  }
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  const std::string kind = t.code < 7 ? codes[t.code] : "code " + std::to_string(t.code);
  type_error(std::string(name) +
             " must have a floating dtype (float16, bfloat16, float32 or "
             "float64), got DLPack " +
             kind + std::to_string(t.bits) + (t.lanes != 1 ? "x" + std::to_string(t.lanes) : ""));
}

Device device_from_dlpack(DLDevice d, const char* name) {
  if (d.device_type == kDLCPU || d.device_type == kDLCUDAHost) return {DeviceKind::kCPU, 0};
  if (d.device_type == kDLCUDA || d.device_type == kDLCUDAManaged) {
    if (d.device_id < 0) {
      value_error(std::string(name) + " must be on a CUDA device with an id >= 0, got id " +
                  std::to_string(d.device_id));
    }
    return {DeviceKind::kCUDA, d.device_id};
  }
  value_error(std::string(name) + " must be on the CPU or a CUDA device, got DLPack device type " +
              std::to_string(d.device_type));
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

// The producer's shape, checked: a sane rank, a shape array, no negative dimension, an element
// and byte count that fit in int64, and data behind any non-empty shape. A producer is not
// trusted with any of these: a lie would be a crash or a silently empty result.
void checked_shape(const DLTensor& t, DType dtype, const char* name, std::vector<int64_t>& shape) {
  constexpr int32_t kMaxRank = 64;  // NumPy's own bound
  if (t.ndim < 0 || t.ndim > kMaxRank) {
    value_error(std::string(name) + " must have a rank in [0, " + std::to_string(kMaxRank) +
                "], got a DLPack tensor of rank " + std::to_string(t.ndim));
  }
  if (t.ndim > 0 && !t.shape) {
    value_error(std::string(name) + " is a DLPack tensor of rank " + std::to_string(t.ndim) +
                " with no shape (a NULL shape pointer)");
  }
  shape.assign(t.shape, t.shape + t.ndim);
  int64_t bytes = static_cast<int64_t>(dtype_size(dtype));
  for (int64_t d : shape) {
    if (d < 0) {
      value_error(std::string(name) + " must have dimensions >= 0, got shape " + shape_str(shape));
    }
  }
  bool empty = false;
  for (int64_t d : shape) empty = empty || d == 0;
  if (!empty) {
    for (int64_t d : shape) {
      if (__builtin_mul_overflow(bytes, d, &bytes)) {
        value_error(std::string(name) + " has shape " + shape_str(shape) + " of " +
                    dtype_name(dtype) + ", more than 2**63 bytes: a malformed DLPack tensor");
      }
    }
    if (!t.data) {
      value_error(std::string(name) + " has shape " + shape_str(shape) +
                  " but a NULL data pointer: a malformed DLPack tensor");
    }
  }
}

// The 8-byte integer words of a [seed, offset] array (int64 read as two's complement, or uint64),
// recorded with float64, the DType of the same item size.
DType words_from_dlpack(DLDataType t, const char* name) {
  if (t.lanes == 1 && t.bits == 64 && (t.code == kDLInt || t.code == kDLUInt)) {
    return DType::kFloat64;
  }
  type_error(std::string(name) +
             " as an array must hold two 64-bit integers [seed, offset] (uint64 or int64), got "
             "DLPack code " +
             std::to_string(t.code) + " of " + std::to_string(t.bits) + " bits" +
             (t.lanes != 1 ? " in " + std::to_string(t.lanes) + " lanes" : ""));
}

// The words of seed= [seed, offset], decided from the exported tensor alone, never from what
// the producer's `.shape` said: exactly two 64-bit words, one after the other, at an aligned
// address. Checked before anything reads them (the kernel does, later): a tensor of fewer words
// would have the second one read from outside its buffer.
void check_words_tensor(const DLTensor& t, const std::vector<int64_t>& shape, const char* name) {
  if (shape.size() != 1 || shape[0] != 2) {
    value_error(std::string(name) +
                " as an array must be the words [seed, offset]: a 1-d array of 2 elements, got "
                "a DLPack tensor of shape " +
                shape_str(shape));
  }
  if (t.strides && t.strides[0] != 1) {
    value_error(std::string(name) +
                " must be C-contiguous (np.ascontiguousarray(x) or x.contiguous() make a "
                "contiguous copy), got a DLPack tensor of shape (2,) with a stride of " +
                std::to_string(t.strides[0]) + " elements");
  }
  if (reinterpret_cast<uintptr_t>(static_cast<char*>(t.data) + t.byte_offset) % 8 != 0) {
    value_error(std::string(name) +
                " must be aligned to its 8-byte items, got an unaligned buffer");
  }
}

template <class Managed>
ArrayView view_managed(Managed* m, const char* name, bool read_only, bool words) {
  ArrayView v;
  // Ours from here (the capsule is renamed): the view owns it before anything can throw, so a
  // refused tensor is released too, exactly once. shared_ptr calls the deleter if it throws.
  v.keep_alive = std::shared_ptr<void>(m, [](void* p) {
    auto* mt = static_cast<Managed*>(p);
    if (mt->deleter) mt->deleter(mt);
  });
  const DLTensor& t = m->dl_tensor;
  v.dtype = words ? words_from_dlpack(t.dtype, name) : dtype_from_dlpack(t.dtype, name);
  v.device = device_from_dlpack(t.device, name);
  checked_shape(t, v.dtype, name, v.shape);
  if (words) check_words_tensor(t, v.shape, name);
  v.data = t.data ? static_cast<char*>(t.data) + t.byte_offset : nullptr;
  v.contiguous = c_contiguous(v.shape, t.strides);
  v.aligned = reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype) == 0;
  v.writable = !read_only;
  return v;
}

ArrayView view_capsule(py::object cap, const char* name, bool words) {
  PyObject* c = cap.ptr();
  if (PyCapsule_IsValid(c, "dltensor_versioned")) {
    auto* m = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, "dltensor_versioned"));
    if (m->version.major != 1) {
      type_error(std::string(name) + ": unsupported DLPack major version " +
                 std::to_string(m->version.major) + " (expected 1)");
    }
    PyCapsule_SetName(c, "used_dltensor_versioned");  // consumed: ours to delete now
    return view_managed(m, name, m->flags & kFlagReadOnly, words);
  }
  if (PyCapsule_IsValid(c, "dltensor")) {
    auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
    PyCapsule_SetName(c, "used_dltensor");
    return view_managed(m, name, false, words);
  }
  type_error(std::string(name) + ".__dlpack__() did not return a DLPack capsule");
}

// A producer's own failure to export (a torch tensor that requires grad, a sparse or a meta
// tensor) becomes a TypeError naming the argument, chained to the producer's error.
[[noreturn]] void export_failed(py::error_already_set& e, const char* name, const char* method) {
  if (!e.matches(PyExc_Exception) || e.matches(PyExc_MemoryError)) throw;
  const std::string why =
      std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value()));
  py::raise_from(e, PyExc_TypeError,
                 (std::string(name) + " must be an array that DLPack can export, but " + name +
                  "." + method + "() raised " + why)
                     .c_str());
  throw py::error_already_set();
}

// The producer's __dlpack_device__(): (device type, device id), checked to be a pair of integers.
std::pair<int32_t, int32_t> dlpack_device(py::handle obj, const char* name) {
  py::object dev;
  try {
    dev = obj.attr("__dlpack_device__")();
  } catch (py::error_already_set& e) {
    export_failed(e, name, "__dlpack_device__");
  }
  const auto malformed = [&] {
    type_error(std::string(name) +
               ".__dlpack_device__() must return a (device_type, device_id) pair of integers, "
               "got " +
               std::string(py::repr(dev)));
  };
  if (!py::isinstance<py::tuple>(dev) || py::len(dev) != 2) malformed();
  const py::tuple t = py::reinterpret_borrow<py::tuple>(dev);
  for (py::handle x : t) {
    if (PyBool_Check(x.ptr()) || !py::hasattr(x, "__index__")) malformed();
  }
  try {
    return {t[0].cast<int32_t>(), t[1].cast<int32_t>()};
  } catch (py::cast_error&) {
    malformed();
  }
}

// DLPack's `stream` for a CUDA producer (the stream we launch on): 1, CUDA's legacy default
// stream, for 0. 0 is how torch.cuda reports the legacy default stream, and DLPack reserves it:
// torch rejects __dlpack__(stream=0).
int64_t dlpack_consumer_stream(int64_t stream) { return stream == 0 ? 1 : stream; }

// A CUDA array needs the stream the call runs on, before anything is queued: the legacy default
// stream, taken silently, would break a CUDA graph capture in progress on another stream (it
// waits for every blocking stream). stochdepth.forward/backward pass the current stream of torch
// and CuPy arrays themselves (docs/design.md, "CUDA").
void require_stream(std::optional<int64_t> stream, const char* name, py::handle obj) {
  if (stream) return;
  value_error(std::string(name) + " is a CUDA array (" + type_name(obj) +
              ") and no stream= was given: pass stream=, the integer cudaStream_t the call "
              "runs on (for example torch.cuda.current_stream().cuda_stream, "
              "cupy.cuda.get_current_stream().ptr, or 0 for the legacy default stream)");
}

// The producer's device is current while it exports: torch exports only tensors on the current
// device (and orders its work on that device's stream). Restores the previous device.
class ProducerDevice {
 public:
  explicit ProducerDevice(int device) : previous_(cuda_swap_device(device)) {}
  ~ProducerDevice() {
    if (previous_ >= 0) cuda_swap_device(previous_);
  }
  ProducerDevice(const ProducerDevice&) = delete;
  ProducerDevice& operator=(const ProducerDevice&) = delete;

 private:
  int previous_;
};

ArrayView view_dlpack(py::handle obj, const char* name, std::optional<int64_t> stream, bool words) {
  const auto [dev_type, dev_id] = dlpack_device(obj, name);
  const bool cuda = dev_type == kDLCUDA || dev_type == kDLCUDAManaged;
  py::object stream_arg = py::none();
  if (cuda) {
    require_stream(stream, name, obj);
    stream_arg = py::int_(dlpack_consumer_stream(*stream));
  }
  std::optional<ProducerDevice> on_device;
  if (cuda) on_device.emplace(dev_id);
  py::object cap;
  try {
    try {
      cap = obj.attr("__dlpack__")(py::arg("stream") = stream_arg,
                                   py::arg("max_version") = py::make_tuple(1, 0));
    } catch (py::error_already_set& e) {
      if (!e.matches(PyExc_TypeError)) throw;  // an older producer without max_version
      cap = obj.attr("__dlpack__")(py::arg("stream") = stream_arg);
    }
  } catch (py::error_already_set& e) {
    export_failed(e, name, "__dlpack__");
  }
  return view_capsule(cap, name, words);
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

// JAX and TensorFlow arrays are immutable, yet export writable DLPack tensors without the
// read-only flag: writing through one (as `out`) would change a value its framework assumes
// constant. Recognised by the module of their type or one of its bases.
bool immutable_producer(py::handle obj) {
  for (py::handle base : py::type::of(obj).attr("__mro__")) {
    const std::string mod = py::str(base.attr("__module__"));
    for (const char* root : {"jax", "jaxlib", "tensorflow"}) {
      const size_t n = std::strlen(root);
      if (mod.compare(0, n, root) == 0 && (mod.size() == n || mod[n] == '.')) return true;
    }
  }
  return false;
}

// torch exports a lazy negation view (`x._neg_view()`, `-x` of a conjugate view) through DLPack
// as its memory, without the negation: read so, it would be a silently wrong result.
void refuse_lazy_negation(py::handle obj, const char* name) {
  if (!py::hasattr(obj, "is_neg")) return;
  bool neg = false;
  try {
    neg = obj.attr("is_neg")().cast<bool>();
  } catch (py::error_already_set&) {  // not torch's is_neg(): nothing to resolve
  } catch (py::cast_error&) {
  }
  if (neg) {
    type_error(std::string(name) +
               " is a lazy negation view (its memory holds the values without the sign): "
               "pass x.resolve_neg(), or use stochdepth.torch, which resolves it");
  }
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

}  // namespace stochdepth
