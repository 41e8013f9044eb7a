"""Pure-NumPy reference of stochdepth: Philox4x32-10, the mask stream, forward and backward.

Written for clarity, not speed, and never used as a fallback for a missing kernel: it is the
yardstick. Every compiled backend (the scalar, AVX2, AVX-512 and NEON CPU paths, and CUDA) must
reproduce it bit for bit, because the arithmetic is pinned (docs/design.md, "Arithmetic"): half
types load into float32, the scale is 1/p (or p) evaluated in float64 and rounded once to the
compute type, and out = shortcut + (scale * residual) with the multiply and the add rounded
separately (NumPy never fuses them).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "philox4x32_10",
    "mask_draws",
    "keep_threshold",
    "mask",
    "scale_factor",
    "forward",
    "backward",
    "forward_kept",
    "backward_kept",
]

# Random123's Philox4x32 constants (PHILOX_M4x32_0/1, PHILOX_W32_0/1).
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint32(0x9E3779B9)
_W1 = np.uint32(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds (Random123). Vectorised over a leading axis.

    counter: uint32 array of shape (..., 4); key: uint32 array of shape (..., 2), broadcastable.
    Returns uint32 array of shape (..., 4).
    """
    ctr = np.array(counter, dtype=np.uint32)
    k = np.array(key, dtype=np.uint32)
    ctr, k = np.broadcast_arrays(ctr, k[..., [0, 0, 1, 1]])
    c0, c1, c2, c3 = (ctr[..., i].astype(np.uint64) for i in range(4))
    k0 = k[..., 0].astype(np.uint32)
    k1 = k[..., 2].astype(np.uint32)
    with np.errstate(over="ignore"):
        for rnd in range(10):
            if rnd > 0:
                k0 = k0 + _W0
                k1 = k1 + _W1
            p0 = _M0 * c0
            p1 = _M1 * c2
            hi0, lo0 = p0 >> _SHIFT, p0 & _LO
            hi1, lo1 = p1 >> _SHIFT, p1 & _LO
            c0, c1, c2, c3 = (
                hi1 ^ c1 ^ k0.astype(np.uint64),
                lo1,
                hi0 ^ c3 ^ k1.astype(np.uint64),
                lo0,
            )
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _check_u64(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def mask_draws(batch, *, seed, offset=0, mode="row"):
    """The raw 32-bit draw of each sample (docs/design.md, "The mask stream"), shape (batch,)."""
    seed = _check_u64("seed", seed)
    offset = _check_u64("offset", offset)
    if mode not in ("row", "batch"):
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
    samples = np.arange(batch, dtype=np.uint64) if mode == "row" else np.zeros(batch, np.uint64)
    q = samples >> np.uint64(2)
    counter = np.stack(
        [
            (q & _LO).astype(np.uint32),
            (q >> _SHIFT).astype(np.uint32),
            np.full(batch, offset & 0xFFFFFFFF, np.uint32),
            np.full(batch, offset >> 32, np.uint32),
        ],
        axis=-1,
    )
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)
    words = philox4x32_10(counter, key)
    return words[np.arange(batch), (samples & np.uint64(3)).astype(np.intp)]


def keep_threshold(survival_prob):
    """T = floor(p * 2**32), evaluated in float64; keep iff draw < T (so p = 1 keeps all)."""
    return int(np.floor(np.float64(survival_prob) * np.float64(2.0**32)))


def mask(batch, survival_prob, *, seed, offset=0, mode="row"):
    """Boolean keep mask of shape (batch,)."""
    draws = mask_draws(batch, seed=seed, offset=offset, mode=mode)
    return draws.astype(np.uint64) < np.uint64(keep_threshold(survival_prob))


def _compute_type(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def scale_factor(survival_prob, *, training, scaling, dtype=np.float32):
    """The factor applied to the residual of a kept (or, at inference, every) sample.

    Evaluated in float64, then rounded once to the compute type of `dtype`.
    training: 1/p with scaling="training" (0 when p = 0: nothing is kept), else 1.
    inference: p with scaling="inference", else 1.
    """
    p = np.float64(survival_prob)
    if scaling not in ("inference", "training"):
        raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
    if training:
        s = (np.float64(1.0) / p if p > 0 else np.float64(0.0)) if scaling == "training" else 1.0
    else:
        s = p if scaling == "inference" else 1.0
    return _compute_type(dtype)(s)


def _as_obi(a, axis):
    """View `a` as (outer, batch, inner) around `axis` (C order)."""
    axis = axis % a.ndim
    outer = int(np.prod(a.shape[:axis], dtype=np.int64))
    inner = int(np.prod(a.shape[axis + 1 :], dtype=np.int64))
    return a.reshape(outer, a.shape[axis], inner)


def forward(shortcut, residual, survival_prob, *, training=True, seed=0, offset=0, mode="row",
            axis=0, scaling="inference"):
    """out = shortcut + keep * s * residual (training) or shortcut + c * residual (inference).

    `shortcut=None` is the single-input form (out = keep * s * residual). A dropped sample gives
    the shortcut bit for bit (or zeros), and its residual is never read: NaN/Inf there do not
    reach the output.
    """
    residual = np.asarray(residual)
    dtype = residual.dtype
    ct = _compute_type(dtype)
    s = scale_factor(survival_prob, training=training, scaling=scaling, dtype=dtype)
    res = _as_obi(residual, axis)
    # IEEE overflow to Inf and NaN inputs are part of the contract, not warnings (the rows of
    # dropped samples are computed here and then discarded).
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = s * res.astype(ct)  # one rounding: the multiply
        if shortcut is not None:
            sc = _as_obi(np.asarray(shortcut), axis)
            out = (sc.astype(ct) + scaled).astype(dtype)  # the add, then one rounding on store
        else:
            sc = None
            out = scaled.astype(dtype)
    if training:
        keep = mask(res.shape[1], survival_prob, seed=seed, offset=offset, mode=mode)
        dropped = ~keep
        if sc is not None:
            out[:, dropped, :] = sc[:, dropped, :]
        else:
            out[:, dropped, :] = 0
    return out.reshape(residual.shape)


def backward(grad_out, survival_prob, *, training=True, seed=0, offset=0, mode="row", axis=0,
             scaling="inference"):
    """(grad_shortcut, grad_residual): grad_out, and s * grad_out for kept samples, 0 otherwise."""
    grad_out = np.asarray(grad_out)
    grad_residual = forward(None, grad_out, survival_prob, training=training, seed=seed,
                            offset=offset, mode=mode, axis=axis, scaling=scaling)
    return grad_out, grad_residual


def forward_kept(shortcut, kept_residual, survival_prob, *, seed=0, offset=0, mode="row", axis=0,
                 scaling="inference"):
    """Training forward where the residual was computed for the kept samples only.

    `kept_residual` has, along `axis`, one entry per kept sample in order (StochasticResidual:
    the branch ran on those samples only). The result equals `forward` with the full residual.
    """
    shortcut = np.asarray(shortcut)
    keep = mask(shortcut.shape[axis], survival_prob, seed=seed, offset=offset, mode=mode)
    full = np.zeros_like(shortcut)
    index = [slice(None)] * shortcut.ndim
    index[axis] = np.flatnonzero(keep)
    full[tuple(index)] = kept_residual
    return forward(shortcut, full, survival_prob, training=True, seed=seed, offset=offset,
                   mode=mode, axis=axis, scaling=scaling)


def backward_kept(grad_out, survival_prob, *, seed=0, offset=0, mode="row", axis=0,
                  scaling="inference"):
    """s * grad_out gathered at the kept samples (along `axis`): the branch output's gradient."""
    grad_out = np.asarray(grad_out)
    keep = mask(grad_out.shape[axis], survival_prob, seed=seed, offset=offset, mode=mode)
    _, grad_residual = backward(grad_out, survival_prob, training=True, seed=seed, offset=offset,
                                mode=mode, axis=axis, scaling=scaling)
    return np.take(grad_residual, np.flatnonzero(keep), axis=axis)
