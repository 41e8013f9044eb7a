// Conversion of the bindings' scalar arguments (args.h). Only checks and conversions: no array,
// no call into the core.
#include "bindings/args.h"

#include <limits>

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

int64_t i64_arg(py::handle obj, const char* name, const char* expected) {
  if (is_bool(obj) || !(PyLong_Check(obj.ptr()) || py::hasattr(obj, "__index__"))) {
    type_error(std::string(name) + " must be " + expected + ", got " + type_name(obj));
  }
  py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(obj.ptr()));
  if (!v) throw py::error_already_set();
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0)
    value_error(std::string(name) + " must be " + expected + ", got " + std::string(py::str(v)));
  return x;
}

uint64_t u64_arg(py::handle obj, const char* name) {
  if (is_bool(obj) || !(PyLong_Check(obj.ptr()) || py::hasattr(obj, "__index__"))) {
    type_error(std::string(name) + " must be an integer in [0, 2**64), got " + type_name(obj));
  }
  py::int_ v = py::reinterpret_steal<py::int_>(PyNumber_Index(obj.ptr()));
  if (!v) throw py::error_already_set();
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

uint64_t seed_arg(py::handle obj, bool training) {
  if (obj.is_none()) {
    if (!training) return 0;  // inference draws nothing
    type_error("seed must be an integer in [0, 2**64) when training=True, got None");
  }
  return u64_arg(obj, "seed");
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
  const int64_t axis = i64_arg(obj, "axis", "an integer");
  if (axis == std::numeric_limits<int64_t>::min()) value_error("axis is out of range");
  const int64_t n = static_cast<int64_t>(ndim);
  if (axis < -n || axis >= n) {
    value_error("axis " + std::to_string(axis) + " is out of range for an array of rank " +
                std::to_string(n) + " (expected -" + std::to_string(n) + " <= axis < " +
                std::to_string(n) + ")");
  }
  return axis < 0 ? axis + n : axis;
}

}  // namespace stochdepth
