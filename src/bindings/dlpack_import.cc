// DLPack import for the bindings: a producer's __dlpack_device__ and __dlpack__ (device, stream and
// the versioned or legacy capsule) and the exported tensor's checks (dtype, device, shape, layout,
// the [seed, offset] words), into an ArrayView that owns the tensor. Also the producers whose
// DLPack export alone would mislead (immutable JAX and TensorFlow arrays, torch's lazy negation).
// The array object and NumPy are in array_view.cc.
#include "bindings/dlpack_import.h"

#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "bindings/args.h"
#include "bindings/dlpack.h"

namespace stochdepth {
namespace {

using namespace dlpack;

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

}  // namespace

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

}  // namespace stochdepth
