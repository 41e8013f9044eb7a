"""The PyTorch adapter's custom ops, one autograd definition each, and the eager fast path that
reuses that definition (docs/design.md, "Randomness in the adapters").

Each op has one body (`_kernels`), one setup_context and one backward. `torch.library` registers
them for the op; the eager fast path wraps the same three functions in a small
`torch.autograd.Function`, which skips the dispatcher's per-call cost for plain eager tensors.
`forward`, `backward`, `scatter` and `gather` below run an op by the path that the call's entry
chose (`eager`, from one `_mode.eager` at the entry: a public function or module, or a backward);
everything else in the adapter calls those four, except that a StochasticResidual traced by
torch.compile calls `select_kept` and `rank_rng` as ops (they have no eager path). A registered
op is an entry too (`torch.ops.stochdepth.*`): it checks its own arguments. Backward recomputes
the mask from (seed, offset): an eager call keeps the pair as Python ints and saves no tensor; a
traced one saves the 16-byte rng tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _op
from . import _kernels, _mode
from ._checks import check_gamma_op_args, check_like_grad_out, check_op_args, check_rng
from ._keys import Key, Rng

# ---- the ops' own entries: their arguments checked, their rng read as the kernels take it -----


def _op_key(rng: Optional[Tensor], training: bool) -> Optional[Key]:
    """An op's `rng` as the kernels take it: None at inference (not read), else a Key (CUDA
    words stay on the device: no host read, no sync)."""
    if not training:
        return None
    if rng is None:
        raise ValueError("rng (an int64 [seed, offset] tensor) is required when training")
    return Key.of(rng)


def _host_key(rng: Tensor, survival_prob: float, scaling: str) -> Key:
    """The compact ops' rng and scalars, checked: the kept count sizes a tensor, so the pair must
    be read on the host."""
    _op.check_prob("survival_prob", survival_prob)
    _op.check_scaling(scaling)
    key = Key.of(rng)
    if key.words is not None:
        raise ValueError("compact rows need (seed, offset) on the host (the kept count sizes a "
                         "tensor): not graph-safe (docs/design.md, \"CUDA\")")
    return key


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
    check_op_args(shortcut, residual, survival_prob, axis, scaling)
    return _kernels.forward(shortcut, residual, _op_key(rng, training), survival_prob, training,
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
    check_op_args(None, grad_out, survival_prob, axis, scaling)
    return _kernels.backward(grad_out, _op_key(rng, training), survival_prob, training,
                             batch_mode, axis, scaling, rank)


@drop_path_bwd.register_fake
def _(grad_out, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    check_rng(rng)
    check_op_args(None, grad_out, survival_prob, axis, scaling)
    return grad_out.new_empty(grad_out.shape)


@torch.library.custom_op("stochdepth::drop_path_gamma_fwd", mutates_args=())
def drop_path_gamma_fwd(
    shortcut: Optional[Tensor],
    residual: Tensor,
    gamma: Tensor,
    rng: Optional[Tensor],
    survival_prob: float,
    training: bool,
    batch_mode: bool,
    axis: int,
    scaling: str,
    rank: int,
) -> Tensor:
    """out = shortcut + keep * s * (gamma * residual), the layer scale `gamma` of shape (C,)
    over the last axis (docs/design.md, "Layer scale"); the other arguments as drop_path_fwd's.
    """
    check_rng(rng)
    check_gamma_op_args(shortcut, residual, gamma, survival_prob, axis, scaling)
    return _kernels.forward_gamma(shortcut, residual, gamma, _op_key(rng, training),
                                  survival_prob, training, batch_mode, axis, scaling, rank)


@drop_path_gamma_fwd.register_fake
def _(shortcut, residual, gamma, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    check_rng(rng)
    check_gamma_op_args(shortcut, residual, gamma, survival_prob, axis, scaling)
    return residual.new_empty(residual.shape)


@torch.library.custom_op("stochdepth::drop_path_gamma_bwd", mutates_args=())
def drop_path_gamma_bwd(
    grad_out: Tensor,
    residual: Tensor,
    gamma: Tensor,
    rng: Optional[Tensor],
    survival_prob: float,
    training: bool,
    batch_mode: bool,
    axis: int,
    scaling: str,
    rank: int,
) -> tuple[Tensor, Tensor]:
    """(grad_residual, grad_gamma) of drop_path_gamma_fwd in one pass: gamma * (keep * s *
    grad_out), and the kept rows' sum of (s * grad_out) * residual in the pinned order
    (`residual` the forward's)."""
    check_rng(rng)
    check_gamma_op_args(None, grad_out, gamma, survival_prob, axis, scaling)
    check_like_grad_out(residual, grad_out)
    return _kernels.backward_gamma(grad_out, residual, gamma, _op_key(rng, training),
                                   survival_prob, training, batch_mode, axis, scaling, rank)


@drop_path_gamma_bwd.register_fake
def _(grad_out, residual, gamma, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    check_rng(rng)
    check_gamma_op_args(None, grad_out, gamma, survival_prob, axis, scaling)
    check_like_grad_out(residual, grad_out)
    return grad_out.new_empty(grad_out.shape), gamma.new_empty(gamma.shape)


@torch.library.custom_op("stochdepth::scatter_kept", mutates_args=())
def scatter_kept(shortcut: Optional[Tensor], kept: Tensor, rng: Tensor, survival_prob: float,
                 batch_mode: bool, scaling: str, batch: int) -> Tensor:
    """The full-batch tensor with row k = shortcut[k] + s * kept[j] for the j-th kept sample k
    (dim 0) and shortcut[k] for a dropped one; without a shortcut, s * kept[j] and zeros.

    `rng` is the int64 [seed, offset] CPU tensor of the mask (the seed as used, rank included).
    """
    check_rng(rng)
    return _kernels.scatter(shortcut, kept, _host_key(rng, survival_prob, scaling),
                            survival_prob, batch_mode, scaling, batch)


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
    return _kernels.gather(full, _host_key(rng, survival_prob, scaling), survival_prob,
                           batch_mode, scaling, n_kept)


@gather_kept.register_fake
def _(full, rng, survival_prob, batch_mode, scaling, n_kept):
    check_rng(rng)
    return full.new_empty((n_kept,) + tuple(full.shape[1:]))


@torch.library.custom_op("stochdepth::select_kept", mutates_args=())
def select_kept(full: Tensor, rng: Tensor, survival_prob: float, batch_mode: bool) -> Tensor:
    """The kept samples of `full` (dim 0), in order, as many rows as the mask keeps: gather_kept
    with factor 1 and the kept count computed from `rng`. Under torch.compile that count is a
    data-dependent size (docs/design.md, "Skipping dropped samples"), so one graph serves every
    mask."""
    check_rng(rng)
    _op.check_rank("full", full.dim())
    key = _host_key(rng, survival_prob, "inference")
    n_kept = _kernels.kept_count(full.shape[0], survival_prob, batch_mode, key.seed, key.offset)
    return _kernels.gather(full, key, survival_prob, batch_mode, "inference", n_kept)


@select_kept.register_fake
def _(full, rng, survival_prob, batch_mode):
    check_rng(rng)
    _op.check_rank("full", full.dim())
    batch = full.shape[0]
    # Between 0 and the batch: the bound only where the batch size is static (a bound must be).
    n_kept = torch.library.get_ctx().new_dynamic_size(
        min=0, max=batch if isinstance(batch, int) else None)
    return full.new_empty((n_kept,) + tuple(full.shape[1:]))


@torch.library.custom_op("stochdepth::rank_rng", mutates_args=())
def rank_rng(rng: Tensor, rank: int) -> Tensor:
    """[rank_seed(seed, rank), offset]: the pair as distributed rank `rank` uses it (rank < 0: a
    copy of `rng`), computed on the host from a pair that may be a graph value."""
    check_rng(rng)
    return Rng.of(rng).for_rank(rank).tensor()


@rank_rng.register_fake
def _(rng, rank):
    check_rng(rng)
    return torch.empty((2,), dtype=torch.int64)


# ---- autograd: one setup_context and one backward per op, for both paths ---------------------


def _keep_rng(ctx, rng, saved: tuple = ()) -> None:
    """Keep (seed, offset) for backward, and save the tensors `saved` (the layer scale's
    residual and gamma; nothing else is saved). The eager path's Key as it is: Python ints, or
    CUDA words (the forward's own copy, so backward regenerates its mask). An op's rng: read now
    when its values can be (the op called eagerly), else (in a traced graph) the 16-byte tensor,
    saved after `saved`. Never a mask."""
    ctx.rng_saved = False
    if rng is None or isinstance(rng, Key):
        ctx.key = rng
    elif _mode.eager(rng):
        ctx.key = Key.of(rng)
    else:
        ctx.rng_saved = True
        saved = saved + (rng,)
    if saved:
        ctx.save_for_backward(*saved)


def _kept_rng(ctx, eager: bool):
    """The forward's pair in the form of the path this backward takes."""
    if ctx.rng_saved:
        rng = ctx.saved_tensors[-1]
        return Key.of(rng) if eager else rng
    key = ctx.key
    return key if eager or key is None else key.tensor()


def _grad_shortcut(eager: bool, grad: Tensor) -> Tensor:
    if eager and not torch.is_grad_enabled() and _kernels.use_lib_alloc(grad):
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
    eager = _mode.eager(grad)  # this backward's one decision
    g_res = None
    if ctx.needs_input_grad[1]:
        g_res = backward(eager, grad, _kept_rng(ctx, eager), *ctx.args)
    g_sc = _grad_shortcut(eager, grad) if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return g_sc, g_res, None, None, None, None, None, None, None


def _bwd_setup(ctx, inputs, output):
    _, rng, *args = inputs
    ctx.args = tuple(args)
    _keep_rng(ctx, rng)


def _bwd_backward(ctx, grad):
    # Linear in grad_out with the same per-sample factor: its own derivative, so double
    # backward works too.
    eager = _mode.eager(grad)
    return (backward(eager, grad, _kept_rng(ctx, eager), *ctx.args), None, None, None, None,
            None, None, None)


def _gamma_setup(ctx, inputs, output):
    shortcut, residual, gamma, rng, *args = inputs
    ctx.args = tuple(args)
    ctx.has_shortcut = shortcut is not None
    _keep_rng(ctx, rng, (residual, gamma))


def _gamma_backward(ctx, grad):
    eager = _mode.eager(grad)
    residual, gamma = ctx.saved_tensors[:2]
    g_res = g_gamma = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # One pass gives both (docs/design.md, "Layer scale").
        g_res, g_gamma = backward_gamma(eager, grad, residual, gamma, _kept_rng(ctx, eager),
                                        *ctx.args)
    g_sc = _grad_shortcut(eager, grad) if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return (g_sc, g_res if ctx.needs_input_grad[1] else None,
            g_gamma if ctx.needs_input_grad[2] else None, None, None, None, None, None, None, None)


def _gamma_bwd_setup(ctx, inputs, output):
    grad_out, residual, gamma, rng, *args = inputs
    ctx.args = tuple(args)
    _keep_rng(ctx, rng, (grad_out, residual, gamma))


def _gamma_bwd_backward(ctx, g_g_res, g_g_gamma):
    """Double backward. With m = keep * s per sample, the op is grad_residual = gamma * m * g
    and grad_gamma = rows' sum of m * g * residual (g = grad_out): bilinear, so each input's
    gradient is the layer-scale op itself with other operands."""
    eager = _mode.eager(g_g_res if g_g_res is not None else g_g_gamma)
    grad_out, residual, gamma = ctx.saved_tensors[:3]
    key = _kept_rng(ctx, eager)
    need = ctx.needs_input_grad
    d_g = d_res = d_gamma = None
    if need[0]:
        parts = []
        if g_g_res is not None:
            parts.append(forward_gamma(eager, None, g_g_res, gamma, key, *ctx.args))
        if g_g_gamma is not None:
            parts.append(forward_gamma(eager, None, residual, g_g_gamma, key, *ctx.args))
        d_g = sum(parts[1:], parts[0]) if parts else None
    if need[1] and g_g_gamma is not None:
        d_res = forward_gamma(eager, None, grad_out, g_g_gamma, key, *ctx.args)
    if need[2] and g_g_res is not None:
        d_gamma = backward_gamma(eager, grad_out, g_g_res, gamma, key, *ctx.args)[1]
    return d_g, d_res, d_gamma, None, None, None, None, None, None, None


def _scatter_setup(ctx, inputs, output):
    shortcut, kept, rng, *args = inputs
    ctx.args = tuple(args[:-1])  # survival_prob, batch_mode, scaling
    ctx.n_kept = kept.shape[0]
    ctx.has_shortcut = shortcut is not None
    _keep_rng(ctx, rng)


def _scatter_backward(ctx, grad):
    g_kept = None
    if ctx.needs_input_grad[1]:
        eager = _mode.eager(grad)
        g_kept = gather(eager, grad, _kept_rng(ctx, eager), *ctx.args, ctx.n_kept)
    g_sc = grad if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return g_sc, g_kept, None, None, None, None, None


def _gather_setup(ctx, inputs, output):
    full, rng, *args = inputs
    ctx.args = tuple(args[:-1])  # survival_prob, batch_mode, scaling
    ctx.batch = full.shape[0]
    _keep_rng(ctx, rng)


def _gather_backward(ctx, grad):
    # gather_kept is linear; its adjoint puts s * grad at the kept samples and 0 elsewhere.
    eager = _mode.eager(grad)
    g_full = scatter(eager, None, grad, _kept_rng(ctx, eager), *ctx.args, ctx.batch)
    return g_full, None, None, None, None, None


def _select_setup(ctx, inputs, output):
    full, rng, survival_prob, batch_mode = inputs
    ctx.args = (survival_prob, batch_mode, "inference")
    ctx.batch = full.shape[0]
    _keep_rng(ctx, rng)


def _select_backward(ctx, grad):
    # select_kept is gather_kept with factor 1: the same adjoint.
    return _gather_backward(ctx, grad)[0], None, None, None


drop_path_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)
drop_path_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)
drop_path_gamma_fwd.register_autograd(_gamma_backward, setup_context=_gamma_setup)
drop_path_gamma_bwd.register_autograd(_gamma_bwd_backward, setup_context=_gamma_bwd_setup)
scatter_kept.register_autograd(_scatter_backward, setup_context=_scatter_setup)
gather_kept.register_autograd(_gather_backward, setup_context=_gather_setup)
select_kept.register_autograd(_select_backward, setup_context=_select_setup)


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
_GammaFwdFunction = _eager_function("_GammaFwdFunction", _kernels.forward_gamma, _gamma_setup,
                                    _gamma_backward)
_GammaBwdFunction = _eager_function("_GammaBwdFunction", _kernels.backward_gamma,
                                    _gamma_bwd_setup, _gamma_bwd_backward)
_ScatterFunction = _eager_function("_ScatterFunction", _kernels.scatter, _scatter_setup,
                                   _scatter_backward)
_GatherFunction = _eager_function("_GatherFunction", _kernels.gather, _gather_setup,
                                  _gather_backward)


def _run(eager: bool, op, function, body, args: list, *tensors):
    """Run one op on `args` by the path the entry chose: on the eager path the body directly when
    no gradient is needed, the eager autograd.Function when one is; else the registered op."""
    if not eager:
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return function.apply(*args)
    return body(*args)


def forward(eager: bool, shortcut, residual, key, config: _op.OpConfig, rank: int):
    """drop_path_fwd by the path `eager`: `key` a Key on the eager path, else the op's rng tensor
    (None at inference on both)."""
    args = [shortcut, residual, key, config.survival_prob, config.training, config.batch_mode,
            config.axis, config.scaling, rank]
    return _run(eager, drop_path_fwd, _FwdFunction, _kernels.forward, args, shortcut, residual)


def backward(eager, grad_out, key, survival_prob, training, batch_mode, axis, scaling, rank):
    args = [grad_out, key, survival_prob, training, batch_mode, axis, scaling, rank]
    return _run(eager, drop_path_bwd, _BwdFunction, _kernels.backward, args, grad_out)


def forward_gamma(eager, shortcut, residual, gamma, key, survival_prob, training, batch_mode,
                  axis, scaling, rank):
    """drop_path_gamma_fwd by the path `eager` (`key` as for `forward`)."""
    args = [shortcut, residual, gamma, key, survival_prob, training, batch_mode, axis, scaling,
            rank]
    return _run(eager, drop_path_gamma_fwd, _GammaFwdFunction, _kernels.forward_gamma, args,
                shortcut, residual, gamma)


def backward_gamma(eager, grad_out, residual, gamma, key, survival_prob, training, batch_mode,
                   axis, scaling, rank):
    args = [grad_out, residual, gamma, key, survival_prob, training, batch_mode, axis, scaling,
            rank]
    return _run(eager, drop_path_gamma_bwd, _GammaBwdFunction, _kernels.backward_gamma, args,
                grad_out, residual, gamma)


def scatter(eager, shortcut, kept, key, survival_prob, batch_mode, scaling, batch):
    args = [shortcut, kept, key, survival_prob, batch_mode, scaling, batch]
    return _run(eager, scatter_kept, _ScatterFunction, _kernels.scatter, args, shortcut, kept)


def gather(eager, full, key, survival_prob, batch_mode, scaling, n_kept):
    args = [full, key, survival_prob, batch_mode, scaling, n_kept]
    return _run(eager, gather_kept, _GatherFunction, _kernels.gather, args, full)
