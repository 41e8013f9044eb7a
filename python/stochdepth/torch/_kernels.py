"""The bodies of the PyTorch adapter's ops: concrete tensors and a `Key` in, the library's kernels
(`_core.run_raw` on raw pointers, on the caller's CUDA stream) run, new tensors out.

The custom ops and the eager fast path both call exactly these functions, so both give the same
bits (docs/design.md, "Arithmetic" and "Skipping dropped samples"). They check nothing: their
arguments were checked once, at the entry of the call (a public function or module, or the custom
op itself). Only the words' tensor is checked here, where its address is taken.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import _core
from .. import mask as _mask
from ._keys import Key

# Converted once here, not per call.
_CORE_DTYPES = {
    torch.float16: _core.DType.float16,
    torch.bfloat16: _core.DType.bfloat16,
    torch.float32: _core.DType.float32,
    torch.float64: _core.DType.float64,
}
_CORE_SCALINGS = {"inference": _core.Scaling.inference, "training": _core.Scaling.training}

# CPU outputs from this size up come from the library's allocator (stochdepth.Array through
# DLPack, no copy) instead of torch.empty_like. torch's CPU allocator returns large blocks to the
# OS, so every fresh output page-faults on first touch: for a (128, 197, 768) float32 tensor that
# costs ~10x the kernel itself. The library keeps such buffers (2 MiB aligned, huge-page advised)
# and recycles them when the tensor dies.
LIB_ALLOC_BYTES = 1 << 22


def device_and_stream(t: Tensor):
    """run_raw's (device, stream): -1 and 0 for the CPU, else the CUDA ordinal and its current
    stream (the caller's, so that the kernel is ordered with the framework's work)."""
    if t.is_cuda:
        device = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return device, torch.cuda.current_stream(device).cuda_stream
    if t.is_cpu:
        return -1, 0
    raise ValueError(f"stochdepth supports CPU and CUDA tensors, got device {t.device}")


def use_lib_alloc(t: Tensor) -> bool:
    return t.is_cpu and t.numel() * t.element_size() >= LIB_ALLOC_BYTES


def _key_args(key: Optional[Key], training: bool, rank: int):
    """run_raw's (seed, offset, words) for this call: zeros at inference (no mask is drawn),
    else the key with the rank's seed (derived on the device for CUDA words)."""
    if not training:
        return 0, 0, None
    key = key.for_rank(rank)
    return key.seed, key.offset, key.words


def _words(words: Optional[Tensor], src: Tensor):
    """The words run_raw's rng_words_ptr points to: None for host values, else CUDA words on
    `src`'s device, checked (run_raw can check only a pointer's alignment) and contiguous (read
    by the kernel when it runs: docs/design.md, "CUDA"). The caller keeps the returned tensor
    alive until the kernel is queued: a contiguous copy made here is the one it reads."""
    if words is None:
        return None
    if words.device != src.device or words.dtype != torch.int64 or words.shape != (2,):
        raise ValueError(f"the words [seed, offset] must be an int64 tensor of shape (2,) on "
                         f"{src.device}, got {words.dtype} {tuple(words.shape)} on "
                         f"{words.device}")
    return words.contiguous()


def dense(t: Tensor) -> Tensor:
    """`t` as the kernels read it: C-contiguous memory holding its values. A lazy negation or
    conjugation (`t._neg_view()`, `t.conj()`) is only a bit on the tensor: `.contiguous()` keeps
    the bit and the memory, which the kernels would read without the negation."""
    return t.resolve_conj().resolve_neg().contiguous()


def _dense(shortcut, src, key, survival_prob, training, batch_mode, axis, scaling, rank):
    """shortcut + keep * s * src (shortcut None: keep * s * src) into a new contiguous tensor."""
    src = dense(src)
    if shortcut is not None:
        shortcut = dense(shortcut)
    seed, offset, words = _key_args(key, training, rank)
    words = _words(words, src)  # alive until run_raw returns
    words_ptr = 0 if words is None else words.data_ptr()
    if use_lib_alloc(src):
        out = _core.forward(None if shortcut is None else shortcut.detach(), src.detach(),
                            float(survival_prob), bool(training), seed, offset,
                            "batch" if batch_mode else "row", axis, scaling, None, None, None)
        return torch.from_dlpack(out)
    out = torch.empty_like(src)
    numel = src.numel()
    if numel == 0:
        return out
    shape = src.shape
    if axis == 0:  # the common case, without the generic products
        outer, batch, inner = 1, shape[0], numel // shape[0]
    else:
        axis = axis % len(shape)
        outer, batch = math.prod(shape[:axis]), shape[axis]
        inner = math.prod(shape[axis + 1:])
    device, stream = device_and_stream(src)
    _core.run_raw(
        0 if shortcut is None else shortcut.data_ptr(), src.data_ptr(), out.data_ptr(),
        outer, batch, inner, _CORE_DTYPES[src.dtype], float(survival_prob), bool(training),
        bool(batch_mode), _CORE_SCALINGS[scaling], seed, offset, device, stream,
        rng_words_ptr=words_ptr,
    )
    return out


def forward(shortcut, residual, key, survival_prob, training, batch_mode, axis, scaling, rank):
    """drop_path_fwd: out = shortcut + keep * s * residual (`key` a Key, None at inference)."""
    return _dense(shortcut, residual, key, survival_prob, training, batch_mode, axis, scaling,
                  rank)


def backward(grad_out, key, survival_prob, training, batch_mode, axis, scaling, rank):
    """drop_path_bwd: grad_residual = keep * s * grad_out, the single-input forward of grad_out."""
    return _dense(None, grad_out, key, survival_prob, training, batch_mode, axis, scaling, rank)


def _core_key(key, training, rank, src):
    """The raw API's (seed, offset, stream) for this call: the words tensor as the seed for CUDA
    words (kept alive by the caller until the call returns), None at inference; the stream of
    `src`'s device for CUDA, None for the CPU."""
    seed, offset, words = _key_args(key, training, rank)
    words = _words(words, src)
    if words is not None:
        seed, offset = words, 0
    elif not training:
        seed = None
    return seed, offset, device_and_stream(src)[1] if src.is_cuda else None


def forward_gamma(shortcut, residual, gamma, key, survival_prob, training, batch_mode, axis,
                  scaling, rank):
    """drop_path_gamma_fwd: out = shortcut + keep * s * (gamma * residual), through the raw
    API's layer scale (docs/design.md, "Layer scale"), which pins the arithmetic."""
    residual = dense(residual)
    if shortcut is not None:
        shortcut = dense(shortcut).detach()
    seed, offset, stream = _core_key(key, training, rank, residual)
    out = _core.forward(shortcut, residual.detach(), float(survival_prob), bool(training), seed,
                        offset, "batch" if batch_mode else "row", axis, scaling, None, stream,
                        dense(gamma).detach())
    return torch.from_dlpack(out)


def backward_gamma(grad_out, residual, gamma, key, survival_prob, training, batch_mode, axis,
                   scaling, rank):
    """drop_path_gamma_bwd: (grad_residual, grad_gamma) in the raw API's one pass."""
    grad_out = dense(grad_out)
    seed, offset, stream = _core_key(key, training, rank, grad_out)
    _, g_res, g_gamma = _core.backward(
        grad_out.detach(), float(survival_prob), bool(training), seed, offset,
        "batch" if batch_mode else "row", axis, scaling, None, stream, dense(gamma).detach(),
        dense(residual).detach())
    return torch.from_dlpack(g_res), torch.from_dlpack(g_gamma)


def library_copy(t: Tensor) -> Tensor:
    """An exact copy of `t` (1.0 * t) in a recycled library buffer: one memory pass."""
    return _dense(None, t, None, 1.0, False, False, 0, "training", -1)


# ---- compact rows (StochasticResidual) --------------------------------------------------------


@functools.lru_cache(maxsize=256)
def kept_count(batch: int, survival_prob: float, batch_mode: bool, seed: int, offset: int) -> int:
    """How many of `batch` samples the mask keeps (host only, no device sync). Cached: a
    block's gather, scatter and their backward ask for the same mask."""
    mode = "batch" if batch_mode else "row"
    return int(_mask(batch, survival_prob, seed=seed, offset=offset, mode=mode).sum())


def _compact(shortcut, src, out, rng, survival_prob, batch_mode, scaling, batch, compact_input):
    """run_raw with compact rows along dim 0 (`batch` is the full batch size; `rng` a host Key,
    the seed as used, rank included). The compact side's row count is checked against the mask
    first: the kernel trusts it, and a wrong count would read or write past a buffer."""
    compact = src if compact_input else out
    n_kept = kept_count(batch, survival_prob, batch_mode, rng.seed, rng.offset)
    if compact.shape[0] != n_kept:
        raise ValueError(f"the kept samples' tensor must have {n_kept} rows (the mask keeps "
                         f"{n_kept} of {batch}), got {compact.shape[0]}")
    full = out if compact_input else src
    if full.numel() == 0:
        return
    device, stream = device_and_stream(full)
    _core.run_raw(
        0 if shortcut is None else shortcut.data_ptr(), src.data_ptr(), out.data_ptr(),
        1, batch, full.numel() // batch, _CORE_DTYPES[src.dtype], float(survival_prob), True,
        bool(batch_mode), _CORE_SCALINGS[scaling], rng.seed, rng.offset, device, stream,
        compact_input=compact_input, compact_output=not compact_input,
    )


def scatter(shortcut, kept, rng, survival_prob, batch_mode, scaling, batch):
    """scatter_kept: the full batch, row k = shortcut[k] + s * kept[j] for the j-th kept k."""
    kept = dense(kept)
    if shortcut is not None:
        shortcut = dense(shortcut)
        out = torch.empty_like(shortcut)
    else:
        out = kept.new_empty((batch,) + tuple(kept.shape[1:]))
    _compact(shortcut, kept, out, rng, survival_prob, batch_mode, scaling, batch, True)
    return out


def gather(full, rng, survival_prob, batch_mode, scaling, n_kept):
    """gather_kept: s * full at the kept samples (dim 0), in order."""
    full = dense(full)
    out = full.new_empty((n_kept,) + tuple(full.shape[1:]))
    _compact(None, full, out, rng, survival_prob, batch_mode, scaling, full.shape[0], False)
    return out
