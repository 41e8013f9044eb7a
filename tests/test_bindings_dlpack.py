"""DLPack round trips without torch: DLPack producers in (NumPy's own exporter, and a ctypes-built
capsule that also carries bfloat16), `stochdepth.Array` out, read back without a copy by NumPy
and by the pure-Python consumer of tests/sd_dlpack.py; `out=` and in place on DLPack buffers;
and the capsule accounting: every capsule the binding consumes is released exactly once, on
success and on error. tests/test_bindings_torch.py does the same with torch tensors.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from sd_dlpack import CtypesDLPack, NumpyDLPack, from_dlpack, kDLCPU, kDLCUDA
from sd_testutil import (
    BF16,
    DTYPE_IDS,
    DTYPES,
    F32,
    HAS_CUDA_DEVICE,
    assert_bits_equal,
    filled_like,
    random_array,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

PRODUCERS = {"numpy": NumpyDLPack, "ctypes": CtypesDLPack}
# NumPy cannot export bfloat16 (an ml_dtypes type) through DLPack: that dtype is ctypes-only.
CASES = [pytest.param(d, p, id=f"{DTYPE_IDS[d]}-{p}") for d in DTYPES for p in PRODUCERS
         if not (p == "numpy" and d == BF16)]


def test_helpers_are_producers_and_a_consumer():
    """The helpers themselves: NumPy takes both producers without a copy; the consumer reads a
    strided bfloat16 producer without a copy and releases it once, when its last view dies."""
    host = np.arange(6, dtype=F32).reshape(2, 3)
    for wrap in PRODUCERS.values():
        back = np.from_dlpack(wrap(host))
        np.testing.assert_array_equal(back, host)
        assert back.ctypes.data == host.ctypes.data
    bf = random_array(np.random.default_rng(20), (3, 8), BF16)[:, ::2]
    producer = CtypesDLPack(bf)
    view = from_dlpack(producer)
    assert view.dtype == BF16 and view.ctypes.data == bf.ctypes.data
    assert_bits_equal(np.ascontiguousarray(view), np.ascontiguousarray(bf))
    part = view[1:]
    del view
    gc.collect()
    assert (producer.exports, producer.deletes) == (1, 0)
    del part
    gc.collect()
    assert (producer.exports, producer.deletes) == (1, 1)


@pytest.mark.parametrize("dtype, producer", CASES)
def test_dlpack_in_array_out_no_copy(dtype, producer):
    wrap = PRODUCERS[producer]
    rng = np.random.default_rng(21)
    sc, res = random_array(rng, (33, 7), dtype), random_array(rng, (33, 7), dtype)
    want = reference.forward(sc, res, 0.6, seed=5, offset=2, scaling="training")
    out = stochdepth.forward(wrap(sc), wrap(res), 0.6, seed=5, offset=2, scaling="training")
    assert isinstance(out, stochdepth.Array)
    assert tuple(out.shape) == (33, 7)
    assert tuple(out.__dlpack_device__()) == (kDLCPU, 0)
    a1, a2 = from_dlpack(out), from_dlpack(out)
    assert a1.dtype == dtype and a1.shape == (33, 7)
    assert a1.ctypes.data == a2.ctypes.data, "two consumers must see the same buffer"
    if dtype != BF16:
        n = np.from_dlpack(out)
        assert n.ctypes.data == a1.ctypes.data
        assert_bits_equal(n, want)
    assert_bits_equal(a1, want)
    # the consumers keep the buffer alive after the producer is gone
    del out, a2
    gc.collect()
    junk = [np.full((33, 7), 7.0, F32) for _ in range(10)]  # reuse freed memory, if any
    assert_bits_equal(a1, want)
    del junk


@pytest.mark.parametrize("dtype, producer", CASES)
def test_dlpack_single_input_and_backward(dtype, producer):
    wrap = PRODUCERS[producer]
    rng = np.random.default_rng(22)
    res = random_array(rng, (2, 33, 9), dtype)
    kw = dict(seed=2**64 - 1, offset=2**40, axis=1, scaling="training", mode="row")
    out = stochdepth.forward(None, wrap(res), 0.3, **kw)
    assert_bits_equal(from_dlpack(out), reference.forward(None, res, 0.3, **kw))
    g = wrap(res)
    gs, gr = stochdepth.backward(g, 0.3, **kw)
    assert gs is g
    assert isinstance(gr, stochdepth.Array)
    assert_bits_equal(from_dlpack(gr), reference.backward(res, 0.3, **kw)[1])


@pytest.mark.parametrize("dtype, producer", CASES)
def test_dlpack_out_and_in_place(dtype, producer):
    wrap = PRODUCERS[producer]
    rng = np.random.default_rng(23)
    sc, res = random_array(rng, (33, 5), dtype), random_array(rng, (33, 5), dtype)
    want = reference.forward(sc, res, 0.5, seed=3)
    out_host = filled_like(sc)
    out = wrap(out_host)
    assert stochdepth.forward(wrap(sc), wrap(res), 0.5, seed=3, out=out) is out
    assert_bits_equal(out_host, want)
    sc_host = sc.copy()
    sc_dl = wrap(sc_host)
    assert stochdepth.forward(sc_dl, wrap(res), 0.5, seed=3, out=sc_dl) is sc_dl
    assert_bits_equal(sc_host, want)
    g_host = filled_like(res)
    g_out = wrap(g_host)
    _, gr = stochdepth.backward(wrap(res), 0.5, seed=3, out=g_out)
    assert gr is g_out
    assert_bits_equal(g_host, reference.backward(res, 0.5, seed=3)[1])


def test_bf16_round_trip_through_array():
    """bf16 DLPack in -> Array -> consumer: dtype, shape and bits survive; a NumPy bf16 input
    gives the same bits; an Array is itself a producer that the library accepts."""
    rng = np.random.default_rng(24)
    sc, res = random_array(rng, (8, 16), BF16), random_array(rng, (8, 16), BF16)
    via_dlpack = from_dlpack(stochdepth.forward(CtypesDLPack(sc), CtypesDLPack(res), 0.7, seed=8))
    via_numpy = stochdepth.forward(sc, res, 0.7, seed=8)
    assert via_dlpack.dtype == BF16
    assert_bits_equal(via_dlpack, via_numpy)
    again = stochdepth.forward(None, stochdepth.forward(None, CtypesDLPack(res), 1.0, seed=0),
                               1.0, seed=0)
    assert_bits_equal(from_dlpack(again), res)


def test_array_as_input_and_out():
    """A stochdepth.Array is a valid input and a valid out= buffer."""
    rng = np.random.default_rng(25)
    sc, res = random_array(rng, (6, 4), F32), random_array(rng, (6, 4), F32)
    a_sc = stochdepth.forward(None, CtypesDLPack(sc.copy()), 1.0, seed=0)  # holds sc's values
    a_res = stochdepth.forward(None, CtypesDLPack(res.copy()), 1.0, seed=0)
    got = stochdepth.forward(a_sc, a_res, 0.5, seed=4)
    assert isinstance(got, stochdepth.Array)
    want = reference.forward(sc, res, 0.5, seed=4)
    assert_bits_equal(np.from_dlpack(got), want)
    assert stochdepth.forward(a_sc, a_res, 0.5, seed=4, out=a_sc) is a_sc
    assert_bits_equal(np.from_dlpack(a_sc), want)


# ---- every consumed capsule is released exactly once


def _released(*producers):
    gc.collect()
    return [(p.exports, p.deletes) for p in producers]


def test_capsules_released_once_on_success():
    rng = np.random.default_rng(28)
    sc, res = random_array(rng, (9, 4), F32), random_array(rng, (9, 4), F32)
    s, r, o = CtypesDLPack(sc.copy()), CtypesDLPack(res), CtypesDLPack(filled_like(sc))
    calls = [
        lambda: stochdepth.forward(s, r, 0.5, seed=1),
        lambda: stochdepth.forward(s, r, 0.5, seed=1, out=o),
        lambda: stochdepth.forward(None, r, 0.5, seed=1),
        lambda: stochdepth.forward(s, r, 0.5, seed=1, out=s),
        lambda: stochdepth.backward(r, 0.5, seed=1),
        lambda: stochdepth.backward(r, 0.5, seed=1, out=o),
        lambda: stochdepth.forward(s, r, 0.5, training=False, seed=None),
    ]
    for i, call in enumerate(calls):
        result = call()
        del result
        counts = _released(s, r, o)
        assert all(e == d for e, d in counts), f"call {i}: (exports, deletes) {counts}"
    assert r.exports == len(calls)


def _error_cases():
    ok = np.ones((4, 3), F32)
    cases = {
        "int32-dtype": (lambda: CtypesDLPack(np.ones((4, 3), np.int32)), {}, TypeError, None),
        "opencl-device": (lambda: CtypesDLPack(ok.copy(), device_type=4), {}, ValueError,
                          None),
        "strided": (lambda: CtypesDLPack(np.ones((4, 6), F32)[:, ::2]), {}, ValueError, None),
        "bad-axis": (lambda: CtypesDLPack(ok.copy()), {"axis": 5}, ValueError, None),
        "out-shape": (lambda: CtypesDLPack(ok.copy()), {"out": np.ones(3, F32)}, ValueError,
                      None),
    }
    if not HAS_CUDA_DEVICE:  # on a GPU the fake CUDA capsule would really be read
        # stream= given: without one a CUDA array is refused before it is asked to export.
        cases["cuda-without-gpu"] = (lambda: CtypesDLPack(ok.copy(), device_type=kDLCUDA),
                                     {"stream": 0}, ValueError, None)
    return [pytest.param(*v[:3], id=k, marks=[v[3]] if v[3] else []) for k, v in cases.items()]


@pytest.mark.parametrize("make, kwargs, exc", _error_cases())
def test_capsules_released_once_on_error(make, kwargs, exc):
    """A call that fails after consuming a capsule still releases it (else a torch tensor passed
    with a bad argument would leak)."""
    kw = {"seed": 1, **kwargs}
    producer = make()
    with pytest.raises(exc):
        stochdepth.forward(None, producer, 0.5, **kw)
    with pytest.raises(exc):
        stochdepth.backward(producer, 0.5, **kw)
    assert producer.exports >= 1, "the binding never asked for the capsule"
    assert _released(producer) == [(producer.exports, producer.exports)]
