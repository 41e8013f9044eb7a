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

`survival_prob`, `training`, `mode`, `axis` and `scaling` are Python values, checked here.

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

import numbers

import numpy as np
import tensorflow as tf

from . import _ops
from ._load import BUILT_AGAINST, MIN_TF

__all__ = ["stochastic_depth", "drop_path", "key_words", "BUILT_AGAINST", "MIN_TF"]

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


def _is_tensor(value):
    return isinstance(value, (tf.Tensor, tf.Variable)) or tf.is_tensor(value)


def _words32(name, value):
    """(lo, hi) uint32 words of an integer seed or offset: host ints or TF integer scalars."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if not 0 <= value < 2**64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
        return tf.constant(value & _LO32, tf.uint32), tf.constant(value >> 32, tf.uint32)
    if not _is_tensor(value):
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
    if seed is None:
        raise ValueError("seed is required when training=True (the mask is drawn)")
    s_lo, s_hi = _words32("seed", seed)
    o_lo, o_hi = _words32("offset", offset)
    return tf.stack([s_lo, s_hi, o_lo, o_hi])


def _check_arrays(arrays, axis):
    first = arrays[0]
    dtype = tf.as_dtype(first.dtype)
    if dtype.name not in _DTYPES:
        raise TypeError(f"inputs must be float16, bfloat16, float32 or float64, got {dtype.name}")
    for other in arrays[1:]:
        if tf.as_dtype(other.dtype) != dtype:
            raise TypeError(
                f"shortcut and residual must have the same dtype, got {dtype.name} and "
                f"{tf.as_dtype(other.dtype).name}"
            )
        if not first.shape.is_compatible_with(other.shape) or (
                first.shape.rank != other.shape.rank):
            raise ValueError(
                f"shortcut and residual must have the same shape, got {_shape(first)} and "
                f"{_shape(other)}"
            )
    rank = first.shape.rank
    if rank is None:
        raise ValueError("inputs must have a known rank (the sample axis is an attribute)")
    if rank < 1:
        raise ValueError("inputs must have rank >= 1 (a sample axis)")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for inputs of rank {rank}")
    return int(axis) % rank


def _shape(x):
    return tuple(x.shape.as_list()) if x.shape.rank is not None else None


def _config(survival_prob, training, mode, axis, scaling):
    p = _check_prob(survival_prob)
    if mode not in ("row", "batch"):
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    if scaling not in ("inference", "training"):
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
    return p, (axis, bool(training), mode == "batch", scaling == "training")


def _key(seed, offset, training):
    if training:
        return key_words(seed, offset)
    return tf.zeros((4,), tf.uint32)  # not read at inference


def _as_tensor(value, name):
    try:
        return tf.convert_to_tensor(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor or array, got {type(value).__name__} that "
                        f"TensorFlow cannot read as a tensor ({e})") from e


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
    shortcut = _as_tensor(shortcut, "shortcut")
    residual = _as_tensor(residual, "residual")
    ax = _check_arrays((shortcut, residual), axis)
    p, cfg = _config(survival_prob, training, mode, ax, scaling)
    return _ops.residual_op(shortcut, residual, _key(seed, offset, training),
                            tf.constant(p, tf.float64), cfg)


def drop_path(x, survival_prob, *, seed=None, offset=0, training=True, mode="row", axis=0,
              scaling="inference"):
    """The single-input form: ``keep * s * x`` (training) or ``c * x`` (inference).

    Same arguments and mask as `stochastic_depth`; a dropped sample is exact zeros.
    """
    x = _as_tensor(x, "x")
    ax = _check_arrays((x,), axis)
    p, cfg = _config(survival_prob, training, mode, ax, scaling)
    return _ops.scale_op(x, _key(seed, offset, training), tf.constant(p, tf.float64), cfg)
