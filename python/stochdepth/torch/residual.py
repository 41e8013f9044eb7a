"""StochasticResidual: stochastic depth that skips the dropped samples' work.

A layer that receives an already computed residual cannot make training cheaper: the branch has
run on every sample. This wrapper owns the branch instead. The mask is a pure function of
(seed, offset, batch) computed on the host (DESIGN.md), so the kept samples are known before the
branch runs, with no device synchronisation:

    training:  k = kept samples; y = branch(x[k]); out = x, then out[k] += s * y
    inference: out = x + c * branch(x)

The scatter-add (forward) and the gather of grad_out at the kept samples (backward) are the
library's compact-row kernels (`_core.run_raw(..., compact_input=True / compact_output=True)`,
CPU and CUDA), exposed as the custom ops `stochdepth::scatter_kept` and
`stochdepth::gather_kept`. The result equals `stochastic_depth(x, branch(x), ...)` with the same
seed and offset for any branch that treats samples independently; a branch with batch
statistics (BatchNorm in training mode) sees only the kept samples, so its statistics, and hence
its outputs, differ from the dense computation.

torch.compile: drawing the mask and selecting the kept samples happen in functions excluded
from compilation (`torch.compiler.disable`): at most one deliberate graph break per wrapper call
(torch 2.13 traces around them without one). The branch and the scatter compile normally (the
kept count is a dynamic size).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _core
from .. import mask as _mask
from . import (
    _CORE_DTYPES,
    _CORE_SCALINGS,
    _M64,
    _SCALINGS,
    _STEP,
    _check_mode,
    _check_prob,
    _check_u64,
    _device_and_stream,
    _draw_rng,
    _eager_ok,
    _rank_key,
    _rng_tensor,
    _SeededMixin,
    rank_seed,
    stochastic_depth,
)

__all__ = ["StochasticResidual", "stochastic_residual", "scatter_kept", "gather_kept"]


def _launch_compact(shortcut, src, out, rng, survival_prob, batch_mode, scaling, *, batch,
                    compact_input, checked=False):
    """run_raw with compact rows along dim 0: `batch` is the full batch size.

    Unless the caller computed it from the same mask (`checked`), the compact side's row count
    is checked against the mask first: the kernel trusts it, and a wrong count would read or
    write past a buffer.
    """
    compact = src if compact_input else out
    seed, offset = (w & _M64 for w in (rng if isinstance(rng, tuple) else rng.tolist()))
    if not checked:
        mode = "batch" if batch_mode else "row"
        n_kept = int(_mask(batch, survival_prob, seed=seed, offset=offset, mode=mode).sum())
        if compact.shape[0] != n_kept:
            raise ValueError(f"the kept samples' tensor must have {n_kept} rows (the mask keeps "
                             f"{n_kept} of {batch}), got {compact.shape[0]}")
    full = out if compact_input else src
    if full.numel() == 0:
        return
    device, stream = _device_and_stream(full)
    _core.run_raw(
        0 if shortcut is None else shortcut.data_ptr(), src.data_ptr(), out.data_ptr(),
        1, batch, full.numel() // batch, _CORE_DTYPES[src.dtype], float(survival_prob), True,
        bool(batch_mode), _CORE_SCALINGS[scaling], seed, offset, device, stream,
        compact_input=compact_input, compact_output=not compact_input,
    )


def _scatter(shortcut, kept, rng, survival_prob, batch_mode, scaling, batch, checked=False):
    kept = kept.contiguous()
    if shortcut is not None:
        shortcut = shortcut.contiguous()
        out = torch.empty_like(shortcut)
    else:
        out = kept.new_empty((batch,) + tuple(kept.shape[1:]))
    _launch_compact(shortcut, kept, out, rng, survival_prob, batch_mode, scaling, batch=batch,
                    compact_input=True, checked=checked)
    return out


def _gather(full, rng, survival_prob, batch_mode, scaling, n_kept, checked=False):
    full = full.contiguous()
    out = full.new_empty((n_kept,) + tuple(full.shape[1:]))
    _launch_compact(None, full, out, rng, survival_prob, batch_mode, scaling,
                    batch=full.shape[0], compact_input=False, checked=checked)
    return out


@torch.library.custom_op("stochdepth::scatter_kept", mutates_args=())
def scatter_kept(shortcut: Optional[Tensor], kept: Tensor, rng: Tensor, survival_prob: float,
                 batch_mode: bool, scaling: str, batch: int) -> Tensor:
    """The full-batch tensor with row k = shortcut[k] + s * kept[j] for the j-th kept sample k
    (dim 0) and shortcut[k] for a dropped one; without a shortcut, s * kept[j] and zeros.

    `rng` is the int64 [seed, offset] CPU tensor of the mask (the seed as used, rank included).
    """
    return _scatter(shortcut, kept, rng, survival_prob, batch_mode, scaling, batch)


@scatter_kept.register_fake
def _(shortcut, kept, rng, survival_prob, batch_mode, scaling, batch):
    return kept.new_empty((batch,) + tuple(kept.shape[1:]))


@torch.library.custom_op("stochdepth::gather_kept", mutates_args=())
def gather_kept(full: Tensor, rng: Tensor, survival_prob: float, batch_mode: bool,
                scaling: str, n_kept: int) -> Tensor:
    """s * full at the kept samples (dim 0), in order. With scaling "inference" s = 1: a plain
    selection of the kept samples (the branch's input); with the op's scaling, the branch
    output's gradient."""
    return _gather(full, rng, survival_prob, batch_mode, scaling, n_kept)


@gather_kept.register_fake
def _(full, rng, survival_prob, batch_mode, scaling, n_kept):
    return full.new_empty((n_kept,) + tuple(full.shape[1:]))


# Both ops save only `rng` (16 bytes) for backward: the mask is recomputed, never stored.

def _scatter_setup(ctx, inputs, output):
    shortcut, kept, rng, survival_prob, batch_mode, scaling, _ = inputs
    ctx.save_for_backward(rng)
    ctx.args = (survival_prob, batch_mode, scaling)
    ctx.n_kept = kept.shape[0]
    ctx.has_shortcut = shortcut is not None


def _scatter_backward(ctx, grad):
    (rng,) = ctx.saved_tensors
    g_kept = gather_kept(grad, rng, *ctx.args, ctx.n_kept) if ctx.needs_input_grad[1] else None
    g_sc = grad if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return g_sc, g_kept, None, None, None, None, None


scatter_kept.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def _gather_setup(ctx, inputs, output):
    full, rng, survival_prob, batch_mode, scaling, _ = inputs
    ctx.save_for_backward(rng)
    ctx.args = (survival_prob, batch_mode, scaling)
    ctx.batch = full.shape[0]


def _gather_backward(ctx, grad):
    # gather_kept is linear; its adjoint puts s * grad at the kept samples and 0 elsewhere.
    (rng,) = ctx.saved_tensors
    return scatter_kept(None, grad, rng, *ctx.args, ctx.batch), None, None, None, None, None


gather_kept.register_autograd(_gather_backward, setup_context=_gather_setup)


def _kept_count_eager(batch: int, survival_prob: float, mode: str, rng: Tensor) -> int:
    """How many samples the mask of `rng` = [seed, offset] keeps (host only, no device sync)."""
    seed, offset = (w & _M64 for w in rng.tolist())
    return int(_mask(batch, survival_prob, seed=seed, offset=offset, mode=mode).sum())


_kept_count = torch.compiler.disable(_kept_count_eager)


# ---- eager fast path: the same kernels through autograd.Function, without the custom-op
# dispatch (tens of microseconds a call in torch 2.13; four calls a block a step), as
# stochdepth.torch does for the dense op. Compiled and traced code uses the custom ops above.

class _GatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, words, survival_prob, batch_mode, scaling, n_kept):
        ctx.args = (words, survival_prob, batch_mode, scaling, full.shape[0], n_kept)
        return _gather(full, words, survival_prob, batch_mode, scaling, n_kept, checked=True)

    @staticmethod
    def backward(ctx, grad):
        words, survival_prob, batch_mode, scaling, batch, n_kept = ctx.args
        return (_ScatterFn.apply(None, grad, words, survival_prob, batch_mode, scaling, batch),
                None, None, None, None, None)


class _ScatterFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shortcut, kept, words, survival_prob, batch_mode, scaling, batch):
        ctx.args = (words, survival_prob, batch_mode, scaling, kept.shape[0])
        ctx.has_shortcut = shortcut is not None
        return _scatter(shortcut, kept, words, survival_prob, batch_mode, scaling, batch,
                        checked=True)

    @staticmethod
    def backward(ctx, grad):
        words, survival_prob, batch_mode, scaling, n_kept = ctx.args
        g_kept = (_GatherFn.apply(grad, words, survival_prob, batch_mode, scaling, n_kept)
                  if ctx.needs_input_grad[1] else None)
        g_sc = grad if ctx.has_shortcut and ctx.needs_input_grad[0] else None
        return g_sc, g_kept, None, None, None, None, None


def _for_this_rank(words: Tensor, sync_across_ranks: bool) -> Tensor:
    """[seed, offset] with the seed as this distributed rank uses it (see stochdepth.torch)."""
    rank = _rank_key(sync_across_ranks)
    if rank < 0:
        return words
    s, o = (w & _M64 for w in words.tolist())
    return _rng_tensor(rank_seed(s, rank), o)


def _call_rng(seed, offset, generator, sync_across_ranks):
    words = _draw_rng(generator) if seed is None else _rng_tensor(_check_u64("seed", seed),
                                                                  _check_u64("offset", offset))
    return _for_this_rank(words, sync_across_ranks)


def _residual(x, branch, survival_prob, mode, scaling, rng):
    """Training: run `branch` on the kept samples of `x` only, then scatter-add into `x`."""
    batch = x.shape[0]
    eager = _eager_ok(None, x)
    n_kept = (_kept_count_eager if eager else _kept_count)(batch, survival_prob, mode, rng)
    if n_kept == 0:
        return x  # nothing kept ("batch" mode, or p = 0): the branch does not run at all
    batch_mode = mode == "batch"
    words = tuple(w & _M64 for w in rng.tolist()) if eager else None
    # The kept samples, gathered by the library's kernel with factor 1 (scaling "inference").
    if n_kept == batch:
        kept_x = x
    elif eager:
        kept_x = _GatherFn.apply(x, words, survival_prob, batch_mode, "inference", n_kept)
    else:
        kept_x = gather_kept(x, rng, survival_prob, batch_mode, "inference", n_kept)
    y = branch(kept_x)
    if y.shape[1:] != x.shape[1:] or y.shape[0] != n_kept:
        raise ValueError(f"branch must keep the shape of its input, got {tuple(y.shape)} for "
                         f"an input of shape ({n_kept}, {', '.join(map(str, x.shape[1:]))})")
    if y.dtype != x.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    if eager and _eager_ok(x, y):
        return _ScatterFn.apply(x, y, words, float(survival_prob), batch_mode, scaling, batch)
    return scatter_kept(x, y, rng, float(survival_prob), batch_mode, scaling, batch)


def stochastic_residual(x: Tensor, branch, survival_prob: float, training: bool = True, *,
                        mode: str = "row", scaling: str = "inference", seed: Optional[int] = None,
                        offset: int = 0, generator: Optional[torch.Generator] = None,
                        sync_across_ranks: bool = False) -> Tensor:
    """``x + keep * s * branch(x)`` that runs `branch` on the kept samples (dim 0) only.

    Same mask, scalings and randomness rules as `stochastic_depth(x, branch(x), ...)`; see the
    module docstring for when the results are identical.
    """
    _check_prob("survival_prob", survival_prob)
    _check_mode(mode)
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
    if x.dim() < 1:
        raise ValueError("x must have rank >= 1 (a sample axis), got a 0-d tensor")
    if not training:
        return stochastic_depth(x, branch(x), survival_prob, False, mode=mode, scaling=scaling)
    rng = _call_rng(seed, offset, generator, sync_across_ranks)
    return _residual(x, branch, survival_prob, mode, scaling, rng)


class StochasticResidual(_SeededMixin, nn.Module):
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

    def __init__(self, branch: nn.Module, survival_prob: float, *, mode: str = "row",
                 scaling: str = "inference", seed: Optional[int] = None,
                 sync_across_ranks: bool = False):
        super().__init__()
        _check_prob("survival_prob", survival_prob)
        _check_mode(mode)
        if scaling not in _SCALINGS:
            raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
        self.branch = branch
        self.survival_prob = float(survival_prob)
        self.mode = mode
        self.scaling = scaling
        self._init_rng(seed, sync_across_ranks)

    def _step_rng(self) -> Tensor:
        if _eager_ok(None, torch.empty(0)):
            return self._step_rng_eager()
        return self._step_rng_compiled()

    def _step_rng_eager(self) -> Tensor:
        # Outside the compiled graph (the deliberate break): read and advance the module's
        # [seed, offset], or draw a fresh pair; the rank enters the seed here.
        state = self._rng_state
        if state is None:
            words = _draw_rng(None)
        else:
            words = state.clone()
            state.add_(_STEP)
        return _for_this_rank(words, self.sync_across_ranks)

    @torch.compiler.disable
    def _step_rng_compiled(self) -> Tensor:
        return self._step_rng_eager()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return stochastic_depth(x, self.branch(x), self.survival_prob, False, mode=self.mode,
                                    scaling=self.scaling)
        return _residual(x, self.branch, self.survival_prob, self.mode, self.scaling,
                         self._step_rng())

    def extra_repr(self) -> str:
        return (f"survival_prob={self.survival_prob}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}{self._seed_repr()}")
