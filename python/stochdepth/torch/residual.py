"""StochasticResidual: stochastic depth that owns the branch and runs it on the kept samples only
(docs/design.md, "Skipping dropped samples").

    training:  k = kept samples; y = branch(x[k]); out = x, then out[k] += s * y
    inference: out = x + c * branch(x)

The mask is known on the host before the branch runs; the gather and the scatter-add are the
custom ops `stochdepth::gather_kept` and `stochdepth::scatter_kept` (re-exported here). Under
torch.compile the whole block is in the graph: `stochdepth::select_kept` gathers the kept samples
with the kept count as a data-dependent size, so one graph serves every mask (`_compiled`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _op
from .._op import OpConfig
from . import _mode, _ops, functional
from ._checks import check_tensor
from ._kernels import kept_count
from ._keys import Key, Rng, capturing, draw, host_rng, rank_key
from ._ops import gather_kept, scatter_kept
from ._seeded import SeededMixin

__all__ = ["StochasticResidual", "stochastic_residual", "scatter_kept", "gather_kept"]


def _settle(rng: Rng, rank, batch, survival_prob, batch_mode):
    """(the pair with this rank's seed, how many samples its mask keeps), on the host."""
    rng = rng.for_rank(rank)
    return Key(*rng), kept_count(batch, survival_prob, batch_mode, rng.seed, rng.offset)


# Traced outside torch.compile (make_fx, dispatch modes, functorch transforms) the mask is settled
# on the host, as in eager mode, with the pair as the traced code holds it.
@torch.compiler.disable
def _settle_outside_graph(rng, rank, batch, survival_prob, batch_mode):
    # `rng` as the traced code holds it: an Rng given as constants, or a CPU tensor (a draw in
    # the graph, or the module's state), read here, outside the graph.
    key, n_kept = _settle(Rng.of(rng) if isinstance(rng, Tensor) else rng, rank, batch,
                          survival_prob, batch_mode)
    return key.tensor(), n_kept


@torch.compiler.disable
def _module_rng_outside_graph(module) -> Tensor:
    # Reads and advances the module's state (or draws from torch's generator) eagerly, as an
    # eager call would.
    return module._host_rng().tensor()


def _residual(eager, x, branch, config, rng, rank):
    """Training: run `branch` on the kept samples of `x` only, then scatter-add into `x`. The
    path is the entry's (`eager`): `rng` is then a host Rng, else what _settle_outside_graph
    reads."""
    batch, p, batch_mode = x.shape[0], config.survival_prob, config.batch_mode
    if capturing(x):
        raise RuntimeError(
            "StochasticResidual cannot be captured in a CUDA graph: the kept count sizes the "
            "branch's input, so the mask is read on the host (docs/design.md, \"CUDA\"); use "
            "StochasticDepth or drop_path in captured code")
    settle = _settle if eager else _settle_outside_graph
    key, n_kept = settle(rng, rank, batch, p, batch_mode)
    if n_kept == 0:
        return x  # nothing kept ("batch" mode, or p = 0): the branch does not run at all
    # The kept samples, gathered by the library's kernel with factor 1 (scaling "inference").
    kept_x = x if n_kept == batch else _ops.gather(eager, x, key, p, batch_mode, "inference",
                                                   n_kept)
    y = branch(kept_x)
    if y.shape[1:] != x.shape[1:] or y.shape[0] != n_kept:
        raise ValueError(f"branch must keep the shape of its input, got {tuple(y.shape)} for "
                         f"an input of shape ({n_kept}, {', '.join(map(str, x.shape[1:]))})")
    if y.dtype != x.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    return _ops.scatter(eager, x, y, key, p, batch_mode, config.scaling, batch)


def _compiled(x, branch, config, rng: Tensor, rank: int) -> Tensor:
    """Training inside torch.compile (or torch.export): the block in the graph (with
    fullgraph=True; without, dynamo's default breaks the graph at select_kept, an op whose output
    size depends on data). `rng` is the pair as a graph value (a constant, a draw or the
    module's state). The kept count is a data-dependent size of select_kept's output
    (docs/design.md, "Skipping dropped samples"): one graph for every mask, the branch run on
    exactly the kept samples, so the same bits as eager mode. p = 0 and p = 1 are static:
    nothing and everything kept, as eager.
    """
    p, batch_mode = config.survival_prob, config.batch_mode
    if p == 0.0:
        return x  # nothing kept: the branch does not run at all
    if rank >= 0:
        rng = _ops.rank_rng(rng, rank)
    kept_x = x if p == 1.0 else _ops.select_kept(x, rng, p, batch_mode)
    y = branch(kept_x)
    if y.shape[1:] != x.shape[1:] or y.shape[0] != kept_x.shape[0]:
        raise ValueError(f"branch must keep the shape of its input, got {tuple(y.shape)} for "
                         f"an input of shape {tuple(kept_x.shape)}")
    if y.dtype != x.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    return _ops.scatter(False, x, y, rng, p, batch_mode, config.scaling, x.shape[0])


def _check_x(x) -> None:
    check_tensor("x", x)
    _op.check_rank("x", x.dim())


def _inference(x, branch, config) -> Tensor:
    """x + c * branch(x), through the functions' common part (the config already checked)."""
    shortcut, residual = functional.promote(x, branch(x))
    return functional.run(shortcut, residual, config, None, 0, None, False)


def stochastic_residual(x: Tensor, branch, survival_prob: float, training: bool = True, *,
                        mode: str = "row", scaling: str = "inference", seed: Optional[int] = None,
                        offset: int = 0, generator: Optional[torch.Generator] = None,
                        sync_across_ranks: bool = False) -> Tensor:
    """``x + keep * s * branch(x)`` that runs `branch` on the kept samples (dim 0) only.

    Same mask, scalings and randomness rules as `stochastic_depth(x, branch(x), ...)`. For a
    branch that treats samples independently the result is the same; a branch with batch
    statistics (BatchNorm in training mode) sees only the kept samples, so its outputs differ.
    """
    _check_x(x)
    config = OpConfig(survival_prob, mode, 0, scaling, training)
    if not config.training:
        return _inference(x, branch, config)
    eager = _mode.eager(x)  # this call's one decision
    rank = rank_key(sync_across_ranks)
    if not eager and torch.compiler.is_compiling():
        # The pair as a graph value: a new draw does not recompile. A CPU tensor, read on the
        # host by the ops (a CUDA generator's draw is copied to the host, as eagerly).
        rng = draw(generator) if seed is None else host_rng(seed, offset, None).tensor()
        return _compiled(x, branch, config, rng, rank)
    # Inside a traced graph an unseeded draw stays a graph value (read outside the graph).
    rng = draw(generator) if seed is None and not eager else host_rng(seed, offset, generator)
    return _residual(eager, x, branch, config, rng, rank)


class StochasticResidual(SeededMixin, nn.Module):
    """``x + keep * s * branch(x)``, running `branch` only on the samples it keeps.

    Args:
        branch: any module mapping (n, ...) to (n, ...) sample-wise.
        survival_prob: p in [0, 1].
        mode: "row" (per sample) or "batch" (a dropped call skips the branch entirely).
        scaling: "inference" (the paper: eval adds p * branch(x)) or "training" (timm: 1/p).
        seed: None draws from torch's generator each call; an integer gives a reproducible
            sequence (offset += 1 per training call, kept in state_dict), as `StochasticDepth`.
        sync_across_ranks: as `StochasticDepth`.
    """

    _uses_device_words = False  # the kept count is read on the host: no device words

    def __init__(self, branch: nn.Module, survival_prob: float, *, mode: str = "row",
                 scaling: str = "inference", seed: Optional[int] = None,
                 sync_across_ranks: bool = False):
        super().__init__()
        config = OpConfig(survival_prob, mode, 0, scaling)
        self.survival_prob = config.survival_prob
        self.branch = branch
        self.mode = config.mode
        self.scaling = config.scaling
        self._init_rng(seed, sync_across_ranks)

    def forward(self, x: Tensor) -> Tensor:
        # The attributes as they are now (they may have been changed since __init__).
        config = OpConfig(self.survival_prob, self.mode, 0, self.scaling, self.training)
        if not config.training:
            return _inference(x, self.branch, config)
        _check_x(x)
        eager = _mode.eager(x)  # this call's one decision
        rank = rank_key(self.sync_across_ranks)
        if not eager and torch.compiler.is_compiling():
            # A graph value: the state read and replaced in the graph (`_next_rng`), or a draw
            # from torch's CPU generator, as eager mode draws.
            rng = draw(None) if self._rng_state is None else self._next_rng(x, False)
            return _compiled(x, self.branch, config, rng, rank)
        rng = self._host_rng() if eager else _module_rng_outside_graph(self)
        return _residual(eager, x, self.branch, config, rng, rank)

    def extra_repr(self) -> str:
        return (f"survival_prob={self.survival_prob}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}{self._seed_repr()}")
