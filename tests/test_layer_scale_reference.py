"""stochdepth.reference.forward / backward with gamma, the layer scale (docs/design.md, "Layer
scale"): the same bits as the fused norm's y and grad_gamma, an independent float64 check, and
the op without gamma unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16, assert_bits_equal, random_array

from stochdepth import reference

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [np.float64, np.float32, np.float16, BF16]


def _inputs(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    sc = rng.standard_normal(shape).astype(dtype)
    res = rng.standard_normal(shape).astype(dtype)
    gamma = (1e-2 * rng.standard_normal(shape[-1])).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    return sc, res, gamma, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 1), (5, 3, 17), (130, 40), (3, 70, 24)])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_same_bits_as_the_fused_norm(dtype, shape, scaling, training, norm):
    """y of forward_norm, and grad_gamma of backward_norm with grad_n = 0, bit for bit."""
    sc, res, gamma, g = _inputs(dtype, shape)
    kw = dict(seed=5, offset=2, training=training, scaling=scaling)
    y, _ = reference.forward_norm(sc, res, 0.6, None, norm=norm, gamma=gamma, **kw)
    out = reference.forward(sc, res, 0.6, gamma=gamma, **kw)
    assert_bits_equal(out, y)
    grads = reference.backward_norm(g, np.zeros_like(g), y, res, 0.6, None, norm=norm,
                                    gamma=gamma, **kw)
    _, _, grad_gamma = reference.backward(g, 0.6, gamma=gamma, residual=res, **kw)
    assert_bits_equal(grad_gamma, grads[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1])
def test_close_to_float64(dtype, axis):
    """An independent float64 computation (numpy's own sums), within the dtype's tolerance."""
    shape = (7, 6, 9)
    sc, res, gamma, g = _inputs(dtype, shape, seed=3)
    p, seed, offset = 0.5, 9, 4
    keep = reference.mask(shape[axis], p, seed=seed, offset=offset)
    k = keep.reshape([-1 if i == axis else 1 for i in range(3)])
    g64, r64, gam64 = g.astype(np.float64), res.astype(np.float64), gamma.astype(np.float64)
    out = reference.forward(sc, res, p, gamma=gamma, seed=seed, offset=offset, axis=axis,
                            scaling="training")
    expect = np.where(k, sc.astype(np.float64) + 2.0 * gam64 * r64, sc.astype(np.float64))
    tol = {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-3, BF16: 2e-2}[dtype]
    np.testing.assert_allclose(out.astype(np.float64), expect, rtol=tol, atol=tol)
    gs, gr, gg = reference.backward(g, p, gamma=gamma, residual=res, seed=seed, offset=offset,
                                    axis=axis, scaling="training")
    assert gs is g
    np.testing.assert_allclose(gr.astype(np.float64), np.where(k, 2.0 * gam64 * g64, 0.0),
                               rtol=tol, atol=tol)
    expect_gg = np.where(k, 2.0 * g64 * r64, 0.0).reshape(-1, 9).sum(0)
    np.testing.assert_allclose(gg.astype(np.float64), expect_gg, rtol=20 * tol, atol=20 * tol)
    # dropped samples: the shortcut bit for bit, exact zeros in grad_residual
    dropped = np.take(np.arange(shape[axis]), np.flatnonzero(~keep))
    assert_bits_equal(np.take(out, dropped, axis), np.take(sc, dropped, axis))
    assert not np.take(gr, dropped, axis).any()


def test_dropped_residual_is_not_read():
    sc, res, gamma, g = _inputs(np.float32, (8, 16))
    keep = reference.mask(8, 0.5, seed=1)
    bad = res.copy()
    bad[~keep] = np.nan
    out = reference.forward(sc, bad, 0.5, gamma=gamma, seed=1)
    assert_bits_equal(out, reference.forward(sc, res, 0.5, gamma=gamma, seed=1))
    _, _, gg = reference.backward(g, 0.5, gamma=gamma, residual=bad, seed=1)
    assert_bits_equal(gg, reference.backward(g, 0.5, gamma=gamma, residual=res, seed=1)[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_gamma_unchanged(dtype):
    rng = np.random.default_rng(1)
    sc, res = (random_array(rng, (9, 5, 3), dtype) for _ in range(2))
    for axis in (0, 1, 2):
        out = reference.forward(sc, res, 0.7, seed=3, axis=axis)
        assert_bits_equal(out, reference.forward(sc, res, 0.7, seed=3, axis=axis, gamma=None))
        pair = reference.backward(res, 0.7, seed=3, axis=axis, residual=sc)
        assert len(pair) == 2 and pair[0] is res
        assert_bits_equal(pair[1], reference.forward(None, res, 0.7, seed=3, axis=axis))


def test_gamma_arguments_refused():
    sc, res, gamma, g = _inputs(np.float32, (4, 6))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\)"):
        reference.forward(sc, res, 0.5, gamma=gamma[:5], seed=1)
    with pytest.raises(ValueError, match="must not be the sample axis"):
        reference.forward(sc, res, 0.5, gamma=np.ones(4, np.float32), seed=1, axis=1)
    with pytest.raises(ValueError, match="residual is needed with gamma"):
        reference.backward(g, 0.5, gamma=gamma, seed=1)
