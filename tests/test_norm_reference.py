"""stochdepth.reference.forward_norm / backward_norm (docs/design.md, "Fused residual and norm"):
against an independent float64 computation within a tolerance, and the pinned order itself."""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16

from stochdepth import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _independent(shortcut, residual, p, weight, bias, norm, eps, gamma, keep, s):
    """float64, numpy's own reductions, the textbook formulas; rows as (B, R, C)."""
    sc = shortcut.astype(np.float64)
    res = residual.astype(np.float64)
    if gamma is not None:
        res = res * gamma.astype(np.float64)
    k = keep.reshape((-1,) + (1,) * (sc.ndim - 1))
    y = np.where(k, sc + s * res, sc)
    if norm == "layer":
        mean = y.mean(-1, keepdims=True)
        xhat = (y - mean) / np.sqrt(((y - mean) ** 2).mean(-1, keepdims=True) + eps)
    else:
        xhat = y / np.sqrt((y * y).mean(-1, keepdims=True) + eps)
    n = xhat * (weight.astype(np.float64) if weight is not None else 1)
    if bias is not None:
        n = n + bias.astype(np.float64)
    return y, n


TOL = {np.float64: 1e-12, np.float32: 2e-5, np.float16: 4e-3, BF16: 3e-2}


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BF16])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("width", [1, 3, 17, 64, 130])
@pytest.mark.parametrize("with_gamma", [False, True])
def test_forward_close_to_float64(dtype, norm, width, with_gamma):
    rng = np.random.default_rng(width)
    shape = (6, 3, width)
    sc = rng.standard_normal(shape).astype(dtype)
    res = rng.standard_normal(shape).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(width)).astype(dtype)
    b = None if norm == "rms" else (0.1 * rng.standard_normal(width)).astype(dtype)
    g = (0.5 + rng.random(width)).astype(dtype) if with_gamma else None
    p, seed, offset = 0.5, 11, 3
    y, n = reference.forward_norm(sc, res, p, w, b, norm=norm, eps=1e-5, gamma=g, seed=seed,
                                  offset=offset, scaling="training")
    keep = reference.mask(6, p, seed=seed, offset=offset)
    ey, en = _independent(sc, res, p, w, b, norm, 1e-5, g, keep, 2.0)
    tol = TOL[dtype]
    np.testing.assert_allclose(y.astype(np.float64), ey, rtol=tol, atol=tol)
    # n from the rounded y, as the op defines it (the unfused sequence would see the same)
    _, en = _independent(y, np.zeros_like(y), p, w, b, norm, 1e-5, None, keep, 0.0)
    np.testing.assert_allclose(n.astype(np.float64), en, rtol=4 * tol, atol=4 * tol)
    # dropped samples: y is the shortcut bit for bit
    assert np.array_equal(y[~keep].view(np.uint8), sc[~keep].view(np.uint8))


def _numeric_grads(sc, res, p, w, b, norm, eps, g, keep, s, gy, gn):
    def loss(sc_, res_, w_, b_, g_):
        y, n = _independent(sc_, res_, p, w_, b_, norm, eps, g_, keep, s)
        return (y * gy).sum() + (n * gn).sum()

    def grad(i, args):
        x = args[i]
        out = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            hi = [a.copy() if a is not None else None for a in args]
            lo = [a.copy() if a is not None else None for a in args]
            hi[i][idx] += 1e-6
            lo[i][idx] -= 1e-6
            out[idx] = (loss(*hi) - loss(*lo)) / 2e-6
        return out

    args = [sc, res, w, b, g]
    return [grad(i, args) if a is not None else None for i, a in enumerate(args)]


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_gamma", [False, True])
def test_backward_matches_finite_differences(norm, with_gamma):
    rng = np.random.default_rng(5)
    shape, width = (4, 2, 5), 5
    sc, res, gy, gn = (rng.standard_normal(shape) for _ in range(4))
    w = 1 + 0.1 * rng.standard_normal(width)
    b = None if norm == "rms" else 0.1 * rng.standard_normal(width)
    g = 0.5 + rng.random(width) if with_gamma else None
    p, seed, offset, eps = 0.5, 3, 1, 1e-5
    keep = reference.mask(4, p, seed=seed, offset=offset)
    y, _ = reference.forward_norm(sc, res, p, w, b, norm=norm, eps=eps, gamma=g, seed=seed,
                                  offset=offset, scaling="training")
    got = reference.backward_norm(gy, gn, y, res, p, w, b, norm=norm, eps=eps, gamma=g,
                                  seed=seed, offset=offset, scaling="training")
    d_sc, d_res, d_w, d_b, d_g = _numeric_grads(sc, res, p, w, b, norm, eps, g, keep, 2.0, gy, gn)
    for actual, expected in zip(got, [d_sc, d_res, d_g, d_w, d_b]):
        assert (actual is None) == (expected is None)
        if actual is not None:
            np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_row_sum_order_is_lanes_then_tree():
    rng = np.random.default_rng(0)
    for c in [1, 5, 16, 17, 40, 300]:
        x = (rng.standard_normal((3, c)) * 10.0 ** rng.integers(-6, 6, (3, c))).astype(np.float32)
        got = reference._row_sums(x)
        for r in range(3):
            acc = [np.float32(0)] * 16
            for i in range(c):
                acc[i % 16] = np.float32(acc[i % 16] + x[r, i])
            for h in (8, 4, 2, 1):
                for j in range(h):
                    acc[j] = np.float32(acc[j] + acc[j + h])
            assert acc[0].tobytes() == got[r].tobytes()


def test_column_sum_order_is_blocks_of_64():
    rng = np.random.default_rng(1)
    t = (rng.standard_normal((200, 3)) * 10.0 ** rng.integers(-6, 6, (200, 3))).astype(np.float32)
    keep = rng.random(200) < 0.7
    total = np.zeros(3, np.float32)
    for b0 in range(0, 200, 64):
        part = np.zeros(3, np.float32)
        for r in range(b0, min(b0 + 64, 200)):
            if keep[r]:
                part = part + t[r]
        total = total + part
    assert total.tobytes() == reference._column_sums(t, keep).tobytes()
    # not the plain sequential order, on these values: the order is part of the contract
    seq = np.zeros(3, np.float32)
    for r in np.flatnonzero(keep):
        seq = seq + t[r]
    assert seq.tobytes() != total.tobytes()


def test_errors():
    x = np.zeros((2, 4), np.float32)
    w = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="norm must be"):
        reference.forward_norm(x, x, 0.5, w, norm="batch")
    with pytest.raises(ValueError, match="eps must be"):
        reference.forward_norm(x, x, 0.5, w, eps=0.0)
    with pytest.raises(ValueError, match="bias must be None"):
        reference.forward_norm(x, x, 0.5, w, w, norm="rms")
