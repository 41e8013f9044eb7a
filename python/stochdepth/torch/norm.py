"""The fused pre-norm block tail in PyTorch (docs/design.md, "Fused residual and norm"):
`stochastic_depth_norm(shortcut, residual, p, weight, bias)` -> (y, n) and the module
`StochasticDepthNorm`, on the custom ops `stochdepth::norm_fwd` / `stochdepth::norm_bwd` with
fake kernels and registered autograd (torch.compile traces them without a graph break).

    y = shortcut + keep[b] * s * (gamma * residual)
    n = LayerNorm(y; weight, bias, eps) or RMSNorm(y; weight, eps) over the last axis

The mask is the one `stochastic_depth` draws for the same (seed, offset); backward saves y and
the 16-byte [seed, offset] tensor, never a mask or a row statistic. The bits are those of
`stochdepth.reference.forward_norm` / `backward_norm`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .. import _norm
from .._op import check_mode, check_scaling
from . import _mode
from ._checks import check_prob, check_rng, check_tensor
from ._keys import Rng, host_rng, rank_key, traced_rng
from ._seeded import SeededMixin
from .functional import promote

__all__ = ["stochastic_depth_norm", "StochasticDepthNorm"]

NORMS = ("layer", "rms")


def _check_norm(norm, eps) -> float:
    if not isinstance(norm, str):
        raise TypeError(f"norm must be 'layer' or 'rms', got {type(norm).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if isinstance(eps, (bool, Tensor, complex, str)) or not hasattr(eps, "__float__"):
        raise TypeError(f"eps must be a positive real number, got {type(eps).__name__}")
    if not (float(eps) > 0 and math.isfinite(float(eps))):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    return float(eps)


def _check_args(like: Tensor, like_name: str, others, vectors, norm: str, has_bias: bool) -> None:
    """Shapes and dtypes, with the raw API's messages (also run by the fake kernels)."""
    if like.dim() < 2:
        raise ValueError(f"{like_name} must have rank >= 2 (samples along axis 0, channels along "
                         f"the last axis), got shape {tuple(like.shape)}")
    for name, t in others:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} like {like_name}, got {t.dtype}")
        if t.shape != like.shape:
            raise ValueError(f"{name} must have shape {tuple(like.shape)} like {like_name}, got "
                             f"{tuple(t.shape)}")
    c = like.shape[-1]
    for name, v in vectors:
        if v is None:
            continue
        if v.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} like {like_name}, got {v.dtype}")
        if tuple(v.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) (the last axis of {like_name}), got "
                             f"{tuple(v.shape)}")
    if norm == "rms" and has_bias:
        raise ValueError("bias must be None for norm='rms' (RMSNorm has no bias)")


def _plain(t: Optional[Tensor]) -> Optional[Tensor]:
    """What the raw API reads: contiguous, without autograd (DLPack refuses tensors that
    require grad)."""
    return None if t is None else t.detach().contiguous()


def _seed_offset(rng: Optional[Tensor], rank: int):
    if rng is None:
        return 0, 0
    key = Rng.of(rng).for_rank(rank)
    return key.seed, key.offset


def _torch(a) -> Optional[Tensor]:
    return None if a is None else torch.from_dlpack(a)


# ---- the ops ----------------------------------------------------------------------------------


@torch.library.custom_op("stochdepth::norm_fwd", mutates_args=())
def norm_fwd(
    shortcut: Tensor,
    residual: Tensor,
    gamma: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    rng: Optional[Tensor],
    survival_prob: float,
    norm: str,
    eps: float,
    training: bool,
    batch_mode: bool,
    scaling: str,
    rank: int,
) -> tuple[Tensor, Tensor]:
    """(y, n) of the fused residual and norm; `rng` the int64 CPU tensor [seed, offset] (None at
    inference), `rank` >= 0 replaces the seed by `rank_seed(seed, rank)`."""
    check_rng(rng)
    seed, offset = _seed_offset(rng, rank)
    y, n = _norm.forward_norm(
        _plain(shortcut), _plain(residual), survival_prob, _plain(weight), _plain(bias),
        norm=norm, eps=eps, gamma=_plain(gamma), seed=seed, offset=offset, training=training,
        mode="batch" if batch_mode else "row", scaling=scaling)
    return _torch(y), _torch(n)


@norm_fwd.register_fake
def _(shortcut, residual, gamma, weight, bias, rng, survival_prob, norm, eps, training,
      batch_mode, scaling, rank):
    check_rng(rng)
    _check_args(shortcut, "shortcut", [("residual", residual)],
                [("gamma", gamma), ("weight", weight), ("bias", bias)], norm, bias is not None)
    return shortcut.new_empty(shortcut.shape), shortcut.new_empty(shortcut.shape)


@torch.library.custom_op("stochdepth::norm_bwd", mutates_args=())
def norm_bwd(
    grad_y: Tensor,
    grad_n: Tensor,
    y: Tensor,
    residual: Optional[Tensor],
    gamma: Optional[Tensor],
    weight: Optional[Tensor],
    has_bias: bool,
    rng: Optional[Tensor],
    survival_prob: float,
    norm: str,
    eps: float,
    training: bool,
    batch_mode: bool,
    scaling: str,
    rank: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_shortcut, grad_residual, grad_gamma, grad_weight, grad_bias); a parameter that is
    absent gets an empty tensor of shape (0,). `residual` is read with gamma only."""
    check_rng(rng)
    seed, offset = _seed_offset(rng, rank)
    y = _plain(y)
    bias = y.new_empty(y.shape[-1]) if has_bias else None  # only its presence is read
    got = _norm.backward_norm(
        _plain(grad_y), _plain(grad_n), y, _plain(residual) if gamma is not None else None,
        survival_prob, _plain(weight), bias, norm=norm, eps=eps, gamma=_plain(gamma), seed=seed,
        offset=offset, training=training, mode="batch" if batch_mode else "row",
        scaling=scaling)
    return tuple(y.new_empty(0) if a is None else _torch(a) for a in got)


@norm_bwd.register_fake
def _(grad_y, grad_n, y, residual, gamma, weight, has_bias, rng, survival_prob, norm, eps,
      training, batch_mode, scaling, rank):
    check_rng(rng)
    others = [("grad_y", grad_y), ("grad_n", grad_n)]
    if gamma is not None:
        others.append(("residual", residual))
    _check_args(y, "y", others, [("gamma", gamma), ("weight", weight)], norm, has_bias)
    c = y.shape[-1]

    def vec(present):
        return y.new_empty(c if present else 0)

    return (y.new_empty(y.shape), y.new_empty(y.shape), vec(gamma is not None),
            vec(weight is not None), vec(has_bias))


def _setup(ctx, inputs, output):
    shortcut, residual, gamma, weight, bias, rng, *args = inputs
    ctx.args = tuple(args)
    ctx.has = (gamma is not None, weight is not None, bias is not None)
    ctx.save_for_backward(output[0], residual if gamma is not None else None, gamma, weight,
                          rng)


def _backward(ctx, grad_y, grad_n):
    y, residual, gamma, weight, rng = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_n is None:
        grad_n = torch.zeros_like(y)
    g_sc, g_res, g_gamma, g_w, g_b = norm_bwd(grad_y, grad_n, y, residual, gamma, weight,
                                              ctx.has[2], rng, *ctx.args)
    has_gamma, has_weight, has_bias = ctx.has
    return (g_sc, g_res, g_gamma if has_gamma else None, g_w if has_weight else None,
            g_b if has_bias else None) + (None,) * 8


norm_fwd.register_autograd(_backward, setup_context=_setup)


# ---- the public function and module -----------------------------------------------------------


def _run(shortcut, residual, survival_prob, weight, bias, norm, eps, gamma, rng, training, mode,
         scaling, rank):
    shortcut, residual = promote(shortcut, residual)
    for name, v in (("gamma", gamma), ("weight", weight), ("bias", bias)):
        if v is not None:
            check_tensor(name, v)
    _check_args(shortcut, "shortcut", [("residual", residual)],
                [("gamma", gamma), ("weight", weight), ("bias", bias)], norm, bias is not None)
    return norm_fwd(shortcut, residual, gamma, weight, bias, rng, survival_prob, norm,
                    eps, bool(training), mode == "batch", scaling, rank)


def stochastic_depth_norm(
    shortcut: Tensor,
    residual: Tensor,
    survival_prob: float,
    weight: Optional[Tensor],
    bias: Optional[Tensor] = None,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    gamma: Optional[Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    training: bool = True,
    mode: str = "row",
    scaling: str = "inference",
    generator: Optional[torch.Generator] = None,
    sync_across_ranks: bool = False,
) -> tuple[Tensor, Tensor]:
    """The fused pre-norm block tail: (y, n) with y = shortcut + keep[b] * s * (gamma * residual)
    and n = LayerNorm(y; weight, bias, eps) (norm="layer") or RMSNorm(y; weight, eps)
    (norm="rms") over the last axis.

    Inputs have shape (B, ..., C), samples along dim 0; weight, bias and gamma shape (C,) and the
    inputs' dtype (each may be None; RMSNorm takes no bias). survival_prob, seed, offset,
    training, mode, scaling, generator and sync_across_ranks as in `stochastic_depth`: the same
    arguments give the same mask. Differentiable in shortcut, residual, gamma, weight and bias.
    """
    survival_prob = check_prob("survival_prob", survival_prob)
    eps = _check_norm(norm, eps)
    check_mode(mode)
    check_scaling(scaling)
    check_tensor("residual", residual)
    rng = None
    if training:  # the op's rng: on the host when eager (as `stochastic_depth`), else traced
        rng = (host_rng(seed, offset, generator).tensor() if _mode.eager(residual)
               else traced_rng(seed, offset, generator, residual))
    return _run(shortcut, residual, survival_prob, weight, bias, norm, eps, gamma, rng, training,
                mode, scaling, rank_key(sync_across_ranks))


class StochasticDepthNorm(SeededMixin, nn.Module):
    """The block tail as a module: forward(shortcut, residual) -> (y, n), holding the norm's
    weight (ones) and bias (zeros; LayerNorm only) when `elementwise_affine`, and the layer scale
    gamma (filled with `layer_scale_init`) when that is given.

    Args:
        dim: C, the width of the last axis.
        survival_prob, mode, scaling, seed, sync_across_ranks: as in `StochasticDepth` (a seeded
            module advances its offset by one per training call and keeps it in state_dict).
        norm: "layer" or "rms". eps: added to the variance (mean square).
    """

    def __init__(self, dim: int, survival_prob: float, *, norm: str = "layer", eps: float = 1e-6,
                 elementwise_affine: bool = True, layer_scale_init: Optional[float] = None,
                 mode: str = "row", scaling: str = "inference", seed: Optional[int] = None,
                 sync_across_ranks: bool = False):
        super().__init__()
        self.dim = int(dim)
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.survival_prob = check_prob("survival_prob", survival_prob)
        self.eps = _check_norm(norm, eps)
        check_mode(mode)
        check_scaling(scaling)
        self.norm, self.mode, self.scaling = norm, mode, scaling
        self.weight = nn.Parameter(torch.ones(self.dim)) if elementwise_affine else None
        self.bias = (nn.Parameter(torch.zeros(self.dim))
                     if elementwise_affine and norm == "layer" else None)
        self.gamma = (None if layer_scale_init is None
                      else nn.Parameter(torch.full((self.dim,), float(layer_scale_init))))
        self._init_rng(seed, sync_across_ranks)

    def forward(self, shortcut: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        shortcut, residual = promote(shortcut, residual)

        def cast(p):  # parameters in the inputs' dtype (differentiable)
            return None if p is None else p.to(residual.dtype)

        rng = None
        if self.training:  # eagerly the host pair (replayed under activation checkpointing)
            rng = (self._host_rng().tensor() if _mode.eager(residual)
                   else self._next_rng(residual, False))
        return _run(shortcut, residual, self.survival_prob, cast(self.weight), cast(self.bias),
                    self.norm, self.eps, cast(self.gamma), rng, self.training, self.mode,
                    self.scaling, rank_key(self.sync_across_ranks))

    def extra_repr(self) -> str:
        return (f"{self.dim}, survival_prob={self.survival_prob}, norm={self.norm!r}, "
                f"eps={self.eps}, mode={self.mode!r}, scaling={self.scaling!r}"
                f"{self._seed_repr()}")
