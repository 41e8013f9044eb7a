// Conversion of the bindings' scalar arguments (args.h). Only checks and conversions: no array,
// no call into the core.
#include "bindings/args.h"

namespace stochdepth {
namespace {

bool is_bool(py::handle obj) {
  return PyBool_Check(obj.ptr()) || type_name(obj) == "bool_" || type_name(obj) == "bool";
}

}  // namespace

void type_error(const std::string& msg) { throw py::type_error(msg); }
void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string type_name(py::handle obj) { return py::str(py::type::of(obj).attr("__name__")); }

double survival_prob_arg(py::handle obj) {
  if (is_bool(obj) ||
      !(PyFloat_Check(obj.ptr()) || PyLong_Check(obj.ptr()) || py::hasattr(obj, "__float__")) ||
      PyComplex_Check(obj.ptr()) || py::isinstance<py::str>(obj)) {
    type_error("survival_prob must be a real number in [0, 1], got " + type_name(obj));
  }
  const double p = PyFloat_AsDouble(obj.ptr());
  if (PyErr_Occurred()) {  // e.g. an integer too large for a double
    PyErr_Clear();
    value_error("survival_prob must be in [0, 1], got " + std::string(py::repr(obj)));
  }
  if (!(p >= 0.0 && p <= 1.0)) {  // also rejects NaN
    value_error("survival_prob must be in [0, 1], got " + std::string(py::repr(obj)));
  }
  return p;
}

namespace {

// What `obj` is, for a message: its type, and its shape when it is an array.
std::string describe(py::handle obj) {
  std::string s = type_name(obj);
  if (py::hasattr(obj, "shape") && py::hasattr(obj, "dtype")) {
    try {
      s += " of shape " + std::string(py::str(obj.attr("shape")));
    } catch (py::error_already_set&) {  // a shape that cannot be printed: the type says enough
    }
  }
  return s;
}

// `obj` as a Python int: an int or an object with __index__ (NumPy integer scalars), not a bool.
// Anything else, including arrays (whose __index__ refuses), is a TypeError naming `name`.
py::int_ index_arg(py::handle obj, const char* name, const std::string& expected) {
  const auto refuse = [&] {
    type_error(std::string(name) + " must be " + expected + ", got " + describe(obj));
  };
  if (is_bool(obj) || !(PyLong_Check(obj.ptr()) || py::hasattr(obj, "__index__"))) refuse();
  PyObject* v = PyNumber_Index(obj.ptr());
  if (!v) {
    PyErr_Clear();
    refuse();
  }
  return py::reinterpret_steal<py::int_>(v);
}

}  // namespace

int64_t i64_arg(py::handle obj, const char* name, const char* expected) {
  const py::int_ v = index_arg(obj, name, expected);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0)
    value_error(std::string(name) + " must be " + expected + ", got " + std::string(py::str(v)));
  return x;
}

uint64_t u64_arg(py::handle obj, const char* name) {
  const py::int_ v = index_arg(obj, name, "an integer in [0, 2**64)");
  int overflow = 0;
  const long long as_ll = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow < 0 || (overflow == 0 && as_ll < 0)) {
    value_error(std::string(name) + " must be in [0, 2**64), got " + std::string(py::str(v)));
  }
  const unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    value_error(std::string(name) + " must be in [0, 2**64), got " + std::string(py::str(v)));
  }
  return u;
}

uint64_t seed_arg(py::handle obj, bool training, const char* when) {
  if (obj.is_none()) {
    if (!training) return 0;  // inference draws nothing
    type_error(std::string("seed must be an integer in [0, 2**64) ") + when + ", got None");
  }
  return u64_arg(obj, "seed");
}

int64_t num_threads_arg(py::handle obj, int64_t max) {
  const std::string range = "an integer in [1, " + std::to_string(max) + "]";
  const py::int_ v = index_arg(obj, "num_threads", range);
  int overflow = 0;
  const long long n = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || n < 1 || n > max)
    value_error("num_threads must be " + range + ", got " + std::string(py::str(v)));
  return n;
}

bool bool_arg(py::handle obj, const char* name) {
  if (is_bool(obj)) return PyObject_IsTrue(obj.ptr());
  if (PyLong_Check(obj.ptr())) {
    const long v = PyLong_AsLong(obj.ptr());
    if (v == 0 || v == 1) return v;
  }
  type_error(std::string(name) + " must be a bool, got " + std::string(py::repr(obj)));
}

bool choice_arg(py::handle obj, const char* name, const char* a, const char* b) {
  if (!py::isinstance<py::str>(obj)) {
    type_error(std::string(name) + " must be '" + a + "' or '" + b + "', got " + type_name(obj));
  }
  const std::string s = obj.cast<std::string>();
  if (s != a && s != b) {
    value_error(std::string(name) + " must be '" + a + "' or '" + b + "', got '" + s + "'");
  }
  return s == b;
}

Scaling scaling_arg(py::handle obj) {
  return choice_arg(obj, "scaling", "inference", "training") ? Scaling::kTraining
                                                             : Scaling::kInference;
}

std::optional<int64_t> stream_arg(py::handle obj) {
  if (obj.is_none()) return std::nullopt;
  return i64_arg(obj, "stream", "None or an integer cudaStream_t handle");
}

int64_t axis_arg(py::handle obj, size_t ndim) {
  const py::int_ v = index_arg(obj, "axis", "an integer");
  const int64_t n = static_cast<int64_t>(ndim);
  int overflow = 0;
  const long long axis = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || axis < -n || axis >= n) {  // values past int64 are out of range too
    value_error("axis " + std::string(py::str(v)) + " is out of range for an array of rank " +
                std::to_string(n) + " (expected -" + std::to_string(n) + " <= axis < " +
                std::to_string(n) + ")");
  }
  return axis < 0 ? axis + n : axis;
}

}  // namespace stochdepth
