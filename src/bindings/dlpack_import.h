// DLPack import (dlpack_import.cc): what view_of and view_words (array_view.h) call for a DLPack
// producer. Errors are TypeError / ValueError naming the argument `name`.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>

#include "bindings/array_view.h"

namespace stochdepth {

// The tensor `obj` exports (__dlpack_device__, then __dlpack__ with the stream for a CUDA
// producer, its device current), checked and owned by the view. `words`: the [seed, offset]
// words of seed= (two 64-bit integers) rather than a floating array.
ArrayView view_dlpack(py::handle obj, const char* name, std::optional<int64_t> stream, bool words);

// A CUDA array given without the stream the call runs on: a ValueError saying how to pass it.
void require_stream(std::optional<int64_t> stream, const char* name, py::handle obj);

// A JAX or TensorFlow array: immutable, though its DLPack tensor is not flagged read-only.
bool immutable_producer(py::handle obj);

// A torch lazy negation view (its DLPack memory lacks the sign): a TypeError.
void refuse_lazy_negation(py::handle obj, const char* name);

}  // namespace stochdepth
