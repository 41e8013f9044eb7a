"""The layer scale of the plain op, `gamma` (docs/design.md, "Layer scale"), through the raw API
on the CPU: forward and backward equal stochdepth.reference bit for bit for every ISA this CPU
runs, 1 and 2 threads, every dtype, mode, scaling, axis and form; the same bits as the fused
norm's y and grad_gamma; and every bad argument refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
from sd_dlpack import NumpyDLPack
from sd_testutil import (
    DTYPE_IDS,
    DTYPES,
    F32,
    F64,
    SUPPORTED_ISAS,
    THREAD_MODES,
    assert_bits_equal,
    random_array,
    use_isa,
    use_threads,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SHAPES = [(6, 1), (5, 17), (7, 3, 33), (4, 2, 64), (3, 130, 24), (2, 5, 3, 8)]


def _case(dtype, shape, seed=0, special=True):
    rng = np.random.default_rng([len(shape), shape[-1], seed])
    sc = random_array(rng, shape, dtype, special=special)
    res = random_array(rng, shape, dtype, special=special)
    gamma = random_array(rng, shape[-1:], dtype, special=special)
    g = random_array(rng, shape, dtype, special=special)
    return sc, res, gamma, g


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@pytest.mark.parametrize("threads", list(THREAD_MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_equals_reference(isa, threads, dtype):
    for shape in SHAPES:
        sc, res, gamma, g = _case(dtype, shape)
        for axis in range(len(shape) - 1):
            for training, p, mode, scaling in [(True, 0.5, "row", "training"),
                                               (True, 0.7, "batch", "inference"),
                                               (True, 1.0, "row", "inference"),
                                               (True, 0.0, "row", "training"),
                                               (False, 0.6, "row", "inference"),
                                               (False, 0.6, "row", "training")]:
                kw = dict(training=training, seed=11, offset=3, mode=mode, axis=axis,
                          scaling=scaling, gamma=gamma)
                where = f"{shape} axis={axis} {kw}"
                with use_isa(isa), use_threads(*THREAD_MODES[threads]):
                    out = stochdepth.forward(sc, res, p, **kw)
                    single = stochdepth.forward(None, res, p, **kw)
                    inplace = sc.copy()
                    stochdepth.forward(inplace, res, p, out=inplace, **kw)
                    grads = stochdepth.backward(g, p, residual=res, **kw)
                assert_bits_equal(out, reference.forward(sc, res, p, **kw), where)
                assert_bits_equal(single, reference.forward(None, res, p, **kw), where)
                assert_bits_equal(inplace, out, where)
                want = reference.backward(g, p, residual=res, **kw)
                assert len(grads) == 3 and grads[0] is g
                assert_bits_equal(grads[1], want[1], where + " grad_residual")
                assert_bits_equal(grads[2], want[2], where + " grad_gamma")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_same_bits_as_the_fused_norm(dtype, norm):
    """out equals forward_norm's y, and grad_gamma backward_norm's with grad_n = 0."""
    sc, res, gamma, g = _case(dtype, (9, 70, 24), special=False)
    kw = dict(seed=5, offset=2, scaling="training", gamma=gamma)
    y, _ = stochdepth.forward_norm(sc, res, 0.6, None, norm=norm, **kw)
    assert_bits_equal(stochdepth.forward(sc, res, 0.6, **kw), y)
    norm_grads = stochdepth.backward_norm(g, np.zeros_like(g), y, res, 0.6, None, norm=norm, **kw)
    assert_bits_equal(stochdepth.backward(g, 0.6, residual=res, **kw)[2], norm_grads[2])


@pytest.mark.parametrize("dtype", [F32, F64], ids=DTYPE_IDS.get)
def test_grad_gamma_independent_of_threads_and_isa(dtype):
    """Large enough for many row blocks split over the pool: every ISA and thread count gives
    the same grad_gamma, equal to the reference's."""
    _, res, gamma, g = _case(dtype, (64, 40, 96), special=False)
    want = reference.backward(g, 0.5, residual=res, gamma=gamma, seed=3)[2]
    for isa in SUPPORTED_ISAS:
        for n, threshold in [(1, None), (2, 0), (3, 0)]:
            with use_isa(isa), use_threads(n, threshold):
                got = stochdepth.backward(g, 0.5, residual=res, gamma=gamma, seed=3)[2]
            assert_bits_equal(got, want, f"{isa} {n} threads")


def test_dropped_samples_not_read():
    sc, res, gamma, g = _case(F32, (16, 24), special=False)
    keep = stochdepth.mask(16, 0.5, seed=4)
    assert keep.any() and not keep.all()
    bad_res, bad_g = res.copy(), g.copy()
    bad_res[~keep] = np.nan
    bad_g[~keep] = np.nan
    out = stochdepth.forward(sc, bad_res, 0.5, seed=4, gamma=gamma)
    assert_bits_equal(out, reference.forward(sc, res, 0.5, seed=4, gamma=gamma))
    got = stochdepth.backward(bad_g, 0.5, seed=4, gamma=gamma, residual=bad_res)
    want = reference.backward(g, 0.5, seed=4, gamma=gamma, residual=res)
    assert_bits_equal(got[1], want[1])
    assert_bits_equal(got[2], want[2])
    assert not got[1][~keep].any()


def test_no_rows_and_nothing_kept():
    gamma = np.ones(5, F32)
    empty = np.zeros((0, 5), F32)
    _, gr, gg = stochdepth.backward(empty, 0.5, seed=1, gamma=gamma, residual=empty)
    assert gr.shape == (0, 5)
    assert_bits_equal(gg, np.zeros(5, F32))
    sc, res, _, g = _case(F32, (4, 5))
    _, gr, gg = stochdepth.backward(g, 0.0, seed=1, gamma=gamma, residual=res)
    assert_bits_equal(gg, np.zeros(5, F32))
    assert_bits_equal(gr, np.zeros_like(g))
    assert_bits_equal(stochdepth.forward(sc, res, 0.0, seed=1, gamma=gamma), sc)


def test_dlpack_inputs():
    sc, res, gamma, g = _case(F32, (6, 7, 8), special=False)
    out = stochdepth.forward(NumpyDLPack(sc), NumpyDLPack(res), 0.5, seed=2,
                             gamma=NumpyDLPack(gamma))
    assert_bits_equal(np.from_dlpack(out), reference.forward(sc, res, 0.5, seed=2, gamma=gamma))
    _, gr, gg = stochdepth.backward(NumpyDLPack(g), 0.5, seed=2, gamma=NumpyDLPack(gamma),
                                    residual=NumpyDLPack(res))
    want = reference.backward(g, 0.5, seed=2, gamma=gamma, residual=res)
    assert_bits_equal(np.from_dlpack(gr), want[1])
    assert_bits_equal(np.from_dlpack(gg), want[2])


def test_without_gamma_unchanged():
    """gamma=None is the op as it was: a pair from backward, and residual not looked at."""
    sc, res, _, g = _case(F32, (6, 9))
    assert_bits_equal(stochdepth.forward(sc, res, 0.5, seed=1, gamma=None),
                      reference.forward(sc, res, 0.5, seed=1))
    pair = stochdepth.backward(g, 0.5, seed=1, residual="not an array")
    assert len(pair) == 2 and pair[0] is g
    assert_bits_equal(pair[1], reference.backward(g, 0.5, seed=1)[1])


# ---- errors (docs/design.md, "Layer scale" and "Errors")


def _fwd(gamma, *, shape=(4, 6), axis=0, out=None, dtype=F32):
    sc, res, _, _ = _case(dtype, shape)
    return stochdepth.forward(sc, res, 0.5, seed=1, axis=axis, gamma=gamma, out=out)


def _bwd(gamma, residual, *, shape=(4, 6), out=None):
    g = np.ones(shape, F32)
    return stochdepth.backward(g, 0.5, seed=1, gamma=gamma, residual=residual, out=out)


def test_error_gamma_dtype():
    with pytest.raises(TypeError, match="gamma must have dtype float32 like residual, got float64"):
        _fwd(np.ones(6, F64))
    with pytest.raises(TypeError, match="gamma must have dtype float32 like grad_out, got float64"):
        _bwd(np.ones(6, F64), np.ones((4, 6), F32))
    with pytest.raises(TypeError, match="gamma"):
        _fwd(np.ones(6, np.int32))


def test_error_gamma_shape():
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\) \(the last axis of "
                                         r"residual\), got \(5,\)"):
        _fwd(np.ones(5, F32))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\).*got \(1, 6\)"):
        _fwd(np.ones((1, 6), F32))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\) \(the last axis of "
                                         r"grad_out\), got \(4,\)"):
        _bwd(np.ones(4, F32), np.ones((4, 6), F32))


def test_error_sample_axis_last():
    with pytest.raises(ValueError, match="must not be the sample axis; got axis 1"):
        _fwd(np.ones(6, F32), axis=-1)
    with pytest.raises(ValueError, match="must not be the sample axis; got axis 0"):
        stochdepth.forward(np.ones(4, F32), np.ones(4, F32), 0.5, seed=1, gamma=np.ones(4, F32))


def test_error_gamma_layout():
    strided = np.ones(12, F32)[::2]
    with pytest.raises(ValueError, match="gamma must be C-contiguous"):
        _fwd(strided)
    with pytest.raises(ValueError, match="gamma must be C-contiguous"):
        _bwd(strided, np.ones((4, 6), F32))
    unaligned = np.zeros(7 * 4, np.uint8)[1:25].view(F32)
    assert not unaligned.flags.aligned
    with pytest.raises(ValueError, match="gamma must be aligned"):
        _fwd(unaligned)


def test_error_out_overlaps_gamma():
    buf = np.zeros(30, F32)
    gamma, out = buf[:6], buf[6:].reshape(4, 6)
    _fwd(gamma, out=out)  # adjacent, not overlapping
    with pytest.raises(ValueError, match="out must not overlap gamma"):
        _fwd(buf[18:24], out=out)
    with pytest.raises(ValueError, match="out must not overlap gamma"):
        _bwd(buf[18:24], np.ones((4, 6), F32), out=out)
    res = np.ones((4, 6), F32)
    with pytest.raises(ValueError, match="out must not overlap residual"):
        _bwd(np.ones(6, F32), res, out=res)


def test_error_backward_residual():
    with pytest.raises(ValueError, match="residual is needed with gamma"):
        _bwd(np.ones(6, F32), None)
    with pytest.raises(TypeError, match="residual must have dtype float32 like grad_out, got "
                                        "float64"):
        _bwd(np.ones(6, F32), np.ones((4, 6), F64))
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 6\) like grad_out, got "
                                         r"\(4, 5\)"):
        _bwd(np.ones(6, F32), np.ones((4, 5), F32))
    with pytest.raises(ValueError, match="residual must be C-contiguous"):
        _bwd(np.ones(6, F32), np.ones((4, 12), F32)[:, ::2])
    with pytest.raises(TypeError, match="residual"):
        _bwd(np.ones(6, F32), "not an array")
