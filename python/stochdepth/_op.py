"""The adapters' one vocabulary, framework-free: `OpConfig` (the static part of a call), the
validators of every argument with their one set of messages, and the split of (seed, offset) into
the four 32-bit Philox key words (docs/design.md, "Errors", "The mask stream").

The PyTorch, JAX and Keras adapters validate each argument once per call, at their entry, with
these functions; nothing below the entry checks it again. This module imports no framework.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import numpy as np

M64 = (1 << 64) - 1
LO32 = 0xFFFFFFFF
MODES = ("row", "batch")
SCALINGS = ("inference", "training")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")  # the kernels' dtypes, by name


# ---- validators: each returns the value as the kernels take it --------------------------------


def check_prob(name: str, p):
    """A probability in [0, 1]: a Python or NumPy real number (a NumPy scalar comes back as the
    Python number, so that a Keras config stays JSON-friendly). Bools, tensors and traced values
    are refused: the value is static, and reading a tensor would force a device sync."""
    if isinstance(p, np.generic):
        p = p.item()
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1] (a Python or NumPy number: a "
                        f"static value, not a tensor or a traced value), got {type(p).__name__}")
    if not 0 <= p <= 1:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


def check_u64(name: str, value) -> int:
    """An unsigned 64-bit integer (a seed or an offset): a Python or NumPy integer, not a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= M64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def check_flag(name: str, value) -> bool:
    """A static on/off option: a Python or NumPy bool, not 0/1 nor a tensor."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return bool(value)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    return mode


def check_scaling(scaling) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
    return scaling


def check_axis(axis) -> int:
    """An integer axis (its range is checked against the inputs' rank by `check_arrays`). 1.5 is
    an error, not 1; so is a bool."""
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError("axis must be an integer, got bool")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None


def check_dtype(name: str, dtype: str) -> None:
    """`dtype`, a dtype's name as NumPy spells it ("float32"), is one the kernels take."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {dtype}")


def check_rank(name: str, rank: int) -> None:
    if rank < 1:
        raise ValueError(f"{name} must have rank >= 1 (a sample axis), got a 0-d array")


def check_axis_in_rank(axis: int, rank: int) -> int:
    """`axis` as an index in [0, rank)."""
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for inputs of rank {rank} "
                         f"(expected {-rank} <= axis < {rank})")
    return axis % rank


def check_pair(shortcut_dtype: str, residual_dtype: str, shortcut_shape: tuple,
               residual_shape: tuple) -> None:
    """A shortcut and a residual agree: the same dtype (names) and the same shape (tuples; a
    None dimension, unknown until run time, matches any)."""
    if shortcut_dtype != residual_dtype:
        raise TypeError(f"shortcut and residual must have the same dtype, got {shortcut_dtype} "
                        f"and {residual_dtype}")
    if len(shortcut_shape) != len(residual_shape) or any(
            a is not None and b is not None and a != b
            for a, b in zip(shortcut_shape, residual_shape)):
        raise ValueError(f"shortcut and residual must have the same shape, got "
                         f"{tuple(shortcut_shape)} and {tuple(residual_shape)}")


def check_arrays(name: str, dtype: str, shape: tuple, axis: int,
                 shortcut: tuple[str, tuple] | None = None) -> int:
    """The inputs of one call, by dtype name and shape: `name` the residual's (or single input's)
    name, `shortcut` the shortcut's (dtype, shape) when there is one. Returns `axis` as an index
    in [0, rank)."""
    if shortcut is not None:
        check_pair(shortcut[0], dtype, shortcut[1], shape)
    check_dtype(name, dtype)
    check_rank(name, len(shape))
    return check_axis_in_rank(axis, len(shape))


def _shape_str(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")


def check_gamma(dtype: str, shape: tuple, like_name: str, like_dtype: str, like_shape: tuple,
                axis: int) -> None:
    """The layer scale (docs/design.md, "Layer scale") by dtype name and shape against the array
    it scales (`like_name`, sample axis `axis`, an index): the raw API's errors and messages.
    Shapes with a None dimension (unknown until run time) are not checked against it."""
    if dtype != like_dtype:
        raise TypeError(f"gamma must have dtype {like_dtype} like {like_name}, got {dtype}")
    if axis == len(like_shape) - 1:
        raise ValueError(f"gamma scales the channels (the last axis of {like_name}), which must "
                         f"not be the sample axis; got axis {axis} for {like_name} of shape "
                         f"{_shape_str(like_shape)}")
    c = like_shape[-1]
    if len(shape) != 1 or (c is not None and shape[0] is not None and shape[0] != c):
        raise ValueError(f"gamma must have shape ({c},) (the last axis of {like_name}), got "
                         f"{_shape_str(shape)}")
    if c is not None and c > 2**31 - 1:
        raise ValueError(f"gamma must have fewer than 2**31 elements, got {c}")


def check_seed_given(seed) -> None:
    if seed is None:
        raise ValueError("seed is required when training=True (the mask is drawn)")


# ---- (seed, offset) as Philox key words -------------------------------------------------------


def split64(value):
    """(low, high) 32-bit words of a 64-bit value: a Python int, or an unsigned 64-bit integer
    array of a framework whose `&` and `>>` are the bitwise ones (NumPy, JAX); the caller casts
    array words to uint32."""
    return value & LO32, value >> 32


def join64(lo: int, hi: int) -> int:
    """The 64-bit value of two 32-bit words (each taken mod 2**32)."""
    return ((hi & LO32) << 32) | (lo & LO32)


def key_words(seed: int, offset: int) -> tuple[int, int, int, int]:
    """The four uint32 key words [seed_lo, seed_hi, offset_lo, offset_hi] of host integers
    (docs/design.md, "The mask stream"): Philox's key is the seed's words, its counter's upper
    half the offset's."""
    return (*split64(seed), *split64(offset))


def to_int64(u: int) -> int:
    """The int64 with the bit pattern of the uint64 `u` (two's complement)."""
    return u - (1 << 64) if u >> 63 else u


# ---- the static part of a call ----------------------------------------------------------------


@dataclass(frozen=True)
class OpConfig:
    """What a call fixes besides its arrays and its key, validated once when it is made:

    survival_prob: p in [0, 1]; mode: "row" or "batch"; axis: the sample axis (an integer, its
    range checked against the inputs by `check_arrays`); scaling: "inference" (s = 1, c = p) or
    "training" (s = 1/p, c = 1); training: draw a mask (True) or the inference form (False).
    Options a later op needs (a per-channel gamma, a norm kind and its eps) are further fields.
    """

    survival_prob: float
    mode: str = "row"
    axis: int = 0
    scaling: str = "inference"
    training: bool = True

    def __post_init__(self):
        # Frozen: the normalised values are set through object.__setattr__, once.
        init = object.__setattr__
        init(self, "survival_prob", float(check_prob("survival_prob", self.survival_prob)))
        init(self, "mode", check_mode(self.mode))
        init(self, "axis", check_axis(self.axis))
        init(self, "scaling", check_scaling(self.scaling))
        init(self, "training", bool(self.training))

    @property
    def batch_mode(self) -> bool:
        return self.mode == "batch"

    @property
    def train_scale(self) -> float:
        """s, the factor of a kept residual in training (0 when p = 0: nothing is kept)."""
        if self.scaling == "training":
            return 1.0 / self.survival_prob if self.survival_prob > 0 else 0.0
        return 1.0

    @property
    def inference_scale(self) -> float:
        """c, the factor of the residual at inference."""
        return self.survival_prob if self.scaling == "inference" else 1.0
