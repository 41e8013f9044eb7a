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

`survival_prob`, `training`, `mode`, `axis`, `scaling` and `donate_shortcut` are static (Python
values): a new value compiles anew. vmap is supported and runs the op once per element
(sequentially), so each element may carry its own key.

Platforms: the CPU, and CUDA GPUs when stochdepth was built with CUDA (a JAX GPU backend, e.g.
jax[cuda12], runs the library's CUDA kernels on XLA's stream). On the GPU the key operand stays
on the device: the kernels read (seed, offset) from it when they run, so the call may be
captured into XLA's command buffers (CUDA graphs) and replayed with new keys (docs/design.md,
"CUDA").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _op
from .._op import OpConfig
from . import _ops
from ._ffi import MIN_JAXLIB
from .norm import stochastic_depth_norm  # the fused residual + norm (norm.py)
from .residual import stochastic_residual

__all__ = ["stochastic_depth", "drop_path", "apply", "key_words", "MIN_JAXLIB",
           "stochastic_depth_norm", "stochastic_residual"]


def _as_array(value, expected):
    """jnp.asarray(value), its failure a TypeError that says what was expected."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{expected}, got {type(value).__name__} that JAX cannot read as an "
                        f"array ({e})") from e


def _words32(name, value):
    """(lo, hi) uint32 words of an integer seed or offset: host ints or JAX integer scalars."""
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        lo, hi = _op.split64(_op.check_u64(name, value))
        return jnp.uint32(lo), jnp.uint32(hi)
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
        lo, hi = _op.split64(value.astype(jnp.uint64))  # the two's complement pattern
        return lo.astype(jnp.uint32), hi.astype(jnp.uint32)
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
    _op.check_seed_given(seed)
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


def _dtype_name(x):
    return jnp.dtype(x.dtype).name


def _static(config, axis):
    """The FFI attributes of a call (`_ops`): the config with the axis as an index."""
    return (config.survival_prob, axis, int(config.training), int(config.batch_mode),
            int(config.scaling == "training"))


def _run(shortcut, residual, words, config, donate=False, gamma=None):
    """The op on checked arrays (jnp arrays; shortcut None for the single-input form, gamma None
    for the op without the layer scale)."""
    name = "x" if shortcut is None else "residual"
    pair = None if shortcut is None else (_dtype_name(shortcut), tuple(shortcut.shape))
    ax = _op.check_arrays(name, _dtype_name(residual), tuple(residual.shape), config.axis, pair)
    if gamma is not None:
        _op.check_gamma(_dtype_name(gamma), tuple(gamma.shape), name, _dtype_name(residual),
                        tuple(residual.shape), ax)
    cfg = _static(config, ax)
    if shortcut is None:
        if gamma is None:
            return _ops.scale_op(residual, words, cfg)
        return _ops.scale_gamma_op(residual, gamma, words, cfg)
    if gamma is None:
        return _ops.residual_op(shortcut, residual, words, cfg, donate)
    return _ops.residual_gamma_op(shortcut, residual, gamma, words, cfg, donate)


def _words(seed, offset, training):
    if training:
        return key_words(seed, offset)
    return jnp.zeros((4,), jnp.uint32)  # not read at inference


def apply(shortcut, residual, words, config, *, donate_shortcut=False, gamma=None):
    """The op for a caller that holds its key words already (the Keras layer on the JAX backend).

    `words` is the uint32[4] operand [seed_lo, seed_hi, offset_lo, offset_hi] (`key_words`
    makes it; traced is fine; not read at inference), `config` a validated
    `stochdepth._op.OpConfig`. `shortcut` None is the single-input form (`drop_path`). The
    arrays, `gamma` and `donate_shortcut` are checked as in `stochastic_depth`.
    """
    donate = _op.check_flag("donate_shortcut", donate_shortcut)
    if donate and shortcut is None:
        raise ValueError("donate_shortcut=True needs a shortcut (drop_path has none)")
    residual = jnp.asarray(residual)
    shortcut = None if shortcut is None else jnp.asarray(shortcut)
    if gamma is not None:
        gamma = _as_array(gamma, "gamma must be an array")
    return _run(shortcut, residual, words, config, donate, gamma)


def stochastic_depth(shortcut, residual, survival_prob, *, seed=None, offset=0, training=True,
                     mode="row", axis=0, scaling="inference", donate_shortcut=False,
                     gamma=None):
    """``shortcut + keep * s * residual`` (training) or ``shortcut + c * residual`` (inference);
    with `gamma`, ``shortcut + keep * s * (gamma * residual)``.

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
        donate_shortcut: True writes the result into the shortcut's buffer (an XLA input-output
            alias), in place: no output buffer is allocated and a dropped sample's memory is not
            touched. Use it where XLA may reuse that buffer: under `jax.jit(...,
            donate_argnums=...)` with the shortcut donated, or for a shortcut computed in the
            same jitted function and read by nothing after this op. Elsewhere XLA copies the
            shortcut first, which costs more than the default. The values are the same either
            way (docs/design.md, "XLA:CPU buffers").
        gamma: an optional layer scale (LayerScale) of shape (C,), C the last axis, the inputs'
            dtype; the sample axis must not be the last one. The op is then fused as
            docs/design.md, "Layer scale" pins it (bit for bit `stochdepth.reference.forward(...,
            gamma=)`), and the gradient in gamma comes from the same backward call as the one in
            residual.

    The mask equals `stochdepth.mask(batch, p, seed=..., offset=..., mode=mode)`; a dropped
    sample is the shortcut bit for bit and its residual is not read. Differentiable in shortcut,
    residual and gamma.
    """
    config = OpConfig(survival_prob, mode, axis, scaling, training)
    shortcut = jnp.asarray(shortcut)  # None is an error here, as JAX reads it: not drop_path
    return apply(shortcut, residual, _words(seed, offset, config.training), config,
                 donate_shortcut=donate_shortcut, gamma=gamma)


def drop_path(x, survival_prob, *, seed=None, offset=0, training=True, mode="row", axis=0,
              scaling="inference", gamma=None):
    """The single-input form: ``keep * s * x`` (training) or ``c * x`` (inference); with
    `gamma`, ``keep * s * (gamma * x)``.

    Same arguments and mask as `stochastic_depth`; a dropped sample is exact zeros.
    """
    config = OpConfig(survival_prob, mode, axis, scaling, training)
    return apply(None, x, _words(seed, offset, config.training), config, gamma=gamma)
