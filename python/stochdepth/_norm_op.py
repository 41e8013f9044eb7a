"""The fused residual + norm's part of the adapters' vocabulary, framework-free (as `_op` is for
the op): `NormConfig`, the static part of a call, and the validators of the norm's own
arguments with the raw API's messages (docs/design.md, "Fused residual and norm"). Used by the
JAX adapter (`stochdepth.jax.norm`) and the Keras layer (`stochdepth.keras.norm`); imports no
framework.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ._op import OpConfig, check_dtype

NORMS = ("layer", "rms")


def check_norm(norm) -> str:
    if not isinstance(norm, str):
        raise TypeError(f"norm must be 'layer' or 'rms', got {type(norm).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    return norm


def check_eps(eps) -> float:
    """A positive finite real number (a Python or NumPy one: the value is static)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive real number, got {type(eps).__name__}")
    if not (float(eps) > 0 and math.isfinite(float(eps))):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def check_bias_kind(norm: str, has_bias: bool) -> None:
    if norm == "rms" and has_bias:
        raise ValueError("bias must be None for norm='rms' (RMSNorm has no bias)")


def check_like(name: str, dtype: str, shape: tuple, like_name: str, like_dtype: str,
               like_shape: tuple) -> None:
    """An array against the main input: the same dtype (names) and shape (a None dimension,
    unknown until run time, matches any)."""
    if dtype != like_dtype:
        raise TypeError(f"{name} must have dtype {like_dtype} like {like_name}, got {dtype}")
    if len(shape) != len(like_shape) or any(
            a is not None and b is not None and a != b for a, b in zip(shape, like_shape)):
        raise ValueError(f"{name} must have shape {tuple(like_shape)} like {like_name}, got "
                         f"{tuple(shape)}")


def check_vector(name: str, dtype: str, shape: tuple, like_name: str, like_dtype: str,
                 width) -> None:
    """A per-channel vector (gamma, weight, bias): the inputs' dtype, shape (C,)."""
    if dtype != like_dtype:
        raise TypeError(f"{name} must have dtype {like_dtype} like {like_name}, got {dtype}")
    if len(shape) != 1 or (width is not None and shape[0] is not None and shape[0] != width):
        raise ValueError(f"{name} must have shape ({width},) (the last axis of {like_name}), got "
                         f"{tuple(shape)}")


def check_main(name: str, dtype: str, shape: tuple) -> None:
    """The main input (shortcut, or y in the backward pass): a kernel dtype, rank >= 2."""
    check_dtype(name, dtype)
    if len(shape) < 2:
        raise ValueError(f"{name} must have rank >= 2 (samples along axis 0, channels along the "
                         f"last axis), got shape {tuple(shape)}")


@dataclass(frozen=True)
class NormConfig:
    """What a call of the fused op fixes besides its arrays and key, validated once: `op` the
    residual add's OpConfig (its axis is always 0, the samples), `norm` "layer" or "rms", `eps`
    the positive number added to the variance (mean square)."""

    op: OpConfig
    norm: str = "layer"
    eps: float = 1e-6

    def __post_init__(self):
        if self.op.axis != 0:
            raise ValueError(f"the fused norm's samples are along axis 0, got axis {self.op.axis}")
        object.__setattr__(self, "norm", check_norm(self.norm))
        object.__setattr__(self, "eps", check_eps(self.eps))


def check_forward(config: NormConfig, shortcut: tuple, residual: tuple, gamma, weight,
                  bias) -> None:
    """The arrays of a forward call, each a (dtype name, shape) pair or None when absent, in the
    raw API's order: types and shapes of the inputs, then of the vectors."""
    check_bias_kind(config.norm, bias is not None)
    if residual[0] != shortcut[0]:
        raise TypeError(f"shortcut and residual must have the same dtype, got {shortcut[0]} and "
                        f"{residual[0]}")
    check_main("shortcut", *shortcut)
    check_like("residual", *residual, "shortcut", *shortcut)
    width = shortcut[1][-1]
    for name, v in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        if v is not None:
            check_vector(name, *v, "shortcut", shortcut[0], width)
