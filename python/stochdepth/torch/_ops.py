"""The PyTorch adapter's custom ops, one autograd definition each, and the eager fast path that
reuses that definition (docs/design.md, "Randomness in the adapters").

Each op has one body (`_kernels`), one setup_context and one backward. `torch.library` registers
them for the op; the eager fast path wraps the same three functions in a small
`torch.autograd.Function`, which skips the dispatcher's per-call cost for plain eager tensors.
`forward`, `backward`, `scatter` and `gather` below pick the path with `_mode.eager`; everything
else in the adapter calls those four. Backward recomputes the mask from (seed, offset): an eager
call keeps the pair as Python ints and saves no tensor; a traced one saves the 16-byte rng tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _kernels, _mode
from ._checks import check_op_args, check_rng
from ._keys import as_key, as_tensor

# ---- the ops ----------------------------------------------------------------------------------


@torch.library.custom_op("stochdepth::drop_path_fwd", mutates_args=())
def drop_path_fwd(
    shortcut: Optional[Tensor],
    residual: Tensor,
    rng: Optional[Tensor],
    survival_prob: float,
    training: bool,
    batch_mode: bool,
    axis: int,
    scaling: str,
    rank: int,
) -> Tensor:
    """out = shortcut + keep * s * residual (shortcut None: keep * s * residual).

    `rng` is an int64 CPU tensor [seed, offset] (needed when training, else may be None); `rank`
    >= 0 replaces the seed by `rank_seed(seed, rank)`, -1 keeps it. Non-contiguous inputs are
    made contiguous; the output is a new C-contiguous tensor.
    """
    check_rng(rng)
    return _kernels.forward(shortcut, residual, as_key(rng), survival_prob, training,
                            batch_mode, axis, scaling, rank)


@drop_path_fwd.register_fake
def _(shortcut, residual, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    check_rng(rng)
    check_op_args(shortcut, residual, survival_prob, axis, scaling)
    return residual.new_empty(residual.shape)


@torch.library.custom_op("stochdepth::drop_path_bwd", mutates_args=())
def drop_path_bwd(
    grad_out: Tensor,
    rng: Optional[Tensor],
    survival_prob: float,
    training: bool,
    batch_mode: bool,
    axis: int,
    scaling: str,
    rank: int,
) -> Tensor:
    """grad_residual = keep * s * grad_out (the mask recomputed from rng = [seed, offset]).

    The shortcut's gradient is grad_out itself and needs no op.
    """
    check_rng(rng)
    return _kernels.backward(grad_out, as_key(rng), survival_prob, training, batch_mode, axis,
                             scaling, rank)


@drop_path_bwd.register_fake
def _(grad_out, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    check_rng(rng)
    check_op_args(None, grad_out, survival_prob, axis, scaling)
    return grad_out.new_empty(grad_out.shape)


@torch.library.custom_op("stochdepth::scatter_kept", mutates_args=())
def scatter_kept(shortcut: Optional[Tensor], kept: Tensor, rng: Tensor, survival_prob: float,
                 batch_mode: bool, scaling: str, batch: int) -> Tensor:
    """The full-batch tensor with row k = shortcut[k] + s * kept[j] for the j-th kept sample k
    (dim 0) and shortcut[k] for a dropped one; without a shortcut, s * kept[j] and zeros.

    `rng` is the int64 [seed, offset] CPU tensor of the mask (the seed as used, rank included).
    """
    check_rng(rng)
    return _kernels.scatter(shortcut, kept, as_key(rng), survival_prob, batch_mode, scaling,
                            batch)


@scatter_kept.register_fake
def _(shortcut, kept, rng, survival_prob, batch_mode, scaling, batch):
    check_rng(rng)
    return kept.new_empty((batch,) + tuple(kept.shape[1:]))


@torch.library.custom_op("stochdepth::gather_kept", mutates_args=())
def gather_kept(full: Tensor, rng: Tensor, survival_prob: float, batch_mode: bool,
                scaling: str, n_kept: int) -> Tensor:
    """s * full at the kept samples (dim 0), in order. With scaling "inference" s = 1: a plain
    selection of the kept samples (the branch's input); with the op's scaling, the branch
    output's gradient."""
    check_rng(rng)
    return _kernels.gather(full, as_key(rng), survival_prob, batch_mode, scaling, n_kept)


@gather_kept.register_fake
def _(full, rng, survival_prob, batch_mode, scaling, n_kept):
    check_rng(rng)
    return full.new_empty((n_kept,) + tuple(full.shape[1:]))


# ---- autograd: one setup_context and one backward per op, for both paths ---------------------


def _keep_rng(ctx, rng) -> None:
    """Keep (seed, offset) for backward: Python ints when the values can be read now, else (in a
    traced graph) the 16-byte rng tensor, or CUDA words as they are (the graph-safe path: the
    forward's own copy, so backward regenerates its mask). Never a mask or per-element data."""
    ctx.rng_saved = isinstance(rng, Tensor) and not _mode.eager(rng)
    if ctx.rng_saved:
        ctx.save_for_backward(rng)
    else:
        ctx.rng = as_key(rng)


def _kept_rng(ctx):
    return ctx.saved_tensors[0] if ctx.rng_saved else ctx.rng


def _grad_shortcut(grad: Tensor) -> Tensor:
    if _mode.eager(grad) and not torch.is_grad_enabled() and _kernels.use_lib_alloc(grad):
        # A large CPU grad_out handed back as is is shared with the caller, so autograd must
        # copy it (a leaf's .grad, a sum with another branch's gradient) into a fresh torch
        # buffer that page-faults on first touch. A copy in a recycled library buffer is one
        # memory pass, and autograd can take it over without copying.
        return _kernels.library_copy(grad)
    return grad


def _fwd_setup(ctx, inputs, output):
    shortcut, _, rng, *args = inputs
    ctx.args = tuple(args)
    ctx.has_shortcut = shortcut is not None
    _keep_rng(ctx, rng)


def _fwd_backward(ctx, grad):
    g_res = backward(grad, _kept_rng(ctx), *ctx.args) if ctx.needs_input_grad[1] else None
    g_sc = _grad_shortcut(grad) if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return g_sc, g_res, None, None, None, None, None, None, None


def _bwd_setup(ctx, inputs, output):
    _, rng, *args = inputs
    ctx.args = tuple(args)
    _keep_rng(ctx, rng)


def _bwd_backward(ctx, grad):
    # Linear in grad_out with the same per-sample factor: its own derivative, so double
    # backward works too.
    return backward(grad, _kept_rng(ctx), *ctx.args), None, None, None, None, None, None, None


def _scatter_setup(ctx, inputs, output):
    shortcut, kept, rng, *args = inputs
    ctx.args = tuple(args[:-1])  # survival_prob, batch_mode, scaling
    ctx.n_kept = kept.shape[0]
    ctx.has_shortcut = shortcut is not None
    _keep_rng(ctx, rng)


def _scatter_backward(ctx, grad):
    g_kept = None
    if ctx.needs_input_grad[1]:
        g_kept = gather(grad, _kept_rng(ctx), *ctx.args, ctx.n_kept)
    g_sc = grad if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return g_sc, g_kept, None, None, None, None, None


def _gather_setup(ctx, inputs, output):
    full, rng, *args = inputs
    ctx.args = tuple(args[:-1])  # survival_prob, batch_mode, scaling
    ctx.batch = full.shape[0]
    _keep_rng(ctx, rng)


def _gather_backward(ctx, grad):
    # gather_kept is linear; its adjoint puts s * grad at the kept samples and 0 elsewhere.
    g_full = scatter(None, grad, _kept_rng(ctx), *ctx.args, ctx.batch)
    return g_full, None, None, None, None, None


drop_path_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)
drop_path_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)
scatter_kept.register_autograd(_scatter_backward, setup_context=_scatter_setup)
gather_kept.register_autograd(_gather_backward, setup_context=_gather_setup)


# ---- the eager fast path: the same body, setup and backward without the dispatcher -----------


def _eager_function(name, body, setup, backward_fn):
    def forward_fn(ctx, *inputs):
        out = body(*inputs)
        setup(ctx, inputs, out)
        return out

    namespace = {"forward": staticmethod(forward_fn), "backward": staticmethod(backward_fn)}
    return type(name, (torch.autograd.Function,), namespace)


_FwdFunction = _eager_function("_FwdFunction", _kernels.forward, _fwd_setup, _fwd_backward)
_BwdFunction = _eager_function("_BwdFunction", _kernels.backward, _bwd_setup, _bwd_backward)
_ScatterFunction = _eager_function("_ScatterFunction", _kernels.scatter, _scatter_setup,
                                   _scatter_backward)
_GatherFunction = _eager_function("_GatherFunction", _kernels.gather, _gather_setup,
                                  _gather_backward)


def _dispatch(op, function, body, args: list, rng_at: int, *tensors):
    """Run one op on `args` (its rng, an Rng or a tensor or None, at index `rng_at`): the body
    directly when eager and no gradient is needed, the eager autograd.Function when one is, the
    registered custom op otherwise."""
    if _mode.eager(*tensors):
        args[rng_at] = as_key(args[rng_at])
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return function.apply(*args)
        return body(*args)
    args[rng_at] = as_tensor(args[rng_at])
    return op(*args)


def forward(shortcut, residual, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    """drop_path_fwd by the right path; `rng` an Rng, an int64 tensor or None."""
    args = [shortcut, residual, rng, survival_prob, training, batch_mode, axis, scaling, rank]
    return _dispatch(drop_path_fwd, _FwdFunction, _kernels.forward, args, 2, shortcut, residual)


def backward(grad_out, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    args = [grad_out, rng, survival_prob, training, batch_mode, axis, scaling, rank]
    return _dispatch(drop_path_bwd, _BwdFunction, _kernels.backward, args, 1, grad_out)


def scatter(shortcut, kept, rng, survival_prob, batch_mode, scaling, batch):
    args = [shortcut, kept, rng, survival_prob, batch_mode, scaling, batch]
    return _dispatch(scatter_kept, _ScatterFunction, _kernels.scatter, args, 2, shortcut, kept)


def gather(full, rng, survival_prob, batch_mode, scaling, n_kept):
    args = [full, rng, survival_prob, batch_mode, scaling, n_kept]
    return _dispatch(gather_kept, _GatherFunction, _kernels.gather, args, 1, full)

