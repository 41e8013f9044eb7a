"""The PyTorch adapter's functions: the library's two-input op and drop-in replacements for timm's
`drop_path` and torchvision's `stochastic_depth` (docs/design.md, "Semantics")."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._op import OpConfig
from . import _mode, _ops
from ._checks import check_gamma, check_prob, check_tensor, check_tensors, check_torchvision
from ._keys import eager_key, rank_key, traced_rng


def promote(shortcut: Optional[Tensor], residual: Tensor):
    """Both inputs in `torch.promote_types` of the two, as `shortcut + residual` would be (a
    float32 shortcut and a bfloat16 branch under autocast give float32)."""
    check_tensor("residual", residual)
    if shortcut is None:
        return None, residual
    check_tensor("shortcut", shortcut)
    if shortcut.dtype != residual.dtype:
        common = torch.promote_types(shortcut.dtype, residual.dtype)
        return shortcut.to(common), residual.to(common)
    return shortcut, residual


def run(shortcut: Optional[Tensor], residual: Tensor, config: OpConfig, seed, offset, generator,
        sync_across_ranks: bool, name: str = "residual") -> Tensor:
    """The functions' common part, after their own checks: the tensors against `config`, then
    the path chosen once (one `_mode.eager`) and the pair made in that path's form."""
    check_tensors(shortcut, residual, config.axis, name)
    rank = rank_key(sync_across_ranks)
    if _mode.eager(shortcut, residual):
        key = eager_key(seed, offset, generator, residual) if config.training else None
        return _ops.forward(True, shortcut, residual, key, config, rank)
    rng = traced_rng(seed, offset, generator, residual) if config.training else None
    return _ops.forward(False, shortcut, residual, rng, config, rank)


def run_gamma(shortcut: Optional[Tensor], residual: Tensor, gamma: Tensor, config: OpConfig,
              seed, offset, generator, sync_across_ranks: bool, name: str = "residual"
              ) -> Tensor:
    """`run` with the layer scale (docs/design.md, "Layer scale"): gamma checked against the
    tensors, the same path choice, drop_path_gamma_fwd."""
    check_tensors(shortcut, residual, config.axis, name)
    check_gamma(gamma, residual, config.axis, name)
    rank = rank_key(sync_across_ranks)
    args = (config.survival_prob, config.training, config.batch_mode, config.axis, config.scaling,
            rank)
    if _mode.eager(shortcut, residual, gamma=gamma):
        key = eager_key(seed, offset, generator, residual) if config.training else None
        return _ops.forward_gamma(True, shortcut, residual, gamma, key, *args)
    rng = traced_rng(seed, offset, generator, residual) if config.training else None
    return _ops.forward_gamma(False, shortcut, residual, gamma, rng, *args)


def stochastic_depth(
    shortcut: Optional[Tensor],
    residual: Tensor,
    survival_prob: float,
    training: bool = True,
    *,
    mode: str = "row",
    scaling: str = "inference",
    axis: int = 0,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    sync_across_ranks: bool = False,
    gamma: Optional[Tensor] = None,
) -> Tensor:
    """Stochastic depth of a residual branch: shortcut + keep[b] * s * residual, or with the
    layer scale shortcut + keep[b] * s * (gamma * residual).

    Args:
        shortcut: the identity path, or None for the single-input form (keep * s * residual).
        residual: the branch output, same shape and device as `shortcut`. If the dtypes differ,
            both are promoted to `torch.promote_types(shortcut.dtype, residual.dtype)`.
        survival_prob: p, the probability that a sample keeps its residual, in [0, 1].
        training: draw a mask (True) or apply the inference form (False).
        mode: "row" (one draw per sample along `axis`) or "batch" (one draw for all).
        scaling: "inference" (the paper's: s = 1 in training, residual times p at inference) or
            "training" (timm's and torchvision's: s = 1/p in training, identity at inference).
        axis: the sample axis (an integer).
        seed, offset: the Philox key and counter, 64-bit unsigned; None draws both from
            `generator` (torch's default CPU generator when None; while a CUDA graph is being
            captured, or traced for CUDA, the device's generator, so each replay draws anew).
        sync_across_ranks: under torch.distributed, use the seed as is on every rank instead of
            `rank_seed(seed, rank)`.
        gamma: the layer scale (timm's `LayerScale.gamma`), a 1-D tensor of the last axis's
            length with the (promoted) inputs' dtype and device, multiplied into the residual
            in the op (docs/design.md, "Layer scale"); the sample axis must not be the last.
            It gets a gradient like the inputs. None: the op without it.

    Non-contiguous inputs are copied with `.contiguous()`; the result is a new contiguous tensor.
    A dropped sample's output is the shortcut bit for bit (zeros in the single-input form).
    """
    shortcut, residual = promote(shortcut, residual)
    config = OpConfig(survival_prob, mode, axis, scaling, training)
    if gamma is not None:
        return run_gamma(shortcut, residual, gamma, config, seed, offset, generator,
                         sync_across_ranks)
    return run(shortcut, residual, config, seed, offset, generator, sync_across_ranks)


def drop_path(
    x: Tensor,
    drop_prob: float = 0.0,
    training: bool = False,
    scale_by_keep: bool = True,
    *,
    mode: str = "row",
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    sync_across_ranks: bool = False,
    gamma: Optional[Tensor] = None,
) -> Tensor:
    """timm's `drop_path(x, drop_prob, training, scale_by_keep)`.

    Returns `x` itself when `drop_prob == 0` or not training (as timm does). Otherwise each
    sample (dim 0) is kept with probability 1 - drop_prob and scaled by 1 / (1 - drop_prob) when
    `scale_by_keep` (no scaling otherwise, and none at eval either way); dropped samples are 0.

    `gamma` (see `stochastic_depth`) is timm's `drop_path(ls(x))` in one op: gamma * x where
    timm returns x (drop_prob 0, or not training), else keep * s * (gamma * x).
    """
    check_tensor("x", x)
    drop_prob = check_prob("drop_prob", drop_prob)
    config = OpConfig(1.0 - drop_prob, mode, 0, "training" if scale_by_keep else "inference")
    if gamma is not None:
        if drop_prob == 0.0 or not training:
            # Where timm returns x: the inference form with factor 1, gamma * x.
            config = OpConfig(1.0, mode, 0, "training", training=False)
        return run_gamma(None, x, gamma, config, seed, offset, generator, sync_across_ranks, "x")
    if drop_prob == 0.0 or not training:
        return x
    return run(None, x, config, seed, offset, generator, sync_across_ranks, "x")


def torchvision_stochastic_depth(
    input: Tensor,
    p: float,
    mode: str,
    training: bool = True,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    sync_across_ranks: bool = False,
) -> Tensor:
    """torchvision.ops.stochastic_depth(input, p, mode, training): p is the DROP probability.

    Returns `input` itself when not training or p == 0; otherwise keep * input / (1 - p) per row
    (mode "row") or for the whole batch (mode "batch"), zeros for dropped rows.
    """
    check_tensor("input", input)
    check_torchvision(p, mode)
    if not training or p == 0.0:
        return input
    config = OpConfig(1.0 - float(p), mode, 0, "training")
    return run(None, input, config, seed, offset, generator, sync_across_ranks, "input")
