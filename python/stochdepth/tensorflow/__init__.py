"""stochdepth for TensorFlow: the library's kernels as TensorFlow custom ops, with gradients.

    out = stochastic_depth(shortcut, residual, 0.8, seed=seed, offset=step)

runs the compiled CPU kernels as a TensorFlow op and gives, bit for bit, `stochdepth.forward` /
`stochdepth.reference` for the same arguments, eagerly, under `tf.function` and in a
SavedModel. The gradient (registered for the op) calls the backward kernel, which recomputes the
mask from (seed, offset): no mask is saved (docs/design.md, "Semantics", "Arithmetic").

Randomness (docs/design.md, "Randomness in the adapters"): `seed` and `offset` become a
uint32[4] input of the op, not constants, so a `tf.function` given them as tensors (a step
counter in a `tf.Variable`, say) draws a new mask without retracing. Accepted:

- Python or NumPy integers in [0, 2**64) (under `tf.function` a new Python value retraces, as
  for any Python argument);
- TensorFlow integer scalars (tensors or variables): 32-bit and narrower values are read as their
  32-bit pattern (an int32 -1 is 2**32 - 1), 64-bit ones as their 64-bit pattern.

`survival_prob`, `training`, `mode`, `axis` and `scaling` are Python values (op attributes: a
new value traces anew), validated once by `stochdepth._op.OpConfig`. A caller that holds its key
words already (the Keras layer on the TensorFlow backend) calls `apply`.

Loading: importing this module loads the op library into TensorFlow (`tf.load_op_library`) and
registers the gradients; a SavedModel that uses the ops needs `import stochdepth.tensorflow`
before `tf.saved_model.load`. TensorFlow versions: the ones of the major version the library was
built against, from that minor version on (`BUILT_AGAINST`; the package's test extra pins
tensorflow-cpu 2.21.0), and at least `MIN_TF`; others are an ImportError naming the fix.

Platforms: CPU kernels only. There is no XLA kernel: inside `tf.function(jit_compile=True)` the
ops raise an error (the Keras layer then uses its Keras-ops path; models containing it leave
XLA off).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .. import _op
from .._op import OpConfig
from . import _ops
from ._load import BUILT_AGAINST, MIN_TF

__all__ = ["stochastic_depth", "drop_path", "apply", "key_words", "BUILT_AGAINST", "MIN_TF"]


def _as_tensor(value, name):
    """tf.convert_to_tensor(value), its failure a TypeError that names the argument."""
    try:
        return tf.convert_to_tensor(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__} that "
                        f"TensorFlow cannot read as a tensor ({e})") from e


def _words32(name, value):
    """(lo, hi) uint32 words of an integer seed or offset: host ints or TF integer scalars."""
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        lo, hi = _op.split64(_op.check_u64(name, value))
        return tf.constant(lo, tf.uint32), tf.constant(hi, tf.uint32)
    if not tf.is_tensor(value):  # tf.Variable included
        raise TypeError(
            f"{name} must be an integer or an integer scalar tensor, got {type(value).__name__}")
    dtype = tf.as_dtype(value.dtype)
    if value.shape.rank != 0 or not dtype.is_integer:
        raise TypeError(
            f"{name} must be an integer or an integer scalar tensor, got {dtype.name}"
            f"{list(value.shape) if value.shape.rank is not None else '[?]'}"
        )
    if dtype.size == 8:
        # A cast to uint32 keeps the low 32 bits (the two's complement pattern); the shift of a
        # negative int64 is arithmetic, so its high word is the pattern's too.
        hi = tf.bitwise.right_shift(value, tf.constant(32, dtype))
        return tf.cast(value, tf.uint32), tf.cast(hi, tf.uint32)
    return tf.cast(value, tf.uint32), tf.constant(0, tf.uint32)


def key_words(seed, offset=0):
    """The uint32[4] input [seed_lo, seed_hi, offset_lo, offset_hi] for (seed, offset)."""
    _op.check_seed_given(seed)
    s_lo, s_hi = _words32("seed", seed)
    o_lo, o_hi = _words32("offset", offset)
    return tf.stack([s_lo, s_hi, o_lo, o_hi])


def _checked(name, x):
    """(dtype name, shape) of a tensor for `_op.check_arrays`. The sample axis is an attribute
    of the op, so the rank must be known when the op is built (a None dimension is fine)."""
    if x.shape.rank is None:
        raise ValueError(f"{name} must have a known rank (the sample axis is an op attribute)")
    return tf.as_dtype(x.dtype).name, tuple(x.shape.as_list())


def _attrs(config, axis):
    """The ops' attributes (`_ops.ATTRS`): the config with the axis as an index."""
    return (axis, config.training, config.batch_mode, config.scaling == "training")


def apply(shortcut, residual, words, config):
    """The op for a caller that holds its key words already (the Keras layer on the TensorFlow
    backend), as `stochdepth.jax.apply` is for JAX.

    `words` is the uint32[4] input [seed_lo, seed_hi, offset_lo, offset_hi] (`key_words` makes
    it; a graph tensor is fine; not read at inference), `config` a validated
    `stochdepth._op.OpConfig`. `shortcut` None is the single-input form (`drop_path`). The
    tensors are checked as in `stochastic_depth`.
    """
    p = tf.constant(config.survival_prob, tf.float64)
    if shortcut is None:
        x = _as_tensor(residual, "x")
        ax = _op.check_arrays("x", *_checked("x", x), config.axis)
        return _ops.scale_op(x, words, p, _attrs(config, ax))
    shortcut = _as_tensor(shortcut, "shortcut")
    residual = _as_tensor(residual, "residual")
    ax = _op.check_arrays("residual", *_checked("residual", residual), config.axis,
                          _checked("shortcut", shortcut))
    return _ops.residual_op(shortcut, residual, words, p, _attrs(config, ax))


def _words(seed, offset, training):
    if training:
        return key_words(seed, offset)
    return tf.zeros((4,), tf.uint32)  # not read at inference


def stochastic_depth(shortcut, residual, survival_prob, *, seed=None, offset=0, training=True,
                     mode="row", axis=0, scaling="inference"):
    """``shortcut + keep * s * residual`` (training) or ``shortcut + c * residual`` (inference).

    Args:
        shortcut, residual: tensors of the same shape and dtype (float16, bfloat16, float32,
            float64), of known rank >= 1.
        survival_prob: p in [0, 1], a Python number.
        seed, offset: the mask's Philox key and counter offset (docs/design.md, "The mask
            stream"): integers or TensorFlow integer scalars; see the module docstring. seed is
            needed only when training.
        training: True draws the mask; False is the inference form.
        mode: "row" (one draw per sample) or "batch" (one draw for the batch).
        axis: the sample axis.
        scaling: "inference" (s = 1, c = p) or "training" (s = 1/p, c = 1).

    The mask equals `stochdepth.mask(batch, p, seed=..., offset=..., mode=mode)`; a dropped
    sample is the shortcut bit for bit and its residual is not read. Differentiable in shortcut
    and residual.
    """
    config = OpConfig(survival_prob, mode, axis, scaling, training)
    shortcut = _as_tensor(shortcut, "shortcut")  # None is an error here, not drop_path
    return apply(shortcut, residual, _words(seed, offset, config.training), config)


def drop_path(x, survival_prob, *, seed=None, offset=0, training=True, mode="row", axis=0,
              scaling="inference"):
    """The single-input form: ``keep * s * x`` (training) or ``c * x`` (inference).

    Same arguments and mask as `stochastic_depth`; a dropped sample is exact zeros.
    """
    config = OpConfig(survival_prob, mode, axis, scaling, training)
    return apply(None, x, _words(seed, offset, config.training), config)
