// Scalar arguments of the bindings: Python objects checked and converted once, at the edge,
// into C++ values and the core's enums; a wrong type is a TypeError, a wrong value a ValueError,
// each naming the argument (docs/design.md, "Errors"). Arrays are in array_view.h.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "stochdepth/drop_path.h"

namespace stochdepth {
namespace py = pybind11;

[[noreturn]] void type_error(const std::string& msg);
[[noreturn]] void value_error(const std::string& msg);
std::string type_name(py::handle obj);  // the Python type's __name__, for messages

double survival_prob_arg(py::handle obj);  // a real number in [0, 1], not NaN, not a bool
// An integer (or __index__) argument as int64; out of range is a ValueError naming it.
int64_t i64_arg(py::handle obj, const char* name, const char* expected);
// An array or another non-integer (even one whose __index__ raises) is a TypeError naming it.
uint64_t u64_arg(py::handle obj, const char* name);  // an integer in [0, 2**64)
// Like u64_arg; None only when not training. `when` ends the message for None ("when
// training=True"; `mask` says its own).
uint64_t seed_arg(py::handle obj, bool training, const char* when = "when training=True");
// A thread count in [1, max]: bools and non-integers are a TypeError, the rest a ValueError.
int64_t num_threads_arg(py::handle obj, int64_t max);
bool bool_arg(py::handle obj, const char* name);  // a bool (or the integers 0 and 1)
// One of two strings; returns true for `b`.
bool choice_arg(py::handle obj, const char* name, const char* a, const char* b);
Scaling scaling_arg(py::handle obj);                // "inference" or "training"
std::optional<int64_t> stream_arg(py::handle obj);  // None or an integer cudaStream_t handle
int64_t axis_arg(py::handle obj, size_t ndim);      // in [-ndim, ndim), normalised to >= 0

}  // namespace stochdepth
