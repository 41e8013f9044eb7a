"""The PyTorch adapter's own argument checks: tensors, the custom ops' `rng`, torchvision's
messages. The checks of values shared with the other adapters (probabilities, seeds, mode,
scaling, axis) and their messages are `stochdepth._op`'s (docs/design.md, "Errors")."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _op
from .._op import MODES, check_scaling

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's name as the shared validators spell it ("float32")."""
    return str(dtype).rpartition(".")[2]


def check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        _op.check_dtype(name, dtype_name(t.dtype))


def check_prob(name: str, p) -> float:
    """`p` as a float in [0, 1] (`_op.check_prob`: a tensor is refused, it would force a device
    sync)."""
    return float(_op.check_prob(name, p))


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


def check_tensors(shortcut, residual, axis: int, name: str = "residual") -> None:
    """What the kernels need of a call's tensors: dtypes, shapes, a sample axis in range, one
    device (`name`: the residual's name in the caller's signature)."""
    pair = None if shortcut is None else (dtype_name(shortcut.dtype), tuple(shortcut.shape))
    _op.check_arrays(name, dtype_name(residual.dtype), tuple(residual.shape), axis, pair)
    if shortcut is not None and shortcut.device != residual.device:
        raise ValueError(
            f"shortcut and residual must be on the same device, got {shortcut.device} and "
            f"{residual.device}"
        )


def check_op_args(shortcut, residual, survival_prob, axis, scaling) -> None:
    """What the kernels need of a custom op's arguments (run by the op and its fake kernel: the
    op is an entry of its own)."""
    check_tensors(shortcut, residual, axis)
    _op.check_prob("survival_prob", survival_prob)
    check_scaling(scaling)


def check_gamma(gamma, ref, axis: int, ref_name: str = "residual") -> None:
    """The layer scale against the tensor it scales (docs/design.md, "Layer scale"), with the
    raw API's messages: shape (C,), C the last axis of `ref`, which must not be the sample axis,
    and `ref`'s dtype and device. Run after `check_tensors` (`axis` is in range)."""
    if not isinstance(gamma, Tensor):
        raise TypeError(f"gamma must be a torch.Tensor or None, got {type(gamma).__name__}")
    if gamma.dtype != ref.dtype:
        raise TypeError(f"gamma must have dtype {dtype_name(ref.dtype)} like {ref_name}, got "
                        f"{dtype_name(gamma.dtype)}")
    rank = ref.dim()
    if axis % rank == rank - 1:
        raise ValueError(f"gamma scales the channels (the last axis of {ref_name}), which must "
                         f"not be the sample axis; got axis {axis % rank} for {ref_name} of "
                         f"shape {tuple(ref.shape)}")
    channels = ref.shape[-1]
    if tuple(gamma.shape) != (channels,):
        raise ValueError(f"gamma must have shape ({channels},) (the last axis of {ref_name}), "
                         f"got {tuple(gamma.shape)}")
    if channels > 2**31 - 1:
        raise ValueError(f"gamma must have fewer than 2**31 elements, got {channels}")
    if gamma.device != ref.device:
        raise ValueError(f"gamma must be on the same device as {ref_name} ({ref.device}), got "
                         f"{gamma.device}")


def check_like_grad_out(residual, grad_out) -> None:
    """The layer scale's backward: the forward's residual against grad_out (the raw API's
    messages)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.dtype != grad_out.dtype:
        raise TypeError(f"residual must have dtype {dtype_name(grad_out.dtype)} like grad_out, "
                        f"got {dtype_name(residual.dtype)}")
    if residual.shape != grad_out.shape:
        raise ValueError(f"residual must have shape {tuple(grad_out.shape)} like grad_out, got "
                         f"{tuple(residual.shape)}")
    if residual.device != grad_out.device:
        raise ValueError(f"residual must be on the same device as grad_out ({grad_out.device}), "
                         f"got {residual.device}")


def check_gamma_op_args(shortcut, residual, gamma, survival_prob, axis, scaling) -> None:
    """The layer-scale op's arguments (run by the op and its fake kernel)."""
    check_op_args(shortcut, residual, survival_prob, axis, scaling)
    check_gamma(gamma, residual, axis)
