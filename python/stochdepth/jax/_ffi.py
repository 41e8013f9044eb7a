"""Registering the XLA FFI targets of `stochdepth._jax_ffi` with JAX, once, with version checks.

The module is compiled against the XLA FFI headers of the jaxlib found at build time; it needs a
running jaxlib of at least MIN_JAXLIB. An older jaxlib, or a build without the module, is an
ImportError that says what to do; XLA's own refusal of the handlers is re-raised with both
versions named.
"""

from __future__ import annotations

import re

import jax
import jaxlib

from .. import _core

# The oldest jaxlib the handlers are written for (cmake/jax_ffi.cmake states the same).
MIN_JAXLIB = "0.5.0"
TARGETS = ("stochdepth_forward", "stochdepth_backward")


def _version_tuple(text):
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def _jaxlib_version():
    version = getattr(jaxlib, "__version__", None)
    if version is None:
        from jaxlib import version as _v

        version = _v.__version__
    return version


def check_jaxlib(version=None):
    """Raises ImportError when `version` (default: the running jaxlib's) is below MIN_JAXLIB."""
    version = _jaxlib_version() if version is None else version
    if _version_tuple(version) < _version_tuple(MIN_JAXLIB):
        raise ImportError(
            f"stochdepth.jax needs jaxlib >= {MIN_JAXLIB} (the XLA FFI API its handlers use); "
            f"the running jaxlib is {version}: pip install -U 'jax>={MIN_JAXLIB}' "
            f"'jaxlib>={MIN_JAXLIB}'"
        )


def _load_module():
    try:
        from .. import _jax_ffi
    except ImportError as e:
        raise ImportError(
            "this stochdepth build has no JAX FFI module (stochdepth._jax_ffi): it was built "
            "where no jaxlib with the XLA FFI headers was importable, or with STOCHDEPTH_JAX=OFF. "
            f"Rebuild with jaxlib >= {MIN_JAXLIB} installed in the build environment (see "
            "README, JAX)."
        ) from e
    return _jax_ffi


def register():
    """Connects the module to the core and registers its CPU targets; returns the module."""
    check_jaxlib()
    module = _load_module()
    module.connect(_core._core_entry)
    for name, capsule in module.handlers().items():
        try:
            jax.ffi.register_ffi_target(name, capsule, platform="cpu", api_version=1)
        except Exception as e:  # XLA names the API version it refuses
            major, minor = module.ffi_api_version
            raise RuntimeError(
                f"XLA refused stochdepth's FFI target {name!r}: the module was built against "
                f"jaxlib {module.jaxlib_build_version} (XLA FFI API {major}.{minor}); the "
                f"running jaxlib is {_jaxlib_version()}. Rebuild stochdepth against this jaxlib. "
                f"({e})"
            ) from e
    return module


MODULE = register()
