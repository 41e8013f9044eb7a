"""The fused residual + norm on the CPU (docs/design.md, "Fused residual and norm"): forward and
backward equal stochdepth.reference bit for bit for every dtype, norm kind, gamma on and off,
awkward widths, both modes, p in {0, 0.5, 1}, every ISA this CPU runs and 1, 2 and many threads.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_dlpack import NumpyDLPack
from sd_testutil import (
    BF16,
    DTYPE_IDS,
    DTYPES,
    SUPPORTED_ISAS,
    assert_bits_equal,
    random_array,
    use_isa,
    use_threads,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

WIDTHS = [1, 2, 3, 15, 16, 17, 63, 64, 65, 768, 1023, 16384]


def _case(dtype, width, norm, with_gamma, *, seed=0, batch=None, special=False):
    rng = np.random.default_rng([width, seed])
    per = 3 if width <= 1024 else 1
    batch = batch or (6 if width <= 1024 else 4)
    shape = (batch, per, width)
    sc = random_array(rng, shape, dtype, special=special)
    res = random_array(rng, shape, dtype, special=special)
    w = (1 + 0.2 * rng.standard_normal(width)).astype(dtype)
    b = None if norm == "rms" else (0.1 * rng.standard_normal(width)).astype(dtype)
    g = (0.5 + rng.random(width)).astype(dtype) if with_gamma else None
    gy = random_array(rng, shape, dtype, special=False)
    gn = random_array(rng, shape, dtype, special=False)
    return sc, res, w, b, g, gy, gn


def _check(dtype, width, norm, with_gamma, p, mode, *, scaling="training", training=True,
           weight=True, special=False):
    sc, res, w, b, g, gy, gn = _case(dtype, width, norm, with_gamma, special=special)
    if not weight:
        w = b = None
    kw = dict(norm=norm, eps=1e-5, gamma=g, seed=77, offset=5, training=training, mode=mode,
              scaling=scaling)
    y, n = stochdepth.forward_norm(sc, res, p, w, b, **kw)
    ey, en = reference.forward_norm(sc, res, p, w, b, **kw)
    assert_bits_equal(y, ey, "y")
    assert_bits_equal(n, en, "n")
    got = stochdepth.backward_norm(gy, gn, y, res, p, w, b, **kw)
    want = reference.backward_norm(gy, gn, ey, res, p, w, b, **kw)
    names = ["grad_shortcut", "grad_residual", "grad_gamma", "grad_weight", "grad_bias"]
    for name, a, e in zip(names, got, want):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_bits_equal(a, e, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_gamma", [False, True], ids=["nogamma", "gamma"])
def test_matches_reference(dtype, width, norm, with_gamma):
    _check(dtype, width, norm, with_gamma, 0.5, "row")


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_probabilities_modes_scalings(p, mode, scaling, norm):
    for dtype in (np.float32, BF16):
        _check(dtype, 65, norm, True, p, mode, scaling=scaling)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("weight", [True, False], ids=["affine", "plain"])
def test_inference_and_no_affine(training, weight):
    for norm in ("layer", "rms"):
        _check(np.float32, 17, norm, False, 0.5, "row", training=training, weight=weight)
        _check(np.float16, 33, norm, True, 0.5, "row", training=training, weight=weight)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("threads", [(1, None), (2, 0), (7, 0)], ids=["1", "2", "7"])
def test_every_isa_and_thread_count(isa, threads):
    with use_isa(isa), use_threads(*threads):
        for dtype in DTYPES:
            for width in (3, 17, 64, 769):
                for norm in ("layer", "rms"):
                    _check(dtype, width, norm, width != 64, 0.5, "row")


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_column_sums_over_many_blocks_any_threads(isa):
    """200 samples x 3 rows: 10 blocks of 64 rows; the sums do not depend on the split."""
    sc, res, w, b, g, gy, gn = _case(np.float32, 40, "layer", True, batch=200)
    kw = dict(gamma=g, seed=3, offset=1)
    y, _ = reference.forward_norm(sc, res, 0.7, w, b, **kw)
    want = reference.backward_norm(gy, gn, y, res, 0.7, w, b, **kw)
    with use_isa(isa):
        for threads in [(1, None), (2, 0), (5, 0)]:
            with use_threads(*threads):
                got = stochdepth.backward_norm(gy, gn, y, res, 0.7, w, b, **kw)
            for a, e in zip(got, want):
                assert_bits_equal(a, e)


def test_dropped_rows_residual_not_read_nan_stays_out():
    sc, res, w, b, g, gy, gn = _case(np.float32, 20, "layer", True)
    keep = stochdepth.mask(6, 0.5, seed=9, offset=0)
    assert keep.any() and not keep.all()
    res[~keep] = np.nan
    y, n = stochdepth.forward_norm(sc, res, 0.5, w, b, gamma=g, seed=9)
    assert_bits_equal(y[~keep], sc[~keep])
    assert np.isfinite(n).all()
    got = stochdepth.backward_norm(gy, gn, y, res, 0.5, w, b, gamma=g, seed=9)
    assert np.isfinite(got[2]).all()  # grad_gamma: dropped rows' residual not read
    assert (got[1][~keep].view(np.uint32) == 0).all()


def test_special_values_nan_aware():
    """Large, subnormal and signed-zero inputs: bits where finite, NaN-ness elsewhere."""
    for dtype in DTYPES:
        sc, res, w, b, g, gy, gn = _case(dtype, 37, "layer", True, special=True)
        y, n = stochdepth.forward_norm(sc, res, 0.5, w, b, gamma=g, seed=4)
        ey, en = reference.forward_norm(sc, res, 0.5, w, b, gamma=g, seed=4)
        for a, e in ((y, ey), (n, en)):
            a64, e64 = a.astype(np.float64), e.astype(np.float64)
            assert np.array_equal(np.isnan(a64), np.isnan(e64))
            ok = ~np.isnan(e64)
            assert_bits_equal(a[ok], e[ok])


def test_empty_and_rank():
    x = np.zeros((0, 4), np.float32)
    w = np.ones(4, np.float32)
    y, n = stochdepth.forward_norm(x, x, 0.5, w, w, seed=1)
    assert y.shape == n.shape == (0, 4)
    got = stochdepth.backward_norm(x, x, y, x, 0.5, w, w, gamma=w, seed=1)
    for v in got[2:]:
        assert v.shape == (4,) and not v.any()


def test_dlpack_inputs_give_arrays():

    sc, res, w, b, g, gy, gn = _case(np.float32, 16, "layer", True)
    d = NumpyDLPack
    y, n = stochdepth.forward_norm(d(sc), d(res), 0.5, d(w), d(b), gamma=d(g), seed=2)
    assert isinstance(y, stochdepth.Array)
    ey, en = reference.forward_norm(sc, res, 0.5, w, b, gamma=g, seed=2)
    assert_bits_equal(np.from_dlpack(y), ey)
    assert_bits_equal(np.from_dlpack(n), en)
