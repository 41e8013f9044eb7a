"""The compact-row kernels behind StochasticResidual: a scatter-add of a residual computed for the
kept samples only (forward) and a gather of grad_out at the kept samples (backward), exactly equal
to stochdepth.reference on every ISA, dtype and thread mode."""

import itertools

import ml_dtypes
import numpy as np
import pytest

import stochdepth
from stochdepth import _core, reference

DTYPES = {np.float16: "float16", ml_dtypes.bfloat16: "bfloat16", np.float32: "float32",
          np.float64: "float64"}


@pytest.fixture(params=stochdepth.build_info()["cpu_isas_supported"])
def isa(request):
    before = stochdepth.get_isa()
    stochdepth.set_isa(request.param)
    yield request.param
    stochdepth.set_isa(before)


@pytest.fixture(params=["single-thread", "threads"])
def threads(request):
    before = _core.get_parallel_threshold()
    _core.set_parallel_threshold(0 if request.param == "threads" else 1 << 40)
    yield
    _core.set_parallel_threshold(before)


def _geometry(shape, axis):
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, shape[axis], inner


SHAPES = [((33, 7), 0), ((5, 40), 0), ((2, 9, 64), 1), ((1, 3), 0), ((64, 3, 5), 0),
          ((16, 1000), 0)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_scatter_and_gather_match_reference(isa, threads, dtype, shape, axis):
    rng = np.random.default_rng(7)
    for p, mode, scaling, single, in_place in itertools.product(
            (0.0, 0.5, 1.0), ("row", "batch"), ("inference", "training"), (False, True),
            (False, True)):
        kw = dict(seed=99, offset=3, mode=mode, axis=axis, scaling=scaling)
        keep = reference.mask(shape[axis], p, seed=99, offset=3, mode=mode)
        kept_shape = list(shape)
        kept_shape[axis] = int(keep.sum())
        shortcut = rng.standard_normal(shape).astype(dtype)
        kept = rng.standard_normal(kept_shape).astype(dtype)
        outer, batch, inner = _geometry(shape, axis)
        if single:
            expected = reference.forward_kept(np.zeros_like(shortcut), kept, p, **kw)
            out = np.full(shape, np.nan, dtype)
            sc_ptr = 0
        else:
            expected = reference.forward_kept(shortcut, kept, p, **kw)
            out = shortcut.copy() if in_place else np.full(shape, np.nan, dtype)
            sc_ptr = out.ctypes.data if in_place else shortcut.ctypes.data
        _core.run_raw(sc_ptr, kept.ctypes.data, out.ctypes.data, outer, batch, inner,
                      getattr(_core.DType, DTYPES[dtype]), p, True, mode == "batch",
                      getattr(_core.Scaling, scaling), 99, 3, -1, 0,
                      compact_input=True)
        if single:
            # single-input compact: out = s * kept_residual at kept rows, 0 elsewhere
            expected = reference.forward_kept(np.zeros_like(shortcut), kept, p, **kw)
            other_axes = tuple(i for i in range(len(shape)) if i != axis)
            expected = np.where(np.expand_dims(keep, other_axes),
                                expected, np.zeros_like(expected))
            np.testing.assert_array_equal(out.astype(np.float64), expected.astype(np.float64))
        else:
            np.testing.assert_array_equal(out.view(np.uint8), expected.view(np.uint8))

        grad_out = rng.standard_normal(shape).astype(dtype)
        grad_kept = np.full(kept_shape, np.nan, dtype)
        _core.run_raw(0, grad_out.ctypes.data, grad_kept.ctypes.data, outer, batch, inner,
                      getattr(_core.DType, DTYPES[dtype]), p, True, mode == "batch",
                      getattr(_core.Scaling, scaling), 99, 3, -1, 0,
                      compact_output=True)
        np.testing.assert_array_equal(grad_kept.view(np.uint8),
                                      reference.backward_kept(grad_out, p, **kw).view(np.uint8))


def test_compact_rows_reject_inference_and_two_compact_sides():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="compact"):
        _core.run_raw(0, x.ctypes.data, x.ctypes.data, 1, 4, 3, _core.DType.float32, 0.5, False,
                      False, _core.Scaling.inference, 0, 0, -1, 0, compact_input=True)
    with pytest.raises(ValueError, match="compact"):
        _core.run_raw(x.ctypes.data, x.ctypes.data, x.ctypes.data, 1, 4, 3, _core.DType.float32,
                      0.5,
                      True, False, _core.Scaling.inference, 0, 0, -1, 0, compact_output=True)
