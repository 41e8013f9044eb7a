"""Loading `stochdepth/_tf_ops.so` into TensorFlow, once, with version checks, and connecting it
to the core that `stochdepth._core` loaded (its entry table, as for the JAX module).

The library is written against TensorFlow's C API for ops and kernels only, so it does not
depend on TensorFlow's C++ ABI; it needs a TensorFlow of the same major version and at least the
minor version it was built with (an older one may lack C entries it calls). Anything else, or a
build without the library, is an ImportError that says what to do.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import tensorflow as tf

from .. import _core

# The oldest TensorFlow the ops are written for (cmake/tf_ops.cmake states the same).
MIN_TF = "2.16.0"
LIBRARY = Path(__file__).resolve().parent.parent / "_tf_ops.so"
_CAPSULE_NAME = b"stochdepth._core.entry"
_REBUILD = ("STOCHDEPTH_TF=ON pip install --force-reinstall --no-deps stochdepth (from source), "
            "or pip install --no-build-isolation . with TensorFlow installed (docs/install.md, "
            "\"TensorFlow: the custom ops\")")


def _version_tuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def check_tensorflow(running, built=None):
    """Raises ImportError when TensorFlow `running` cannot run the ops: older than MIN_TF, or,
    given the version `built` the library was compiled against, another major version or an
    older minor one."""
    if _version_tuple(running) < _version_tuple(MIN_TF):
        raise ImportError(
            f"stochdepth.tensorflow needs TensorFlow >= {MIN_TF}; the running TensorFlow is "
            f"{running}: pip install -U 'tensorflow>={MIN_TF}'"
        )
    if built is None:
        return
    r, b = _version_tuple(running)[:2], _version_tuple(built)[:2]
    if r[0] != b[0] or r < b:
        raise ImportError(
            f"stochdepth's TensorFlow ops were built against TensorFlow {built}, which the "
            f"running TensorFlow {running} does not match (it must be {b[0]}.x with x >= "
            f"{b[1]}): install TensorFlow {built}, or rebuild stochdepth against this one: "
            f"{_REBUILD}"
        )


def _core_entry_pointer():
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return get(_core._core_entry, _CAPSULE_NAME)


def load():
    """Loads and connects the library; returns (the op module, the TensorFlow version it was
    built against)."""
    check_tensorflow(tf.__version__)
    if not LIBRARY.exists():
        raise ImportError(
            "this stochdepth build has no TensorFlow ops (stochdepth/_tf_ops.so): it was built "
            "where TensorFlow was not in the build environment, or with STOCHDEPTH_TF=OFF. "
            f"Rebuild: {_REBUILD}."
        )
    try:
        module = tf.load_op_library(str(LIBRARY))
    except (tf.errors.NotFoundError, OSError) as e:
        raise ImportError(
            f"TensorFlow {tf.__version__} could not load stochdepth's TensorFlow ops "
            f"({LIBRARY}): they were built against another TensorFlow. Rebuild: {_REBUILD}. "
            f"({e})"
        ) from e
    # The same file: dlopen hands back the handle TensorFlow opened (no second copy).
    lib = ctypes.CDLL(str(LIBRARY))
    lib.stochdepth_tf_build_version.restype = ctypes.c_char_p
    built = lib.stochdepth_tf_build_version().decode()
    check_tensorflow(tf.__version__, built)
    lib.stochdepth_tf_connect.argtypes = [ctypes.c_void_p]
    lib.stochdepth_tf_connect.restype = ctypes.c_int
    if lib.stochdepth_tf_connect(_core_entry_pointer()) != 0:
        raise ImportError(
            "stochdepth/_tf_ops.so and stochdepth._core come from different builds: reinstall "
            "stochdepth"
        )
    return module, built


MODULE, BUILT_AGAINST = load()
