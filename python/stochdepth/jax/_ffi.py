"""Registering the XLA FFI targets of `stochdepth._jax_ffi` with JAX, once, with version checks.

The module is compiled against the XLA FFI headers of the jaxlib found at build time; it needs a
running jaxlib of at least MIN_JAXLIB. An older jaxlib, or a build without the module, is an
ImportError that says what to do; XLA's own refusal of the handlers is re-raised with both
versions named.

Platforms: "cpu" always; "CUDA" when the build has CUDA (the module's `platforms`). A CUDA
target is registered even where jax has no GPU backend: jaxlib keeps it for a CUDA plugin that
starts later. The CUDA handlers are command-buffer compatible (docs/design.md, "CUDA").
"""

from __future__ import annotations

import re

import jax
import jaxlib
from jaxlib import xla_client

from .. import _core

# The oldest jaxlib the handlers are written for (cmake/jax_ffi.cmake states the same).
MIN_JAXLIB = "0.5.0"
TARGETS = ("stochdepth_residual", "stochdepth_scale", "stochdepth_residual_gamma",
           "stochdepth_scale_gamma", "stochdepth_backward_gamma")


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
            "docs/install.md, \"JAX: the XLA FFI module\")."
        ) from e
    return _jax_ffi


# platform -> the target names registered for it, filled by register().
REGISTERED: dict[str, tuple[str, ...]] = {}


def _traits(platform):
    """The registration's traits: the CUDA handlers may be captured into a command buffer."""
    traits = getattr(xla_client, "CustomCallTargetTraits", None)
    if platform != "CUDA" or traits is None:
        return {}
    return {"traits": traits.COMMAND_BUFFER_COMPATIBLE}


def register():
    """Connects the module to the core and registers its targets on every platform it has
    (the CPU, and CUDA in a CUDA build); returns the module."""
    check_jaxlib()
    module = _load_module()
    module.connect(_core._core_entry)
    for platform in module.platforms:
        for name, capsule in module.handlers(platform).items():
            _register(module, name, capsule, platform)
        REGISTERED[platform] = tuple(sorted(module.handlers(platform)))
    return module


def _register(module, name, capsule, platform):
    try:
        jax.ffi.register_ffi_target(name, capsule, platform=platform, api_version=1,
                                    **_traits(platform))
    except Exception as e:  # XLA names the API version it refuses
        major, minor = module.ffi_api_version
        raise RuntimeError(
            f"XLA refused stochdepth's FFI target {name!r} ({platform}): the module was built "
            f"against jaxlib {module.jaxlib_build_version} (XLA FFI API {major}.{minor}); the "
            f"running jaxlib is {_jaxlib_version()}. Rebuild stochdepth against this jaxlib. "
            f"({e})"
        ) from e


MODULE = register()
