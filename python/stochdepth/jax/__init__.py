"""stochdepth for JAX: the library's kernels as XLA FFI custom calls, under jit, grad and vmap.

    out = stochastic_depth(shortcut, residual, 0.8, seed=seed, offset=step)

runs the compiled CPU kernels inside the XLA program (no host round trip) and gives, bit for
bit, `stochdepth.forward` / `stochdepth.reference` for the same arguments, jitted or not. The
gradient (`jax.custom_vjp`) calls the backward kernel, which recomputes the mask from
(seed, offset): no mask is saved (docs/design.md, "Semantics", "Arithmetic").

Randomness (docs/design.md, "Randomness in the adapters"): `seed` and `offset` are operands,
not constants, so under `jax.jit` a traced seed or offset (a step counter, say) draws a new mask
without recompiling. Accepted:

- Python or NumPy integers in [0, 2**64);
- JAX integer scalars (traced or not): 32-bit values are read as their 32-bit pattern (an int32
  -1 is 2**32 - 1), 64-bit ones (x64 enabled) as their 64-bit pattern;
- for `seed` only, a JAX PRNG key (a typed key from `jax.random.key`, or a raw uint32[2] key
  from `jax.random.PRNGKey`) with 2 words k = key_data(key): seed = k[0] * 2**32 + k[1], and
  `offset` as given. So `jax.random.PRNGKey(s)` (s < 2**32, key data [0, s]) draws the mask of
  seed s, and `stochdepth.mask(batch, p, seed=int(k[0]) << 32 | int(k[1]), offset=offset)`
  reproduces the mask of any key.

`survival_prob`, `training`, `mode`, `axis` and `scaling` are static (Python values): a new
value compiles anew. vmap is supported and runs the op once per element (sequentially), so
each element may carry its own key.

Platforms: the CPU, and CUDA GPUs when stochdepth was built with CUDA (a JAX GPU backend, e.g.
jax[cuda12], runs the library's CUDA kernels on XLA's stream). On the GPU the key operand stays
on the device: the kernels read (seed, offset) from it when they run, so the call may be
captured into XLA's command buffers (CUDA graphs) and replayed with new keys (docs/design.md,
"CUDA").
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from . import _ops
from ._ffi import MIN_JAXLIB

__all__ = ["stochastic_depth", "drop_path", "key_words", "MIN_JAXLIB"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")
_LO32 = 0xFFFFFFFF


def _check_prob(p):
    if isinstance(p, np.generic):
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(
            "survival_prob must be a Python real number in [0, 1] (a static value; a traced "
            f"value is not supported), got {type(p).__name__}"
        )
    if not 0 <= p <= 1:  # also rejects NaN
        raise ValueError(f"survival_prob must be in [0, 1], got {p}")
    return float(p)


def _as_array(value, expected):
    """jnp.asarray(value), its failure a TypeError that says what was expected."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{expected}, got {type(value).__name__} that JAX cannot read as an "
                        f"array ({e})") from e


def _words32(name, value):
    """(lo, hi) uint32 words of an integer seed or offset: host ints or JAX integer scalars."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if not 0 <= value < 2**64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
        return jnp.uint32(value & _LO32), jnp.uint32(value >> 32)
    # Anything else must be an array (a JAX or NumPy scalar, traced or not): checked here, so
    # that a string or a float is this argument's error, not jnp.asarray's.
    if not hasattr(value, "dtype"):
        raise TypeError(
            f"{name} must be an integer or an integer scalar array, got {type(value).__name__}")
    value = _as_array(value, f"{name} must be an integer or an integer scalar array")
    if value.ndim != 0 or not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer or an integer scalar array, got {value.dtype}"
            f"{list(value.shape)}"
        )
    if value.dtype.itemsize == 8:
        u = value.astype(jnp.uint64)  # the two's complement pattern
        return (u & _LO32).astype(jnp.uint32), (u >> 32).astype(jnp.uint32)
    return value.astype(jnp.uint32), jnp.uint32(0)


def _is_key(seed):
    """Whether `seed` is taken as a PRNG key: a typed key, or what says it is uint32 of shape
    (2,). That only picks the path: key_words checks the array itself."""
    dtype = getattr(seed, "dtype", None)
    if dtype is None:
        return False
    try:
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return True
        return dtype == jnp.uint32 and tuple(getattr(seed, "shape", ())) == (2,)
    except (TypeError, ValueError):  # a dtype or shape that is not one: the integer path
        return False


def key_words(seed, offset=0):
    """The uint32[4] operand [seed_lo, seed_hi, offset_lo, offset_hi] for (seed, offset).

    `seed` may be a JAX PRNG key (see the module docstring for the mapping).
    """
    if seed is None:
        raise ValueError("seed is required when training=True (the mask is drawn)")
    if _is_key(seed):
        if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            data = jax.random.key_data(seed)
        else:  # a raw key: the array itself, not what its `.shape` says (JAX clamps data[1])
            data = _as_array(seed, "seed must be an integer or a JAX PRNG key")
        if tuple(data.shape) != (2,) or data.dtype != jnp.uint32:
            raise ValueError(
                f"a PRNG key used as seed must be a single key with 2 uint32 words (threefry), "
                f"got key data of shape {tuple(data.shape)} and dtype {data.dtype}"
            )
        s_lo, s_hi = data[1], data[0]
    else:
        s_lo, s_hi = _words32("seed", seed)
    o_lo, o_hi = _words32("offset", offset)
    return jnp.stack([jnp.asarray(w, jnp.uint32) for w in (s_lo, s_hi, o_lo, o_hi)])


def _check_arrays(arrays, axis):
    first = arrays[0]
    dtype = jnp.dtype(first.dtype)
    if dtype.name not in _DTYPES:
        raise TypeError(f"inputs must be float16, bfloat16, float32 or float64, got {dtype.name}")
    for other in arrays[1:]:
        if jnp.dtype(other.dtype) != dtype:
            raise TypeError(
                f"shortcut and residual must have the same dtype, got {dtype.name} and "
                f"{jnp.dtype(other.dtype).name}"
            )
        if tuple(other.shape) != tuple(first.shape):
            raise ValueError(
                f"shortcut and residual must have the same shape, got {tuple(first.shape)} and "
                f"{tuple(other.shape)}"
            )
    rank = first.ndim
    if rank < 1:
        raise ValueError("inputs must have rank >= 1 (a sample axis)")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for inputs of rank {rank}")
    return int(axis) % rank


def _config(survival_prob, training, mode, axis, scaling):
    p = _check_prob(survival_prob)
    if mode not in ("row", "batch"):
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    if scaling not in ("inference", "training"):
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
    return (p, axis, int(bool(training)), int(mode == "batch"), int(scaling == "training"))


def _key(seed, offset, training):
    if training:
        return key_words(seed, offset)
    return jnp.zeros((4,), jnp.uint32)  # not read at inference


def stochastic_depth(shortcut, residual, survival_prob, *, seed=None, offset=0, training=True,
                     mode="row", axis=0, scaling="inference"):
    """``shortcut + keep * s * residual`` (training) or ``shortcut + c * residual`` (inference).

    Args:
        shortcut, residual: JAX arrays of the same shape and dtype (float16, bfloat16, float32,
            float64), rank >= 1.
        survival_prob: p in [0, 1], a Python number (static).
        seed, offset: the mask's Philox key and counter offset (docs/design.md, "The mask
            stream"): integers, JAX integer scalars (traced is fine) or, for seed, a PRNG key;
            see the module docstring. seed is needed only when training.
        training: True draws the mask; False is the inference form.
        mode: "row" (one draw per sample) or "batch" (one draw for the batch).
        axis: the sample axis.
        scaling: "inference" (s = 1, c = p) or "training" (s = 1/p, c = 1).

    The mask equals `stochdepth.mask(batch, p, seed=..., offset=..., mode=mode)`; a dropped
    sample is the shortcut bit for bit and its residual is not read. Differentiable in shortcut
    and residual.
    """
    shortcut = jnp.asarray(shortcut)
    residual = jnp.asarray(residual)
    ax = _check_arrays((shortcut, residual), axis)
    cfg = _config(survival_prob, training, mode, ax, scaling)
    return _ops.residual_op(shortcut, residual, _key(seed, offset, training), cfg)


def drop_path(x, survival_prob, *, seed=None, offset=0, training=True, mode="row", axis=0,
              scaling="inference"):
    """The single-input form: ``keep * s * x`` (training) or ``c * x`` (inference).

    Same arguments and mask as `stochastic_depth`; a dropped sample is exact zeros.
    """
    x = jnp.asarray(x)
    ax = _check_arrays((x,), axis)
    cfg = _config(survival_prob, training, mode, ax, scaling)
    return _ops.scale_op(x, _key(seed, offset, training), cfg)
