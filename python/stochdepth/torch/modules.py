"""The PyTorch adapter's modules: `StochasticDepth` (two inputs) and drop-ins for timm's `DropPath`
and torchvision's `StochasticDepth`, seeded or not (docs/design.md, "Randomness in the
adapters")."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._op import OpConfig
from . import _mode, _ops
from ._checks import check_gamma, check_prob, check_tensor, check_tensors, check_torchvision
from ._keys import rank_key
from ._seeded import SeededMixin
from .functional import promote, torchvision_stochastic_depth


class StochasticDepth(SeededMixin, nn.Module):
    """Two-input stochastic depth: forward(shortcut, residual) = shortcut + keep * s * residual.

    Args:
        survival_prob: p in [0, 1], the probability of keeping a sample's residual.
        mode, scaling, axis: as in `stochastic_depth` (default scaling "inference": training
            adds the kept residuals unscaled, eval adds p * residual).
        seed: None draws a fresh mask source from torch's generator on every call; an integer
            gives a reproducible sequence (offset += 1 per training call, kept in state_dict).
        sync_across_ranks: see `stochastic_depth`.
    """

    def __init__(self, survival_prob: float, *, mode: str = "row", scaling: str = "inference",
                 axis: int = 0, seed: Optional[int] = None, sync_across_ranks: bool = False):
        super().__init__()
        config = OpConfig(survival_prob, mode, axis, scaling)
        self.survival_prob = config.survival_prob
        self.mode = config.mode
        self.scaling = config.scaling
        self.axis = config.axis
        self._init_rng(seed, sync_across_ranks)

    def forward(self, shortcut: Tensor, residual: Tensor) -> Tensor:
        shortcut, residual = promote(shortcut, residual)
        # The attributes as they are now (they may have been changed since __init__).
        config = OpConfig(self.survival_prob, self.mode, self.axis, self.scaling, self.training)
        eager = _mode.eager(self._rng_state, shortcut, residual)  # this call's one decision
        key = self._next_rng(residual, eager) if config.training else None
        check_tensors(shortcut, residual, config.axis)
        return _ops.forward(eager, shortcut, residual, key, config,
                            rank_key(self.sync_across_ranks))

    def extra_repr(self) -> str:
        return (f"survival_prob={self.survival_prob}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}, axis={self.axis}{self._seed_repr()}")


class DropPath(SeededMixin, nn.Module):
    """Drop-in for `timm.layers.DropPath(drop_prob, scale_by_keep)`: same constructor,
    attributes, `extra_repr` and (when unseeded) empty state_dict.

    Extra keyword-only options: `mode` ("row" as timm, or "batch"), `seed` (see
    `StochasticDepth`) and `sync_across_ranks`.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, *, mode: str = "row",
                 seed: Optional[int] = None, sync_across_ranks: bool = False):
        super().__init__()
        OpConfig(1.0 - check_prob("drop_prob", drop_prob), mode)  # checks mode
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep
        self.mode = mode
        self._init_rng(seed, sync_across_ranks)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        eager = _mode.eager(self._rng_state, x)  # this call's one decision
        key = self._next_rng(x, eager)  # advance even when drop_prob == 0: one per training call
        if self.drop_prob == 0.0:
            return x
        check_tensor("x", x)
        config = OpConfig(1.0 - float(self.drop_prob), self.mode, 0,
                          "training" if self.scale_by_keep else "inference")
        check_tensors(None, x, 0, "x")
        return _ops.forward(eager, None, x, key, config, rank_key(self.sync_across_ranks))

    def extra_repr(self) -> str:
        # timm's text exactly, plus the seed when one is set.
        return f"drop_prob={round(self.drop_prob, 3):0.3f}{self._seed_repr()}"


def promote_gamma(x: Tensor, residual: Tensor, gamma: Tensor):
    """x, residual and gamma in the dtype that timm's `x + drop_path(residual * gamma)` computes
    in (`torch.promote_types` of the three: under autocast a float32 gamma and a bfloat16 branch
    give float32)."""
    x, residual = promote(x, residual)
    common = torch.promote_types(residual.dtype, gamma.dtype)
    if common != residual.dtype:
        x, residual = x.to(common), residual.to(common)
    return x, residual, gamma.to(common)


class LayerScaleDropPath(SeededMixin, nn.Module):
    """timm's `x + drop_path(ls(residual))` (`LayerScale(dim, init_values)` then
    `DropPath(drop_prob, scale_by_keep)`) as one module and one op: forward(x, residual) =
    x + keep * s * (gamma * residual) (docs/design.md, "Layer scale").

    It owns the LayerScale's parameter as `gamma` (init `init_values * ones(dim)`), so a block
    that names it as timm names its LayerScale (`self.ls1 = LayerScaleDropPath(...)` in place of
    `ls1` and `drop_path1`) loads timm's state_dict: the key is `ls1.gamma`, and timm's drop
    path has no state. At eval, and with drop_prob 0, it is x + gamma * residual. `mode`,
    `seed` and `sync_across_ranks` as in `DropPath` (a seeded one adds `rng_state`).
    """

    def __init__(self, dim: int, init_values: float = 1e-5, drop_prob: float = 0.0,
                 scale_by_keep: bool = True, *, mode: str = "row", seed: Optional[int] = None,
                 sync_across_ranks: bool = False):
        super().__init__()
        OpConfig(1.0 - check_prob("drop_prob", drop_prob), mode)  # checks mode
        self.gamma = nn.Parameter(init_values * torch.ones(dim))
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep
        self.mode = mode
        self._init_rng(seed, sync_across_ranks)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        check_tensor("x", x)
        check_tensor("residual", residual)
        x, residual, gamma = promote_gamma(x, residual, self.gamma)
        key = None
        if self.training:
            eager = _mode.eager(self._rng_state, x, residual, gamma=gamma)  # one decision
            key = self._next_rng(residual, eager)  # advanced even with drop_prob 0, as DropPath
        else:
            eager = _mode.eager(x, residual, gamma=gamma)
        if not self.training or self.drop_prob == 0.0:
            # Where timm's drop path is the identity: the inference form with factor 1.
            config, key = OpConfig(1.0, self.mode, 0, "training", training=False), None
        else:
            config = OpConfig(1.0 - float(self.drop_prob), self.mode, 0,
                              "training" if self.scale_by_keep else "inference")
        check_tensors(x, residual, 0)
        check_gamma(gamma, residual, 0)
        return _ops.forward_gamma(eager, x, residual, gamma, key, config.survival_prob,
                                  config.training, config.batch_mode, 0, config.scaling,
                                  rank_key(self.sync_across_ranks))

    def extra_repr(self) -> str:
        return (f"dim={self.gamma.shape[0]}, drop_prob={round(self.drop_prob, 3):0.3f}"
                f"{self._seed_repr()}")


class TorchvisionStochasticDepth(SeededMixin, nn.Module):
    """Drop-in for `torchvision.ops.StochasticDepth(p, mode)` (p = drop probability).

    Same attributes (`p`, `mode`) and repr layout; extra keyword-only `seed` and
    `sync_across_ranks` as in `StochasticDepth`.
    """

    def __init__(self, p: float, mode: str, *, seed: Optional[int] = None,
                 sync_across_ranks: bool = False):
        super().__init__()
        self.p = p
        self.mode = mode
        self._init_rng(seed, sync_across_ranks)

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return torchvision_stochastic_depth(input, self.p, self.mode, False)
        eager = _mode.eager(self._rng_state, input)  # this call's one decision
        key = self._next_rng(input, eager)
        check_tensor("input", input)
        check_torchvision(self.p, self.mode)
        if self.p == 0.0:
            return input
        config = OpConfig(1.0 - float(self.p), self.mode, 0, "training")
        check_tensors(None, input, 0, "input")
        return _ops.forward(eager, None, input, key, config, rank_key(self.sync_across_ranks))

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode}{self._seed_repr()})"
