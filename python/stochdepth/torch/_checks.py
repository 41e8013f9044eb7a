"""Argument validation for the PyTorch adapter, in one place: every public function, module and
custom op checks its arguments with these (docs/design.md, "Errors")."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch import Tensor

M64 = (1 << 64) - 1
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = ("row", "batch")
SCALINGS = ("inference", "training")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_prob(name: str, p) -> float:
    """`p` as a float in [0, 1]. Python and NumPy numbers; bools and tensors are refused (a
    tensor would force a device sync)."""
    if isinstance(p, (bool, Tensor)) or not hasattr(p, "__float__"):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    if not 0.0 <= float(p) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return float(p)


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")


def check_scaling(scaling) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")


def check_axis(axis) -> int:
    """An integer axis (range is checked against the tensor later). 1.5 is an error, not 1."""
    if isinstance(axis, bool):
        raise TypeError("axis must be an integer, got bool")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None


def check_u64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= M64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


RNG_DTYPES = (torch.int64, torch.uint64)
_RNG_FORM = "an int64 tensor [seed, offset] of shape (2,)"


def check_rng(rng) -> None:
    """The custom ops' `rng`: None (at inference) or [seed, offset], two 64-bit words (int64, read
    as two's complement, or uint64) in a tensor of shape (2,). Shape and dtype only, never the
    values: under torch.compile this runs on FakeTensors too, and CUDA words stay on the device."""
    if rng is None:
        return
    if not isinstance(rng, Tensor):
        raise TypeError(f"rng must be {_RNG_FORM}, got {type(rng).__name__}")
    if rng.dtype not in RNG_DTYPES:
        raise TypeError(f"rng must be {_RNG_FORM}, got dtype {rng.dtype}")
    if rng.dim() != 1 or rng.shape[0] != 2:
        raise ValueError(f"rng must be {_RNG_FORM}, got shape {tuple(rng.shape)}")


def check_torchvision(p, mode) -> None:
    """torchvision.ops.stochastic_depth's own checks, with its messages."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in MODES:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")


def check_op_args(shortcut, residual, survival_prob, axis, scaling) -> None:
    """What the kernels need of an op's arguments (also run by the fake kernels)."""
    if residual.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"residual must be float16, bfloat16, float32 or float64, got {residual.dtype}"
        )
    if residual.dim() < 1:
        raise ValueError("residual must have rank >= 1 (a sample axis), got a 0-d tensor")
    if not -residual.dim() <= axis < residual.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {residual.dim()}")
    if shortcut is not None:
        if shortcut.dtype != residual.dtype:
            raise TypeError(
                f"shortcut and residual must have the same dtype, got {shortcut.dtype} and "
                f"{residual.dtype}"
            )
        if shortcut.shape != residual.shape:
            raise ValueError(
                f"shortcut and residual must have the same shape, got {tuple(shortcut.shape)} "
                f"and {tuple(residual.shape)}"
            )
        if shortcut.device != residual.device:
            raise ValueError(
                f"shortcut and residual must be on the same device, got {shortcut.device} and "
                f"{residual.device}"
            )
    if not 0.0 <= survival_prob <= 1.0:  # also rejects NaN
        raise ValueError(f"survival_prob must be in [0, 1], got {survival_prob}")
    check_scaling(scaling)
