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
    "forward_norm",
    "backward_norm",
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


def _check_gamma(gamma, like, axis, ct):
    """gamma (the layer scale) as a compute-type vector over the last axis of `like`, which must
    not be the sample axis (docs/design.md, "Layer scale")."""
    gamma = np.asarray(gamma)
    if like.ndim < 2 or axis % like.ndim == like.ndim - 1:
        raise ValueError("gamma scales the channels (the last axis), which must not be the sample "
                         f"axis; got axis={axis} for rank {like.ndim}")
    if gamma.shape != like.shape[-1:]:
        raise ValueError(f"gamma must have shape ({like.shape[-1]},), got {gamma.shape}")
    return gamma.astype(ct)


def forward(shortcut, residual, survival_prob, *, training=True, seed=0, offset=0, mode="row",
            axis=0, scaling="inference", gamma=None):
    """out = shortcut + keep * s * residual (training) or shortcut + c * residual (inference).

    `shortcut=None` is the single-input form (out = keep * s * residual). A dropped sample gives
    the shortcut bit for bit (or zeros), and its residual is never read: NaN/Inf there do not
    reach the output. `gamma` (shape (C,), C the last axis) is the layer scale:
    out = shortcut + keep * s * (gamma * residual), the residual scaled first, then s
    (docs/design.md, "Layer scale"); None is the op without it.
    """
    residual = np.asarray(residual)
    dtype = residual.dtype
    ct = _compute_type(dtype)
    s = scale_factor(survival_prob, training=training, scaling=scaling, dtype=dtype)
    # IEEE overflow to Inf and NaN inputs are part of the contract, not warnings (the rows of
    # dropped samples are computed here and then discarded).
    with np.errstate(over="ignore", invalid="ignore"):
        t = residual.astype(ct)
        if gamma is not None:
            t = _check_gamma(gamma, residual, axis, ct) * t  # t = gamma * residual, rounded
        scaled = s * _as_obi(t, axis)  # one rounding: the multiply
        if shortcut is not None:
            sc = _as_obi(np.asarray(shortcut), axis)
            out = (sc.astype(ct) + scaled).astype(dtype)  # the add, then one rounding on store
        else:
            sc = None
            out = scaled.astype(dtype)
    if training:
        keep = mask(out.shape[1], survival_prob, seed=seed, offset=offset, mode=mode)
        dropped = ~keep
        if sc is not None:
            out[:, dropped, :] = sc[:, dropped, :]
        else:
            out[:, dropped, :] = 0
    return out.reshape(residual.shape)


def backward(grad_out, survival_prob, *, training=True, seed=0, offset=0, mode="row", axis=0,
             scaling="inference", gamma=None, residual=None):
    """(grad_shortcut, grad_residual): grad_out, and s * grad_out for kept samples, 0 otherwise.

    With `gamma`: (grad_shortcut, grad_residual, grad_gamma), where grad_residual is
    gamma * (s * grad_out) for kept samples (0 otherwise) and grad_gamma[i] sums
    (s * grad_out) * residual over the kept samples' rows (every index but the last axis) in
    the pinned order of docs/design.md, "Layer scale": blocks of 64 rows. `residual` (the
    forward's) is needed then, and read on kept rows only; without gamma it is not used.
    """
    grad_out = np.asarray(grad_out)
    if gamma is None:
        grad_residual = forward(None, grad_out, survival_prob, training=training, seed=seed,
                                offset=offset, mode=mode, axis=axis, scaling=scaling)
        return grad_out, grad_residual
    if residual is None:
        raise ValueError("residual is needed with gamma: grad_gamma sums grad_out * residual")
    residual = np.asarray(residual)
    if residual.shape != grad_out.shape:
        raise ValueError(f"residual must have shape {grad_out.shape} like grad_out, got "
                         f"{residual.shape}")
    dtype = grad_out.dtype
    ct = _compute_type(dtype)
    g = _check_gamma(gamma, grad_out, axis, ct)
    s = scale_factor(survival_prob, training=training, scaling=scaling, dtype=dtype)
    batch = grad_out.shape[axis % grad_out.ndim]
    if training:
        keep = mask(batch, survival_prob, seed=seed, offset=offset, mode=mode)
    else:
        keep = np.ones(batch, bool)
    # Each element's keep flag; a row (every axis but the last) lies within one sample.
    kept = np.broadcast_to(keep[None, :, None], _as_obi(grad_out, axis).shape).reshape(
        grad_out.shape)
    c = grad_out.shape[-1]
    rows = grad_out.size // c if c else 0
    kept_rows = kept.reshape(rows, c)[:, 0] if c else np.zeros(0, bool)
    with np.errstate(over="ignore", invalid="ignore"):
        v = s * grad_out.astype(ct)
        grad_residual = g * v
        grad_residual[~kept] = 0
        v = v.reshape(rows, c)
        terms = np.zeros_like(v)
        # dropped rows' residual is not read
        terms[kept_rows] = v[kept_rows] * residual.reshape(rows, c)[kept_rows].astype(ct)
        grad_gamma = _column_sums(terms, kept_rows).astype(dtype)
    return grad_out, grad_residual.astype(dtype), grad_gamma


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


# ---- the fused residual and norm (docs/design.md, "Fused residual and norm")

_LANES = 16  # row sums: 16 lane accumulators, then a fixed tree
_ROW_BLOCK = 64  # column sums: blocks of 64 rows, combined in block order


def _row_sums(x):
    """Sum of each row of `x` (rows, C) in the pinned order: lane j (0 <= j < 16) adds the
    elements j, j + 16, j + 32, ... in index order to +0; then for h in 8, 4, 2, 1:
    lane[j] += lane[j + h] for j < h. Every add is rounded to x's dtype."""
    rows, c = x.shape
    steps = -(-c // _LANES)
    # Padding with +0 adds nothing: a lane that starts at +0 is never -0, and v + (+0) == v.
    padded = np.zeros((rows, steps * _LANES), x.dtype)
    padded[:, :c] = x
    padded = padded.reshape(rows, steps, _LANES)
    acc = np.zeros((rows, _LANES), x.dtype)
    for k in range(steps):
        acc = acc + padded[:, k, :]
    for h in (8, 4, 2, 1):
        acc[:, :h] = acc[:, :h] + acc[:, h : 2 * h]
    return acc[:, 0]


def _column_sums(terms, include):
    """Sum over the rows of `terms` (rows, C) where `include` holds, in the pinned order: each
    block of 64 rows (in row order) sums its rows in order into +0; the block sums are added in
    block order into +0."""
    total = np.zeros(terms.shape[1], terms.dtype)
    for b0 in range(0, terms.shape[0], _ROW_BLOCK):
        part = np.zeros(terms.shape[1], terms.dtype)
        for r in range(b0, min(b0 + _ROW_BLOCK, terms.shape[0])):
            if include[r]:
                part = part + terms[r]
        total = total + part
    return total


def _norm_rows(a, survival_prob, training, seed, offset, mode):
    """`a` (shape (B, ..., C)) as rows (rows, C), and each row's keep flag (all True at
    inference): row r belongs to sample r // (rows / B)."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise ValueError(f"the inputs must have rank >= 2 (samples, ..., channels), got {a.ndim}")
    batch, c = a.shape[0], a.shape[-1]
    rows = a.size // c if c else 0
    per_sample = rows // batch if batch else 0
    if training:
        keep = mask(batch, survival_prob, seed=seed, offset=offset, mode=mode)
    else:
        keep = np.ones(batch, bool)
    return a.reshape(rows, c), np.repeat(keep, per_sample)


def _row_stats(y, norm, eps):
    """(mean, rstd) of each row of y (compute type); mean is 0 for RMSNorm (unused)."""
    ct = y.dtype.type
    c = ct(y.shape[1])
    if norm == "layer":
        mean = _row_sums(y) / c
        d = y - mean[:, None]
        var = _row_sums(d * d) / c
    else:
        mean = np.zeros(y.shape[0], y.dtype)
        var = _row_sums(y * y) / c
    rstd = ct(1) / np.sqrt(var + ct(eps))
    return mean, rstd


def _xhat(y, mean, rstd, norm):
    if norm == "layer":
        return (y - mean[:, None]) * rstd[:, None]
    return y * rstd[:, None]


def _check_norm(norm, eps, bias):
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if norm == "rms" and bias is not None:
        raise ValueError("bias must be None for norm='rms' (RMSNorm has no bias)")


def forward_norm(shortcut, residual, survival_prob, weight, bias=None, *, norm="layer", eps=1e-6,
                 gamma=None, seed=0, offset=0, training=True, mode="row", scaling="inference"):
    """The fused pre-norm block tail: (y, n) with

        y = shortcut + keep[b] * s * (gamma * residual)     (gamma None: shortcut + s * residual)
        n = LayerNorm(y; weight, bias, eps) or RMSNorm(y; weight, eps) over the last axis

    in the pinned order of docs/design.md, "Fused residual and norm". Inputs have shape
    (B, ..., C), samples along axis 0; weight, bias and gamma have shape (C,) (weight None: no
    scale). A dropped sample's y is its shortcut bit for bit; its residual is not used. The
    norm reads y rounded to the storage dtype.
    """
    _check_norm(norm, eps, bias)
    shortcut = np.asarray(shortcut)
    dtype = shortcut.dtype
    ct = _compute_type(dtype)
    s = scale_factor(survival_prob, training=training, scaling=scaling, dtype=dtype)
    sc, keep = _norm_rows(shortcut, survival_prob, training, seed, offset, mode)
    res, _ = _norm_rows(residual, survival_prob, training, seed, offset, mode)
    with np.errstate(over="ignore", invalid="ignore"):
        t = res.astype(ct)
        if gamma is not None:
            t = np.asarray(gamma).astype(ct) * t
        y = (sc.astype(ct) + s * t).astype(dtype)  # u = s * t, then the add, then one rounding
        y[~keep] = sc[~keep]
        yc = y.astype(ct)
        mean, rstd = _row_stats(yc, norm, eps)
        n = _xhat(yc, mean, rstd, norm)
        if weight is not None:
            n = n * np.asarray(weight).astype(ct)
        if bias is not None:
            n = n + np.asarray(bias).astype(ct)
    return y.reshape(shortcut.shape), n.astype(dtype).reshape(shortcut.shape)


def backward_norm(grad_y, grad_n, y, residual, survival_prob, weight, bias=None, *, norm="layer",
                  eps=1e-6, gamma=None, seed=0, offset=0, training=True, mode="row",
                  scaling="inference"):
    """Gradients of `forward_norm` for the same arguments, given its output `y` and the
    gradients of both outputs: (grad_shortcut, grad_residual, grad_gamma, grad_weight,
    grad_bias), None for a parameter that was None. `residual` is read only with gamma (for
    grad_gamma; None allowed otherwise), `bias` only for whether it was given. The row
    statistics are recomputed from y; the mask from (seed, offset).
    """
    _check_norm(norm, eps, bias)
    y = np.asarray(y)
    dtype = y.dtype
    ct = _compute_type(dtype)
    s = scale_factor(survival_prob, training=training, scaling=scaling, dtype=dtype)
    yr, keep = _norm_rows(y, survival_prob, training, seed, offset, mode)
    gy, _ = _norm_rows(grad_y, survival_prob, training, seed, offset, mode)
    gn, _ = _norm_rows(grad_n, survival_prob, training, seed, offset, mode)
    c = ct(yr.shape[1])
    with np.errstate(over="ignore", invalid="ignore"):
        yc = yr.astype(ct)
        mean, rstd = _row_stats(yc, norm, eps)
        xhat = _xhat(yc, mean, rstd, norm)
        g = gn.astype(ct)
        dxhat = g * np.asarray(weight).astype(ct) if weight is not None else g
        mb = _row_sums(dxhat * xhat) / c
        if norm == "layer":
            ma = _row_sums(dxhat) / c
            dn = rstd[:, None] * ((dxhat - ma[:, None]) - xhat * mb[:, None])
        else:
            dn = rstd[:, None] * (dxhat - xhat * mb[:, None])
        dy = gy.astype(ct) + dn
        v = s * dy
        gr = np.asarray(gamma).astype(ct) * v if gamma is not None else v
        gr[~keep] = 0
        grad_gamma = grad_weight = grad_bias = None
        if gamma is not None:
            res, _ = _norm_rows(residual, survival_prob, training, seed, offset, mode)
            terms = np.zeros_like(v)
            terms[keep] = v[keep] * res[keep].astype(ct)  # dropped rows' residual is not read
            grad_gamma = _column_sums(terms, keep).astype(dtype)
        every = np.ones(yr.shape[0], bool)
        if weight is not None:
            grad_weight = _column_sums(g * xhat, every).astype(dtype)
        if bias is not None:
            grad_bias = _column_sums(g, every).astype(dtype)
    shape = y.shape
    return (dy.astype(dtype).reshape(shape), gr.astype(dtype).reshape(shape), grad_gamma,
            grad_weight, grad_bias)
