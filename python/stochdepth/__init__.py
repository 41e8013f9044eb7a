"""stochdepth: stochastic depth (drop path) with exact, reproducible masks.

    out[b] = shortcut[b] + keep[b] * s * residual[b]

`keep` comes from a counter-based Philox4x32-10 stream keyed by (seed, offset), identical on every
CPU, GPU and framework; the kernels are hand-written C++ (scalar, AVX2, AVX-512 and NEON paths,
the best one the CPU supports chosen at run time) and CUDA. docs/design.md is the contract;
`stochdepth.reference` is the NumPy oracle.

Adapters live in subpackages that import their framework only when imported themselves:
`stochdepth.torch`, `stochdepth.jax`, `stochdepth.keras`. Importing `stochdepth` imports none.
"""

from __future__ import annotations

import sys as _sys

import ml_dtypes as _ml_dtypes
import numpy as _np

from . import _core, reference
from ._core import Array
from ._norm import backward_norm, forward_norm

# build_info() reads every environment setting (STOCHDEPTH_CPU, STOCHDEPTH_NUM_THREADS,
# STOCHDEPTH_CACHE_MB): a bad value fails the import with a ValueError naming the variable
# (docs/design.md, "Errors").
__version__ = _core.build_info()["version"]
__all__ = [
    "Array",
    "forward",
    "backward",
    "mask",
    "forward_norm",
    "backward_norm",
    "build_info",
    "set_num_threads",
    "get_num_threads",
    "set_isa",
    "get_isa",
    "empty_cache",
    "reference",
    "__version__",
]

_core.register_bfloat16(_np.dtype(_ml_dtypes.bfloat16))


def _torch_stream(x):
    torch = _sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor) and x.is_cuda:
        return torch.cuda.current_stream(x.device).cuda_stream
    return None


def _cupy_stream(x):
    cupy = _sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        with x.device:
            return cupy.cuda.get_current_stream().ptr
    return None


# How a framework names the stream its work is queued on now, for the arrays it made.
_FRAMEWORK_STREAMS = (_torch_stream, _cupy_stream)


def _current_stream(*arrays):
    """stream= for a call that names none: the current CUDA stream of the framework (torch, CuPy)
    that made the first of `arrays` on a CUDA device, else None. With None the binding refuses a
    CUDA array and says what to pass: the legacy default stream, taken silently, would break a
    CUDA graph capture in progress on another stream (docs/design.md, "CUDA")."""
    for x in arrays:
        if x is None or isinstance(x, (_np.ndarray, int)):
            continue
        for stream_of in _FRAMEWORK_STREAMS:
            s = stream_of(x)
            if s is not None:
                return s
    return None


def forward(shortcut, residual, survival_prob, *, training=True, seed=None, offset=0, mode="row",
            axis=0, scaling="inference", out=None, stream=None, gamma=None):
    """Stochastic depth forward: ``shortcut + keep * s * residual``, or with the layer scale
    ``shortcut + keep * s * (gamma * residual)``.

    Args:
        shortcut: the identity path, or None for the single-input form (``keep * s * residual``).
        residual: the branch output; same shape, dtype and device as `shortcut`.
        survival_prob: p in [0, 1], the probability of keeping a sample's residual.
        training: True draws the mask; False is the inference form ``shortcut + c * residual``.
        seed, offset: the mask is Philox4x32-10 keyed by `seed` with `offset` in the counter
            (docs/design.md, "The mask stream"); integers in [0, 2**64). `seed` is needed only
            when a mask is drawn (training=True). `seed` may instead be a 2-element uint64 (or
            int64) array on the data's device holding [seed, offset] (`offset` then 0): the
            kernel reads it when it runs, so a captured CUDA graph that is given new words
            between replays draws new masks (graph-safe with `out=` and `stream=`:
            docs/design.md, "CUDA").
        mode: "row" (one draw per sample) or "batch" (one draw for the whole batch).
        axis: the sample axis (default 0); any rank >= 1.
        scaling: "inference" (the paper, kerasfactory: s = 1, c = p) or "training" (timm,
            torchvision: s = 1/p, c = 1).
        out: optional output buffer; may be `shortcut` itself (in place: dropped samples are
            not touched).
        stream: the CUDA stream (an integer cudaStream_t; 0 is the legacy default stream) for
            CUDA inputs. Left out, a torch tensor's or CuPy array's current stream is used;
            other CUDA inputs (JAX, a `stochdepth.Array`) must name one (a ValueError says so).
        gamma: the layer scale (LayerScale, CaiT): a vector of shape (C,), C the last axis, the
            inputs' dtype, multiplied into the residual before s (docs/design.md, "Layer
            scale"); the sample axis must not be the last. None: the op without it.

    A dropped sample gives the shortcut bit for bit and its residual is never read, so NaN or
    Inf there does not reach the output. Returns a NumPy array for NumPy inputs, a
    `stochdepth.Array` (DLPack producer) for other DLPack inputs, or `out` when given.
    Arrays must be C-contiguous.
    """
    if stream is None:
        stream = _current_stream(residual, shortcut, out, seed)
    return _core.forward(shortcut, residual, survival_prob, training, seed, offset, mode, axis,
                         scaling, out, stream, gamma)


def backward(grad_out, survival_prob, *, training=True, seed=None, offset=0, mode="row", axis=0,
             scaling="inference", out=None, stream=None, gamma=None, residual=None):
    """Gradients of `forward` for the same arguments: ``(grad_shortcut, grad_residual)``, and
    with `gamma` ``(grad_shortcut, grad_residual, grad_gamma)``.

    grad_shortcut is `grad_out` itself (the same object, no copy). grad_residual is
    ``s * grad_out`` for kept samples and exact zeros for dropped ones (grad_out is not read
    there); at inference it is ``c * grad_out``. The mask is recomputed from (seed, offset).
    `stream` as for `forward`.

    With `gamma` (as given to `forward`), grad_residual is ``gamma * (s * grad_out)`` and
    grad_gamma, of shape (C,), sums ``(s * grad_out) * residual`` over the kept samples in a
    pinned order (docs/design.md, "Layer scale"): `residual`, the forward's, is needed then and
    read on kept samples only. Without gamma `residual` is not used.
    """
    if stream is None:
        stream = _current_stream(grad_out, out, seed)
    return _core.backward(grad_out, survival_prob, training, seed, offset, mode, axis, scaling,
                          out, stream, gamma, residual)


def mask(batch, survival_prob, *, seed, offset=0, mode="row"):
    """The keep mask `forward` uses for these arguments: a bool NumPy array of shape (batch,)."""
    return _core.mask(batch, survival_prob, seed, offset, mode)


def build_info():
    """What this build contains: compiled and supported CPU ISAs, the active one, CUDA, threads."""
    return _core.build_info()


def set_num_threads(n):
    """Threads used for large CPU tensors (default: all cores, or STOCHDEPTH_NUM_THREADS).

    `n` is an integer in [1, 256] (256: `build_info()["max_threads"]`); a bool or non-integer
    is a TypeError, anything out of range a ValueError. Threads that cannot start (a thread
    limit) mean fewer threads, never an error or a hang.
    """
    _core.set_num_threads(n)


def get_num_threads():
    return _core.get_num_threads()


def set_isa(name):
    """Force the CPU path: "avx512_bf16", "avx512", "avx2", "neon" or "scalar" (ValueError if
    this CPU or build lacks it; build_info()["cpu_isas_supported"] lists the ones it has).

    The environment variable STOCHDEPTH_CPU does the same at import.
    """
    _core.set_isa(name)


def get_isa():
    return _core.get_isa()


def empty_cache():
    """Release the output memory stochdepth keeps for reuse: the CPU buffers (see docs/usage.md,
    "CPU kernels, threads and memory") and the free part of its CUDA memory pools
    (docs/design.md, "CUDA")."""
    _core.cache_clear()
