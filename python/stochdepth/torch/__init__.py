"""PyTorch adapter: stochastic depth as `torch.library` custom ops with autograd and torch.compile.

Importing this module imports torch; `import stochdepth` never does. The kernels do the work:
the ops hand raw `data_ptr()` pointers to `stochdepth._core.run_raw`, on the caller's current
CUDA stream (`torch.cuda.current_stream(device)`) for GPU tensors.

Ops (schemas as registered):

    stochdepth::drop_path_fwd(Tensor? shortcut, Tensor residual, Tensor? rng, float survival_prob,
                              bool training, bool batch_mode, int axis, str scaling, int rank)
                              -> Tensor
    stochdepth::drop_path_bwd(Tensor grad_out, Tensor? rng, float survival_prob, bool training,
                              bool batch_mode, int axis, str scaling, int rank) -> Tensor
    stochdepth::rng_snapshot(Tensor state) -> Tensor      (a copy, opaque to the compiler)

`rng` is a CPU int64 tensor of two words, (seed, offset), each the two's-complement image of a
64-bit unsigned value (DESIGN.md "The mask stream"); it may be None when not training. It is a
tensor, not two ints, so that a seed drawn from a torch generator, or a module's advancing
offset, stays inside a compiled graph with no graph break and no recompilation per step.
`rank` >= 0 replaces the seed by `rank_seed(seed, rank)` (see below); -1 leaves it as it is.
drop_path_bwd gives grad_residual; grad_shortcut is grad_out itself (no op needed).

Backward recomputes the mask from (seed, offset): in eager mode nothing but Python scalars is
kept for backward (no tensor is saved, not even `rng`: its two words are read into ints when
the graph is recorded). Under tracing (torch.compile, opcheck's AOT checks) the values are not
known yet, so the 16-byte `rng` tensor is saved instead; never a mask or any per-element data.

Eager fast path. A call through a torch.library custom op costs tens of microseconds of Python
in torch 2.13. For plain eager tensors the public functions and modules call the same
implementation through a torch.autograd.Function instead (directly when no gradient is
needed); under torch.compile, make_fx or any dispatch/torch-function mode, functorch
transforms, tensor subclasses or the JIT tracer they call the registered ops. Both paths give
the same bits.

Large CPU tensors (>= 4 MiB). torch's CPU allocator hands large blocks back to the OS, so a
fresh output page-faults on first touch, which costs several times the kernel. From 4 MiB up
the outputs come from the library's recycled buffers (a `stochdepth.Array` taken over by
`torch.from_dlpack`, no copy), and in eager backward grad_shortcut is such a buffer holding an
exact copy of grad_out (one pass) rather than grad_out itself, which autograd would otherwise
copy into a fresh torch buffer (for a leaf's .grad, or when summing with another branch).

Public API
----------
- `stochastic_depth(shortcut, residual, survival_prob, training=True, *, mode, scaling, axis,
  seed, offset, generator, sync_across_ranks)`: out = shortcut + keep * s * residual (the
  library's own op; `scaling="inference"` is the paper's convention and the default).
- `drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True, ...)`: timm's function.
- `torchvision_stochastic_depth(input, p, mode, training=True, ...)`: torchvision.ops's
  `stochastic_depth` (p is the DROP probability there).
- Modules: `StochasticDepth` (two inputs, both scalings), `DropPath` (drop-in for
  `timm.layers.DropPath(drop_prob, scale_by_keep)`), `TorchvisionStochasticDepth` (drop-in for
  `torchvision.ops.StochasticDepth(p, mode)`).

Mapping to the libraries it replaces (d: drop probability):

    timm.layers.drop_path(x, d, training, scale_by_keep)
        -> drop_path(x, d, training, scale_by_keep)
    timm.layers.DropPath(d, scale_by_keep)
        -> DropPath(d, scale_by_keep)
    torchvision.ops.stochastic_depth(x, d, mode, training)
        -> torchvision_stochastic_depth(x, d, mode, training)
    torchvision.ops.StochasticDepth(d, mode)
        -> TorchvisionStochasticDepth(d, mode)
    shortcut + DropPath(d)(residual)
        -> StochasticDepth(1 - d, scaling="training")(shortcut, residual)   (one kernel pass)

One deliberate difference from the originals: a dropped sample's residual is never read, so a
NaN or Inf there does not reach the output (`x * 0` would give NaN); see DESIGN.md.

Randomness
----------
- No seed: every call draws a fresh (seed, offset) pair (two random 64-bit words) from
  `generator` or torch's default CPU generator (`torch.manual_seed` makes a run reproducible). Under
  torch.compile the draw is part of the graph; inductor may use its own random stream for it
  (`torch._inductor.config.fallback_random`), so compiled and eager runs differ in masks then.
- With a seed: the functions use (seed, offset) as given; the modules keep an offset that
  advances by one per training call and is saved in `state_dict()` under `<prefix>rng_state`
  (int64 tensor [seed, offset]), so that a resumed run continues the sequence. Unseeded modules
  have an empty state_dict, exactly like timm's and torchvision's.
- torch.distributed: when a default process group is initialized and `sync_across_ranks` is
  False (the default), the key of rank r is `rank_seed(seed, r)` = SplitMix64's output for the
  state `seed + (r + 1) * 0x9E3779B97F4A7C15 (mod 2**64)`, r = `torch.distributed.get_rank()`.
  Ranks seeded alike then still get independent masks; `sync_across_ranks=True` uses the seed
  unchanged, so every rank drops the same samples (for the unseeded draw that needs equally
  seeded generators, which is the user's part).

Dtypes, layout, autocast
------------------------
float16, bfloat16, float32 and float64 (TypeError otherwise). Inputs that are not C-contiguous
are copied with `.contiguous()` first; the output is always C-contiguous (a channels_last
input gives a contiguous output). Stochastic depth is on none of autocast's cast lists: under
`torch.autocast("cpu", dtype=torch.bfloat16)` it runs in the dtype it is given, and when the
shortcut and the residual differ in dtype (a float32 shortcut and a bfloat16 branch output, the
usual case under autocast) both are promoted to `torch.promote_types` of the two, as `a + b`
would do, so the output is float32 there.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as _dist
from torch import Tensor, nn

from .. import _core

__all__ = [
    "stochastic_depth",
    "drop_path",
    "torchvision_stochastic_depth",
    "StochasticDepth",
    "DropPath",
    "TorchvisionStochasticDepth",
    "rank_seed",
    "drop_path_fwd",
    "drop_path_bwd",
]

_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment (2**64 / golden ratio)

_DTYPE_NAMES = {
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}
_CORE_DTYPES = {t: getattr(_core.DType, name) for t, name in _DTYPE_NAMES.items()}
_MODES = ("row", "batch")
_SCALINGS = ("inference", "training")
_CORE_SCALINGS = {name: getattr(_core.Scaling, name) for name in _SCALINGS}


# ---- seeds ------------------------------------------------------------------------------------


def _splitmix64(z: int) -> int:
    # Steele, Lea, Flood, "Fast splittable pseudorandom number generators" (OOPSLA 2014): the
    # finalizer of SplitMix64, a bijection of 64-bit words.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """The Philox key used by distributed rank `rank` for `seed` (unless sync_across_ranks).

    SplitMix64 output for the state seed + (rank + 1) * 0x9E3779B97F4A7C15 (mod 2**64): distinct
    ranks get distinct keys for one seed, and no rank uses the bare seed.
    """
    return _splitmix64((int(seed) + (int(rank) + 1) * _GAMMA) & _M64)


def _check_u64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            ok = isinstance(value, np.integer)
        except ImportError:  # pragma: no cover
            ok = False
        if not ok:
            raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= _M64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def _as_i64(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


def _rng_tensor(seed: int, offset: int) -> Tensor:
    return torch.tensor([_as_i64(seed), _as_i64(offset)], dtype=torch.int64)


def _draw_rng(generator: Optional[torch.Generator]) -> Tensor:
    """A fresh random int64 [seed, offset] CPU tensor (each word uniform over 2**64 - 1 values).

    torch.randint rather than Tensor.random_, which dynamo cannot trace.
    """
    if generator is None or generator.device.type == "cpu":
        return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator)
    t = torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator,
                      device=generator.device)
    return t.cpu()


def _rank_key(sync_across_ranks: bool) -> int:
    if sync_across_ranks or not (_dist.is_available() and _dist.is_initialized()):
        return -1
    return _dist.get_rank()


# ---- the ops ----------------------------------------------------------------------------------


def _check_op_args(shortcut, residual, survival_prob, axis, scaling):
    if residual.dtype not in _DTYPE_NAMES:
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
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")


def _words(rng: Optional[Tensor]):
    """(seed, offset) as unsigned Python ints from an int64 [seed, offset] tensor (or None)."""
    if rng is None:
        return None
    seed, offset = rng.tolist()
    return seed & _M64, offset & _M64


def _device_and_stream(t: Tensor):
    """run_raw's (device, stream): -1 and 0 for the CPU, else the CUDA ordinal and its current
    stream (the caller's, so that the kernel is ordered with the framework's work)."""
    if t.is_cuda:
        device = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return device, torch.cuda.current_stream(device).cuda_stream
    if t.is_cpu:
        return -1, 0
    raise ValueError(f"stochdepth supports CPU and CUDA tensors, got device {t.device}")


def _launch(shortcut, src, out, words, survival_prob, training, batch_mode, axis, scaling, rank):
    """run_raw on [outer, batch, inner] views of C-contiguous `src`/`shortcut` into `out`.

    words: (seed, offset) unsigned ints, or None at inference.
    """
    shape = src.shape
    numel = src.numel()
    if numel == 0:
        return
    if axis == 0:  # the common case, without the generic products
        outer, batch = 1, shape[0]
        inner = numel // batch
    else:
        axis = axis % len(shape)
        outer, batch = math.prod(shape[:axis]), shape[axis]
        inner = math.prod(shape[axis + 1 :])
    seed, offset = _scalars(words, training, rank)
    device, stream = _device_and_stream(src)
    _core.run_raw(
        0 if shortcut is None else shortcut.data_ptr(),
        src.data_ptr(),
        out.data_ptr(),
        outer,
        batch,
        inner,
        _CORE_DTYPES[src.dtype],
        float(survival_prob),
        bool(training),
        bool(batch_mode),
        _CORE_SCALINGS[scaling],
        seed or 0,
        offset,
        device,
        stream,
    )


# CPU outputs from this size up come from the library's allocator (stochdepth.Array through
# DLPack, no copy) instead of torch.empty_like. torch's CPU allocator returns large blocks to the
# OS, so every fresh output page-faults on first touch: for a (128, 197, 768) float32 tensor that
# costs ~10x the kernel itself. The library keeps such buffers (2 MiB aligned, huge-page advised)
# and recycles them when the tensor dies.
_LIB_ALLOC_BYTES = 1 << 22


def _scalars(words, training, rank):
    if not training:
        return None, 0
    if words is None:
        raise ValueError("rng (an int64 [seed, offset] tensor) is required when training")
    seed, offset = words
    return (rank_seed(seed, rank) if rank >= 0 else seed), offset


def _lib_call(shortcut, src, words, survival_prob, training, batch_mode, axis, scaling, rank):
    seed, offset = _scalars(words, training, rank)
    mode = "batch" if batch_mode else "row"
    out = _core.forward(None if shortcut is None else shortcut.detach(), src.detach(),
                        float(survival_prob), bool(training), seed, offset, mode, axis, scaling,
                        None, None)
    return torch.from_dlpack(out)


def _use_lib_alloc(t):
    return t.is_cpu and t.numel() * t.element_size() >= _LIB_ALLOC_BYTES


def _fwd_impl(shortcut, residual, words, survival_prob, training, batch_mode, axis, scaling,
              rank):
    residual = residual.contiguous()
    if shortcut is not None:
        shortcut = shortcut.contiguous()
    if _use_lib_alloc(residual):
        return _lib_call(shortcut, residual, words, survival_prob, training, batch_mode, axis,
                         scaling, rank)
    out = torch.empty_like(residual)
    _launch(shortcut, residual, out, words, survival_prob, training, batch_mode, axis, scaling,
            rank)
    return out


def _bwd_impl(grad_out, words, survival_prob, training, batch_mode, axis, scaling, rank):
    grad_out = grad_out.contiguous()
    if _use_lib_alloc(grad_out):  # backward = the single-input forward of grad_out
        return _lib_call(None, grad_out, words, survival_prob, training, batch_mode, axis,
                         scaling, rank)
    out = torch.empty_like(grad_out)
    _launch(None, grad_out, out, words, survival_prob, training, batch_mode, axis, scaling, rank)
    return out


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

    Non-contiguous inputs are made contiguous; the output is a new C-contiguous tensor. `rng`
    is an int64 CPU tensor [seed, offset] (needed when training, else may be None).
    """
    _check_op_args(shortcut, residual, survival_prob, axis, scaling)
    return _fwd_impl(shortcut, residual, _words(rng), survival_prob, training, batch_mode, axis,
                     scaling, rank)


@drop_path_fwd.register_fake
def _(shortcut, residual, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    _check_op_args(shortcut, residual, survival_prob, axis, scaling)
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
    _check_op_args(None, grad_out, survival_prob, axis, scaling)
    return _bwd_impl(grad_out, _words(rng), survival_prob, training, batch_mode, axis, scaling,
                     rank)


@drop_path_bwd.register_fake
def _(grad_out, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    _check_op_args(None, grad_out, survival_prob, axis, scaling)
    return grad_out.new_empty(grad_out.shape)


def _is_concrete(t: Tensor) -> bool:
    """True for a plain eager tensor whose values can be read now (not fake, not traced)."""
    if type(t) is not torch.Tensor or t.device.type != "cpu":
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._is_functional_tensor(t):
        return False
    return torch._C._len_torch_dispatch_stack() == 0  # no make_fx / fake / schema-check mode


def _save_rng(ctx, rng):
    # Eager: keep two Python ints, no tensor. Tracing: the values are unknown, keep the tensor.
    ctx.rng_words = None
    ctx.rng_saved = False
    if rng is None:
        return
    if _is_concrete(rng):
        ctx.rng_words = rng.tolist()
    else:
        ctx.save_for_backward(rng)
        ctx.rng_saved = True


def _load_rng(ctx):
    if ctx.rng_saved:
        return ctx.saved_tensors[0]
    if ctx.rng_words is None:
        return None
    return torch.tensor(ctx.rng_words, dtype=torch.int64)


def _fwd_setup_context(ctx, inputs, output):
    shortcut, residual, rng, survival_prob, training, batch_mode, axis, scaling, rank = inputs
    ctx.args = (survival_prob, training, batch_mode, axis, scaling, rank)
    ctx.has_shortcut = shortcut is not None
    _save_rng(ctx, rng)


def _fwd_backward(ctx, grad):
    g_res = None
    if ctx.needs_input_grad[1]:
        g_res = drop_path_bwd(grad, _load_rng(ctx), *ctx.args)
    g_sc = grad if ctx.has_shortcut and ctx.needs_input_grad[0] else None
    return g_sc, g_res, None, None, None, None, None, None, None


drop_path_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _bwd_setup_context(ctx, inputs, output):
    _, rng, survival_prob, training, batch_mode, axis, scaling, rank = inputs
    ctx.args = (survival_prob, training, batch_mode, axis, scaling, rank)
    _save_rng(ctx, rng)


def _bwd_backward(ctx, grad):
    # The backward op is linear in grad_out with the same per-sample factor: it is its own
    # derivative, so double backward works too.
    return drop_path_bwd(grad, _load_rng(ctx), *ctx.args), None, None, None, None, None, None, None


drop_path_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# ---- eager fast path (see the module docstring) --------------------------------------------


def _eager_ok(shortcut, residual) -> bool:
    if torch.compiler.is_compiling():
        return False
    if type(residual) is not torch.Tensor:
        return False
    if shortcut is not None and type(shortcut) is not torch.Tensor:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._get_tracing_state() is not None:
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not (wrapped(residual) or (shortcut is not None and wrapped(shortcut)))


class _DropPathFunction(torch.autograd.Function):
    """Eager autograd node: saves (seed, offset) and the op's scalars, never a tensor."""

    @staticmethod
    def forward(ctx, shortcut, residual, words, survival_prob, training, batch_mode, axis,
                scaling, rank):
        ctx.words = words
        ctx.args = (survival_prob, training, batch_mode, axis, scaling, rank)
        ctx.has_shortcut = shortcut is not None
        return _fwd_impl(shortcut, residual, words, survival_prob, training, batch_mode, axis,
                         scaling, rank)

    @staticmethod
    def backward(ctx, grad):
        g_res = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # create_graph=True: stay differentiable via the op
                rng = None if ctx.words is None else _rng_tensor(*ctx.words)
                g_res = drop_path_bwd(grad, rng, *ctx.args)
            else:
                g_res = _bwd_impl(grad, ctx.words, *ctx.args)
        g_sc = None
        if ctx.has_shortcut and ctx.needs_input_grad[0]:
            g_sc = grad
            if _use_lib_alloc(grad) and not torch.is_grad_enabled():
                # A large CPU grad_out handed back as is is shared with the caller, so autograd
                # must copy it (a leaf's .grad, a sum with another branch's gradient) into a
                # fresh torch buffer that page-faults on first touch. A copy in a recycled
                # library buffer (1.0 * grad, exact) is one memory pass and autograd can take
                # it over without copying.
                g_sc = _lib_call(None, grad.contiguous(), None, 1.0, False, False, 0, "training",
                                 -1)
        return g_sc, g_res, None, None, None, None, None, None, None


# torch.autograd.Function.apply minus its Python wrapper (functorch bookkeeping that _eager_ok
# has already ruled out): the C++ _FunctionBase.apply, bound once.
_apply_fn = super(torch.autograd.Function, _DropPathFunction).apply


def _run(shortcut, residual, rng, survival_prob, training, batch_mode, axis, scaling, rank):
    """Dispatch one forward. rng: None, unsigned (seed, offset) ints, or an int64 tensor."""
    if _eager_ok(shortcut, residual):
        _check_op_args(shortcut, residual, survival_prob, axis, scaling)
        words = rng if rng is None or isinstance(rng, tuple) else _words(rng)
        if torch.is_grad_enabled() and (
            residual.requires_grad or (shortcut is not None and shortcut.requires_grad)
        ):
            return _apply_fn(shortcut, residual, words, survival_prob, training, batch_mode, axis,
                             scaling, rank)
        return _fwd_impl(shortcut, residual, words, survival_prob, training, batch_mode, axis,
                         scaling, rank)
    if isinstance(rng, tuple):
        rng = _rng_tensor(*rng)
    return drop_path_fwd(shortcut, residual, rng, survival_prob, training, batch_mode, axis,
                         scaling, rank)


# ---- functional API ---------------------------------------------------------------------------


def _check_mode(mode):
    if mode not in _MODES:
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")


def _check_prob(name, p):
    # Python and NumPy numbers; bools and tensors are refused (a tensor would force a sync).
    if isinstance(p, (bool, Tensor)) or not hasattr(p, "__float__"):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(p).__name__}")
    if not 0.0 <= float(p) <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {p}")


def _check_tensor(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _rng_for_call(seed, offset, generator):
    if seed is None:
        return _draw_rng(generator)
    return _check_u64("seed", seed), _check_u64("offset", offset)


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
) -> Tensor:
    """Stochastic depth of a residual branch: shortcut + keep[b] * s * residual.

    Args:
        shortcut: the identity path, or None for the single-input form (keep * s * residual).
        residual: the branch output, same shape and device as `shortcut`. If the dtypes differ,
            both are promoted to `torch.promote_types(shortcut.dtype, residual.dtype)`.
        survival_prob: p, the probability that a sample keeps its residual, in [0, 1].
        training: draw a mask (True) or apply the inference form (False).
        mode: "row" (one draw per sample along `axis`) or "batch" (one draw for all).
        scaling: "inference" (the paper's: s = 1 in training, residual times p at inference) or
            "training" (timm's and torchvision's: s = 1/p in training, identity at inference).
        axis: the sample axis.
        seed, offset: the Philox key and counter, 64-bit unsigned; None draws both from
            `generator` (torch's default CPU generator when None).
        sync_across_ranks: under torch.distributed, use the seed as is on every rank instead of
            `rank_seed(seed, rank)`.

    Non-contiguous inputs are copied with `.contiguous()`; the result is a new contiguous tensor.
    A dropped sample's output is the shortcut bit for bit (zeros in the single-input form).
    """
    _check_tensor("residual", residual)
    if shortcut is not None:
        _check_tensor("shortcut", shortcut)
        if shortcut.dtype != residual.dtype:
            common = torch.promote_types(shortcut.dtype, residual.dtype)
            shortcut = shortcut.to(common)
            residual = residual.to(common)
    _check_prob("survival_prob", survival_prob)
    _check_mode(mode)
    rng = _rng_for_call(seed, offset, generator) if training else None
    return _run(
        shortcut, residual, rng, float(survival_prob), bool(training), mode == "batch", axis,
        scaling, _rank_key(sync_across_ranks),
    )


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
) -> Tensor:
    """timm's `drop_path(x, drop_prob, training, scale_by_keep)`.

    Returns `x` itself when `drop_prob == 0` or not training (as timm does). Otherwise each
    sample (dim 0) is kept with probability 1 - drop_prob and scaled by 1 / (1 - drop_prob) when
    `scale_by_keep` (no scaling otherwise, and none at eval either way); dropped samples are 0.
    """
    _check_tensor("x", x)
    _check_prob("drop_prob", drop_prob)
    _check_mode(mode)
    if drop_prob == 0.0 or not training:
        return x
    return _run(
        None, x, _rng_for_call(seed, offset, generator), 1.0 - float(drop_prob), True,
        mode == "batch", 0, "training" if scale_by_keep else "inference",
        _rank_key(sync_across_ranks),
    )


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
    _check_tensor("input", input)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in _MODES:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    return _run(
        None, input, _rng_for_call(seed, offset, generator), 1.0 - float(p), True,
        mode == "batch", 0, "training", _rank_key(sync_across_ranks),
    )


# ---- modules ----------------------------------------------------------------------------------

_STEP = torch.tensor([0, 1], dtype=torch.int64)


@torch.library.custom_op("stochdepth::rng_snapshot", mutates_args=())
def _rng_snapshot(state: Tensor) -> Tensor:
    """A copy of a module's [seed, offset] state, opaque to the compiler.

    Inside a compiled graph the module's state is a graph input mutated in place (offset += 1)
    after the forward op has used it. A plain `state.clone()` may be rematerialised in the
    backward graph by the partitioner, from the input as it is by then, i.e. with the offset of
    the next call (seen with inductor in torch 2.13: wrong gradients). A custom op is not
    recomputed, so the backward gets exactly the words that the forward used.
    """
    return state.clone()


@_rng_snapshot.register_fake
def _(state):
    return torch.empty_like(state)


class _SeededMixin:
    """Seed/offset bookkeeping shared by the modules.

    Unseeded: nothing is stored and state_dict() stays empty. Seeded: a CPU int64 tensor
    `[seed, offset]` (not a buffer, so `.to(device)` leaves it on the host and DDP does not
    broadcast it) advances its offset after each training call and is saved in state_dict()
    under "<prefix>rng_state" through state-dict hooks.
    """

    def _init_rng(self, seed, sync_across_ranks):
        self.sync_across_ranks = bool(sync_across_ranks)
        self._set_seed(None if seed is None else _check_u64("seed", seed), 0)
        self._register_state_dict_hook(_SeededMixin._state_dict_hook)
        self._register_load_state_dict_pre_hook(_SeededMixin._load_hook, with_module=True)

    def _set_seed(self, seed, offset):
        self.seed = seed
        self._rng_state = None if seed is None else _rng_tensor(seed, offset)

    @property
    def offset(self) -> Optional[int]:
        """The offset the next training call will use (None when unseeded)."""
        return None if self._rng_state is None else int(self._rng_state[1]) & _M64

    def _next_rng(self):
        state = self._rng_state
        if state is None:
            return _draw_rng(None)
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            rng = _rng_snapshot(state)  # stays a graph value; no recompilation per step
        else:
            seed, offset = state.tolist()
            rng = (seed & _M64, offset & _M64)
        state.add_(_STEP)
        return rng

    @staticmethod
    def _state_dict_hook(module, state_dict, prefix, local_metadata):
        if module._rng_state is not None:
            state_dict[prefix + "rng_state"] = module._rng_state.clone()

    @staticmethod
    def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
        key = prefix + "rng_state"
        if key in state_dict:
            value = state_dict.pop(key)
            words = [int(w) & _M64 for w in torch.as_tensor(value).reshape(-1).tolist()]
            if len(words) != 2:
                error_msgs.append(f"{key}: expected 2 int64 words [seed, offset]")
                return
            module._set_seed(words[0], words[1])

    def _seed_repr(self):
        return "" if self.seed is None else f", seed={self.seed}"


class StochasticDepth(_SeededMixin, nn.Module):
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
        _check_prob("survival_prob", survival_prob)
        _check_mode(mode)
        if scaling not in _SCALINGS:
            raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
        self.survival_prob = float(survival_prob)
        self.mode = mode
        self.scaling = scaling
        self.axis = int(axis)
        self._init_rng(seed, sync_across_ranks)

    def forward(self, shortcut: Tensor, residual: Tensor) -> Tensor:
        _check_tensor("shortcut", shortcut)
        _check_tensor("residual", residual)
        if shortcut.dtype != residual.dtype:
            common = torch.promote_types(shortcut.dtype, residual.dtype)
            shortcut, residual = shortcut.to(common), residual.to(common)
        rng = self._next_rng() if self.training else None
        return _run(
            shortcut, residual, rng, self.survival_prob, self.training, self.mode == "batch",
            self.axis, self.scaling, _rank_key(self.sync_across_ranks),
        )

    def extra_repr(self) -> str:
        return (f"survival_prob={self.survival_prob}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}, axis={self.axis}{self._seed_repr()}")


class DropPath(_SeededMixin, nn.Module):
    """Drop-in for `timm.layers.DropPath(drop_prob, scale_by_keep)`: same constructor,
    attributes, `extra_repr` and (when unseeded) empty state_dict.

    Extra keyword-only options: `mode` ("row" as timm, or "batch"), `seed` (see
    `StochasticDepth`) and `sync_across_ranks`.
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True, *, mode: str = "row",
                 seed: Optional[int] = None, sync_across_ranks: bool = False):
        super().__init__()
        _check_prob("drop_prob", drop_prob)
        _check_mode(mode)
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep
        self.mode = mode
        self._init_rng(seed, sync_across_ranks)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        rng = self._next_rng()  # advance even when drop_prob == 0: one offset per training call
        if self.drop_prob == 0.0:
            return x
        _check_tensor("x", x)
        return _run(
            None, x, rng, 1.0 - float(self.drop_prob), True, self.mode == "batch", 0,
            "training" if self.scale_by_keep else "inference", _rank_key(self.sync_across_ranks),
        )

    def extra_repr(self) -> str:
        # timm's text exactly, plus the seed when one is set.
        return f"drop_prob={round(self.drop_prob, 3):0.3f}{self._seed_repr()}"


class TorchvisionStochasticDepth(_SeededMixin, nn.Module):
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
        rng = self._next_rng()
        _check_tensor("input", input)
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"drop probability has to be between 0 and 1, but got {self.p}")
        if self.mode not in _MODES:
            raise ValueError(f"mode has to be either 'batch' or 'row', but got {self.mode}")
        if self.p == 0.0:
            return input
        return _run(
            None, input, rng, 1.0 - float(self.p), True, self.mode == "batch", 0, "training",
            _rank_key(self.sync_across_ranks),
        )

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(p={self.p}, mode={self.mode}{self._seed_repr()})"


# StochasticResidual (skips the dropped samples' work) lives in its own file; it builds on the
# ops and the seed bookkeeping above.
from .residual import StochasticResidual, stochastic_residual  # noqa: E402

__all__ += ["StochasticResidual", "stochastic_residual"]
