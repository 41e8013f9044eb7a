"""The Python boundary, arguments: one test per bad dtype or scalar argument of the list in
docs/design.md, "Errors" (exception type AND a message that names the argument), with NumPy
arrays and DLPack producers. tests/test_bindings_arrays.py does shapes, layout, `out=` and
devices.

No test here needs torch: DLPack inputs come from tests/sd_dlpack.py (NumPy's own exporter behind
a wrapper, and a ctypes-built capsule for bfloat16, integer dtypes, strides and other devices).
tests/test_bindings_without_torch.py runs these files with `import torch` blocked; torch tensors
have their own tests in tests/test_bindings_torch.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_dlpack import CtypesDLPack, NumpyDLPack
from sd_testutil import BF16, F16, F64, arrays, assert_bits_equal, bwd, fwd

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


# ---- Types


def test_dtype_mismatch():
    sc, res = arrays()
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(sc, res.astype(F64))
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(sc.astype(F16), res.astype(BF16))


BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64,
              np.complex128, np.longdouble, object]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unsupported_dtypes(bad):
    if np.dtype(bad) == np.dtype(np.float64):  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    x = np.ones((4, 3), dtype=bad)
    with pytest.raises(TypeError, match="residual"):
        fwd(None, x)
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(x, x.copy())
    with pytest.raises(TypeError, match="grad_out"):
        bwd(x)


DLPACK_BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.uint16, np.bool_, np.complex64,
                     np.complex128]


@pytest.mark.parametrize("producer", ["numpy", "ctypes"])
@pytest.mark.parametrize("bad", DLPACK_BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unsupported_dlpack_dtypes(bad, producer):
    """The same through DLPack (what torch int/bool/complex tensors look like to the binding)."""
    wrap = NumpyDLPack if producer == "numpy" else CtypesDLPack

    def x():
        return wrap(np.ones((4, 3), dtype=bad))

    with pytest.raises(TypeError, match="residual.*DLPack"):
        fwd(None, x())
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(x(), x())
    with pytest.raises(TypeError, match="grad_out"):
        bwd(x())
    sc, res = arrays((4, 3))
    with pytest.raises(TypeError, match="out"):
        fwd(sc, res, out=x())


@pytest.mark.parametrize("bad", [None, "0.5", [0.5], 0.5j, object()], ids=repr)
def test_survival_prob_not_a_number(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="survival_prob"):
        fwd(sc, res, bad)
    with pytest.raises(TypeError, match="survival_prob"):
        bwd(res, bad)
    with pytest.raises(TypeError, match="survival_prob"):
        stochdepth.mask(4, bad, seed=1)


@pytest.mark.parametrize("bad", [-0.1, -1e-300, 1.0000001, 2, float("inf"), -float("inf"),
                                 float("nan"), np.float32("nan")], ids=repr)
def test_survival_prob_out_of_range(bad):
    sc, res = arrays()
    with pytest.raises(ValueError, match="survival_prob"):
        fwd(sc, res, bad)
    with pytest.raises(ValueError, match="survival_prob"):
        bwd(res, bad)
    with pytest.raises(ValueError, match="survival_prob"):
        stochdepth.mask(4, bad, seed=1)
    with pytest.raises(ValueError, match="survival_prob"):
        fwd(sc, res, bad, training=False, seed=None)


@pytest.mark.parametrize("bad", [2**2000, -(2**2000), 2**64], ids=["2**2000", "-2**2000", "2**64"])
def test_survival_prob_huge_integer(bad):
    """Integers beyond float range are out of [0, 1] (ValueError), not a cast failure."""
    sc, res = arrays()
    with pytest.raises(ValueError, match="survival_prob"):
        fwd(sc, res, bad)
    with pytest.raises(ValueError, match="survival_prob"):
        stochdepth.mask(4, bad, seed=1)


@pytest.mark.parametrize("good", [0, 1, 0.0, 1.0, np.float32(0.25), np.float64(0.75), np.int64(1)],
                         ids=repr)
def test_survival_prob_accepted_forms(good):
    sc, res = arrays()
    want = reference.forward(sc, res, float(good), seed=1)
    assert_bits_equal(fwd(sc, res, good), want)


# ---- seed / offset / mode / scaling / training / stream


def test_seed_missing():
    sc, res = arrays()
    with pytest.raises(TypeError, match="seed"):
        stochdepth.forward(sc, res, 0.5)
    with pytest.raises(TypeError, match="seed"):
        stochdepth.backward(res, 0.5)
    with pytest.raises(TypeError, match="seed"):
        stochdepth.mask(4, 0.5)


def test_seed_none_only_at_inference():
    sc, res = arrays()
    with pytest.raises((TypeError, ValueError), match="seed"):
        fwd(sc, res, seed=None)
    with pytest.raises((TypeError, ValueError), match="seed"):
        bwd(res, seed=None)
    want = reference.forward(sc, res, 0.5, training=False)
    assert_bits_equal(fwd(sc, res, seed=None, training=False), want)
    assert_bits_equal(bwd(res, seed=None, training=False)[1],
                      reference.backward(res, 0.5, training=False)[1])


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("bad", [-1, -(2**63), 2**64, 2**64 + 1, 2**200], ids=repr)
def test_seed_offset_out_of_range(name, bad):
    sc, res = arrays()
    with pytest.raises(ValueError, match=name):
        fwd(sc, res, **{name: bad})
    with pytest.raises(ValueError, match=name):
        bwd(res, **{name: bad})
    with pytest.raises(ValueError, match=name):
        stochdepth.mask(4, 0.5, **{"seed": 1, name: bad})


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("bad", [1.0, 2.5, "3", True, np.float64(1.0), [1]], ids=repr)
def test_seed_offset_wrong_type(name, bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match=name):
        fwd(sc, res, **{name: bad})
    with pytest.raises(TypeError, match=name):
        bwd(res, **{name: bad})


def test_offset_none_is_rejected():
    sc, res = arrays()
    with pytest.raises(TypeError, match="offset"):
        fwd(sc, res, offset=None)


@pytest.mark.parametrize("good", [0, 2**64 - 1, np.uint64(2**64 - 1), np.int64(7), np.uint32(9)],
                         ids=repr)
def test_seed_offset_accepted_forms(good):
    sc, res = arrays((9, 3))
    want = reference.forward(sc, res, 0.5, seed=int(good), offset=int(good))
    assert_bits_equal(fwd(sc, res, seed=good, offset=good), want)
    np.testing.assert_array_equal(stochdepth.mask(9, 0.5, seed=good, offset=good),
                                  reference.mask(9, 0.5, seed=int(good), offset=int(good)))


@pytest.mark.parametrize("name, bad", [("mode", "rows"), ("mode", "ROW"), ("mode", ""),
                                       ("mode", "sample"), ("scaling", "train"),
                                       ("scaling", "Inference"), ("scaling", "timm")])
def test_bad_mode_or_scaling_string(name, bad):
    sc, res = arrays()
    with pytest.raises(ValueError, match=name):
        fwd(sc, res, **{name: bad})
    with pytest.raises(ValueError, match=name):
        bwd(res, **{name: bad})
    if name == "mode":
        with pytest.raises(ValueError, match=name):
            stochdepth.mask(4, 0.5, seed=1, mode=bad)


@pytest.mark.parametrize("name", ["mode", "scaling"])
@pytest.mark.parametrize("bad", [None, 1, b"row"], ids=repr)
def test_mode_or_scaling_not_a_string(name, bad):
    sc, res = arrays()
    with pytest.raises((TypeError, ValueError), match=name):
        fwd(sc, res, **{name: bad})


@pytest.mark.parametrize("bad", ["yes", None, 2, 0.5], ids=repr)
def test_training_not_a_bool(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="training"):
        fwd(sc, res, training=bad)


@pytest.mark.parametrize("bad", ["0", 1.5, object()], ids=repr)
def test_stream_wrong_type(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="stream"):
        fwd(sc, res, stream=bad)


@pytest.mark.parametrize("bad", [2**64, 2**70, -(2**64)], ids=repr)
def test_stream_out_of_range(bad):
    sc, res = arrays()
    with pytest.raises((TypeError, ValueError), match="stream"):
        fwd(sc, res, stream=bad)


# ---- the mask() entry point


def test_mask_bad_batch():
    for bad in (-1, -(2**63), 2**63, 2**64, 2**100):
        with pytest.raises(ValueError, match="batch"):
            stochdepth.mask(bad, 0.5, seed=1)
    for bad in (2.0, "3", None, True):
        with pytest.raises(TypeError, match="batch"):
            stochdepth.mask(bad, 0.5, seed=1)
