"""The CPU op against stochdepth.reference, bit for bit, on every ISA this CPU supports and in both
thread modes (1 thread; 2 threads with the parallel threshold at 0).

Covers: every dtype, mode, scaling, training/inference, axis (ranks 1-4), the allocating form,
`out=`, in place (`out=shortcut`), the single-input form, misaligned pointers, empty tensors,
awkward row sizes (1, 7, 9, 1000003) and batches (1, 2, 33); backward; p from 0 to 1; the
adapters' raw-pointer entry point and the benchmark's copy kernel. The mask's properties and the
NaN/Inf policy: test_drop_path_policy.py; ISA and thread selection: test_cpu_isa_threads.py.
"""

from __future__ import annotations

import functools
import os
import zlib

import numpy as np
import pytest
from sd_testutil import (
    BF16,
    F16,
    F32,
    F64,
    MODES,
    SCALINGS,
    assert_bits_equal,
    bits,
    filled_like,
    misaligned,
    random_array,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


# (shape, axis): row sizes 1, 7, 9 with batches 1, 2, 33, then every axis of ranks 1-4.
SHAPE_CASES = [((b, inner), 0) for b in (1, 2, 33) for inner in (1, 7, 9)] + [
    ((33,), 0),
    ((7,), -1),
    ((4, 33), 1),
    ((9, 2), -1),
    ((3, 2, 9), 0),
    ((3, 33, 7), 1),
    ((3, 7, 2), -1),
    ((2, 3, 33, 1), 2),
    ((2, 3, 4, 7), 0),
    ((2, 33, 4, 9), 1),
    ((2, 3, 4, 2), -1),
    ((3, 2, 4, 5), 3),
    ((1, 1, 1, 1), 2),
]
EMPTY_CASES = [((0,), 0), ((0, 7), 0), ((3, 0), 0), ((0, 3), 1), ((2, 0, 5), 1), ((4, 5, 0), 1),
               ((2, 3, 0, 4), -1), ((0, 2, 2, 2), 3)]
PROBS = [0.6, 0.3, 0.85, 0.5, 0.999]


def case_id(shape, axis):
    return "x".join(map(str, shape)) + f"-ax{axis}"


def check_forward_forms(rng, shape, axis, dtype, p, *, training, mode, scaling, seed, offset):
    """Every calling form of forward on one case, each compared bit for bit with the reference."""
    kw = dict(training=training, seed=seed, offset=offset, mode=mode, axis=axis, scaling=scaling)
    where = f"shape={shape} axis={axis} dtype={dtype} p={p} {kw}"
    sc = random_array(rng, shape, dtype)
    res = random_array(rng, shape, dtype)
    sc_bits, res_bits = bits(sc).copy(), bits(res).copy()
    want = reference.forward(sc, res, p, **kw)
    want_single = reference.forward(None, res, p, **kw)

    # allocating
    got = stochdepth.forward(sc, res, p, **kw)
    assert type(got) is np.ndarray
    assert_bits_equal(got, want, "allocating: " + where)
    assert_bits_equal(bits(sc), sc_bits, "shortcut modified: " + where)
    assert_bits_equal(bits(res), res_bits, "residual modified: " + where)

    # out= given (prefilled with garbage so that an untouched element shows)
    out = filled_like(sc)
    ret = stochdepth.forward(sc, res, p, out=out, **kw)
    assert ret is out
    assert_bits_equal(out, want, "out=: " + where)

    # in place on the shortcut
    inplace = sc.copy()
    ret = stochdepth.forward(inplace, res, p, out=inplace, **kw)
    assert ret is inplace
    assert_bits_equal(inplace, want, "in place: " + where)

    # single-input form, allocating and with out=
    got = stochdepth.forward(None, res, p, **kw)
    assert_bits_equal(got, want_single, "single-input: " + where)
    out = filled_like(res)
    assert stochdepth.forward(None, res, p, out=out, **kw) is out
    assert_bits_equal(out, want_single, "single-input out=: " + where)

    # misaligned pointers (every array starts one element into its buffer)
    msc, mres, mout = misaligned(sc), misaligned(res), misaligned(filled_like(sc))
    assert stochdepth.forward(msc, mres, p, out=mout, **kw) is mout
    assert_bits_equal(mout, want, "misaligned out=: " + where)
    assert_bits_equal(stochdepth.forward(msc, mres, p, **kw), want, "misaligned: " + where)
    assert stochdepth.forward(msc, mres, p, out=msc, **kw) is msc
    assert_bits_equal(msc, want, "misaligned in place: " + where)
    assert_bits_equal(stochdepth.forward(None, mres, p, **kw), want_single,
                      "misaligned single-input: " + where)


def check_backward_forms(rng, shape, axis, dtype, p, *, training, mode, scaling, seed, offset):
    kw = dict(training=training, seed=seed, offset=offset, mode=mode, axis=axis, scaling=scaling)
    where = f"shape={shape} axis={axis} dtype={dtype} p={p} {kw}"
    g = random_array(rng, shape, dtype)
    g_bits = bits(g).copy()
    _, want = reference.backward(g, p, **kw)

    gs, gr = stochdepth.backward(g, p, **kw)
    assert gs is g, "grad_shortcut must be grad_out itself"
    assert type(gr) is np.ndarray
    assert_bits_equal(gr, want, "backward: " + where)
    assert_bits_equal(bits(g), g_bits, "grad_out modified: " + where)

    out = filled_like(g)
    gs, gr = stochdepth.backward(g, p, out=out, **kw)
    assert gs is g and gr is out
    assert_bits_equal(out, want, "backward out=: " + where)

    mg, mout = misaligned(g), misaligned(filled_like(g))
    gs, gr = stochdepth.backward(mg, p, out=mout, **kw)
    assert gs is mg and gr is mout
    assert_bits_equal(mout, want, "backward misaligned: " + where)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("mode", MODES)
def test_forward_matches_reference(isa, threads, dtype, mode, scaling, training):
    rng = np.random.default_rng(zlib.crc32(f"fwd {isa} {threads} {dtype} {mode} {scaling} "
                                           f"{training}".encode()))
    for i, (shape, axis) in enumerate(SHAPE_CASES):
        seed = int(rng.integers(0, 2**63)) * 2 + i % 2
        offset = int(rng.integers(0, 2**40)) if i % 3 else 0
        check_forward_forms(rng, shape, axis, dtype, PROBS[i % len(PROBS)], training=training,
                            mode=mode, scaling=scaling, seed=seed, offset=offset)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("mode", MODES)
def test_backward_matches_reference(isa, threads, dtype, mode, scaling, training):
    rng = np.random.default_rng(zlib.crc32(f"bwd {isa} {threads} {dtype} {mode} {scaling} "
                                           f"{training}".encode()))
    for i, (shape, axis) in enumerate(SHAPE_CASES):
        seed = int(rng.integers(0, 2**64, dtype=np.uint64))
        check_backward_forms(rng, shape, axis, dtype, PROBS[i % len(PROBS)], training=training,
                             mode=mode, scaling=scaling, seed=seed, offset=i)


@pytest.mark.parametrize("shape, axis", EMPTY_CASES, ids=[case_id(*c) for c in EMPTY_CASES])
def test_empty_tensors(isa, threads, dtype, shape, axis):
    sc = np.zeros(shape, dtype)
    res = np.ones(shape, dtype)
    for training in (True, False):
        kw = dict(training=training, seed=3, axis=axis)
        got = stochdepth.forward(sc, res, 0.5, **kw)
        assert type(got) is np.ndarray and got.shape == shape and got.dtype == dtype
        assert stochdepth.forward(sc, res, 0.5, out=sc, **kw) is sc
        out = np.empty(shape, dtype)
        assert stochdepth.forward(sc, res, 0.5, out=out, **kw) is out
        assert stochdepth.forward(None, res, 0.5, **kw).shape == shape
        gs, gr = stochdepth.backward(res, 0.5, **kw)
        assert gs is res and gr.shape == shape and gr.dtype == dtype


def test_empty_misaligned_and_zero_batch_mask():
    assert stochdepth.mask(0, 0.5, seed=1).shape == (0,)
    buf = np.zeros(1, np.float32)
    empty = buf[1:]
    assert empty.shape == (0,)
    assert stochdepth.forward(empty, empty.copy(), 0.5, seed=1).shape == (0,)


@functools.lru_cache(maxsize=None)
def long_case(dtype, shape, axis, mode):
    """Inputs and reference answers for the large cases, computed once for all ISAs/threads."""
    rng = np.random.default_rng(11)
    kw = dict(training=True, seed=0x5EED, offset=2**33 + 4, mode=mode, axis=axis,
              scaling="training")
    sc = random_array(rng, shape, dtype)
    res = random_array(rng, shape, dtype)
    with np.errstate(over="ignore"):
        fwd = reference.forward(sc, res, 0.5, **kw)
        bwd = reference.backward(res, 0.5, **kw)[1]
    for a in (sc, res, fwd, bwd):
        a.setflags(write=False)
    return sc, res, fwd, bwd, kw


def test_long_rows(isa, threads, dtype):
    """Row size 1000003 (odd, prime: every vector loop has a tail) on every ISA and dtype."""
    sc, res, fwd, bwd, kw = long_case(dtype, (3, 1000003), 0, "row")
    keep = reference.mask(3, 0.5, seed=kw["seed"], offset=kw["offset"])
    assert 0 < keep.sum() < 3, keep
    assert_bits_equal(stochdepth.forward(sc, res, 0.5, **kw), fwd)
    assert_bits_equal(stochdepth.backward(res, 0.5, **kw)[1], bwd)
    msc, mres = misaligned(sc), misaligned(res)
    assert stochdepth.forward(msc, mres, 0.5, out=msc, **kw) is msc
    assert_bits_equal(msc, fwd)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_large_batch(isa, threads, mode):
    """A batch of 1000003 samples (axis 1 of (2, 1000003)): the vectorised mask over many
    samples, split across threads, with a tail."""
    sc, res, fwd, bwd, kw = long_case(F32, (2, 1000003), 1, mode)
    assert_bits_equal(stochdepth.forward(sc, res, 0.5, **kw), fwd)
    assert_bits_equal(stochdepth.backward(res, 0.5, **kw)[1], bwd)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("STOCHDEPTH_TEST_HUGE") != "1",
                    reason="needs ~8.6 GB of RAM: set STOCHDEPTH_TEST_HUGE=1")
def test_over_2_31_elements(isa):
    """64-bit indexing: (2, 2**30 + 3) float16 = 2**31 + 6 elements, single-input form with out=
    (the smallest footprint: 2 x 4 GiB). Checks the start and end of each row and the element
    at flat index 2**31."""
    inner = 2**30 + 3
    seed = next(s for s in range(1000)
                if reference.mask(2, 0.5, seed=s).tolist() == [False, True])
    res = np.ones((2, inner), F16)
    out = np.full((2, inner), 7.0, F16)
    assert stochdepth.forward(None, res, 0.5, seed=seed, scaling="training", out=out) is out
    assert (out[0, :1000] == 0).all() and (out[0, -1000:] == 0).all()
    assert (out[1, :1000] == 2).all() and (out[1, -1000:] == 2).all()
    assert out.reshape(-1)[2**31] == 2 and out.reshape(-1)[2**31 - 1] == 2
    del out
    _, g = stochdepth.backward(res, 0.5, seed=seed, scaling="training")
    assert (g[0, -1000:] == 0).all() and (g[1, -1000:] == 2).all()
    assert g.reshape(-1)[2**31 + 5] == 2


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.37, 1 - 2**-40, 1.0])
@pytest.mark.parametrize("scaling", SCALINGS)
def test_random_probabilities(isa, threads, dtype, p, scaling):
    rng = np.random.default_rng(int(p * 1000) + 7)
    shape = (33, 9)
    sc, res = random_array(rng, shape, dtype), random_array(rng, shape, dtype)
    for training in (True, False):
        for offset in (0, 1):
            kw = dict(training=training, seed=77, offset=offset, scaling=scaling)
            assert_bits_equal(stochdepth.forward(sc, res, p, **kw),
                              reference.forward(sc, res, p, **kw), f"p={p} {kw}")
            assert_bits_equal(stochdepth.forward(None, res, p, **kw),
                              reference.forward(None, res, p, **kw), f"single p={p} {kw}")
            assert_bits_equal(stochdepth.backward(res, p, **kw)[1],
                              reference.backward(res, p, **kw)[1], f"backward p={p} {kw}")


# ---- the adapters' low-level entry points


def _dtype_name(dtype):
    return {F16: "float16", BF16: "bfloat16", F32: "float32", F64: "float64"}[dtype]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_run_raw_matches_reference(isa, threads, dtype, scaling):
    """_core.run_raw on raw pointers ([outer, batch, inner]): forward, in place, single-input and
    backward forms, with misaligned pointers, give the reference's bits."""
    rng = np.random.default_rng(13)
    run_raw = stochdepth._core.run_raw
    for outer, batch, inner in [(1, 33, 7), (3, 5, 9), (2, 1, 1), (1, 2, 1000)]:
        shape = (outer, batch, inner)
        for training in (True, False):
            kw = dict(training=training, seed=2**64 - 3, offset=5, mode="row", axis=1,
                      scaling=scaling)
            sc = misaligned(random_array(rng, shape, dtype))
            res = misaligned(random_array(rng, shape, dtype))
            want = reference.forward(sc, res, 0.7, **kw)
            want1 = reference.forward(None, res, 0.7, **kw)
            args = (outer, batch, inner, getattr(stochdepth._core.DType, _dtype_name(dtype)), 0.7,
                    training, False, getattr(stochdepth._core.Scaling, scaling),
                    2**64 - 3, 5, -1, 0)
            out = misaligned(filled_like(sc))
            run_raw(sc.ctypes.data, res.ctypes.data, out.ctypes.data, *args)
            assert_bits_equal(out, want, f"run_raw {shape} {kw}")
            run_raw(0, res.ctypes.data, out.ctypes.data, *args)
            assert_bits_equal(out, want1, f"run_raw single/backward {shape} {kw}")
            run_raw(sc.ctypes.data, res.ctypes.data, sc.ctypes.data, *args)
            assert_bits_equal(sc, want, f"run_raw in place {shape} {kw}")


@pytest.mark.parametrize("n", [0, 1, 3, 64, 4097, 3 * 1024 * 1024 + 5])
def test_stream_copy_is_a_copy(threads, n):
    """The benchmark's bandwidth ceiling must really copy, any size and alignment (float16
    elements: 2-byte granularity; both pointers one element into their buffers), and write
    nothing outside the destination (guard elements on both sides; n = 0 writes nothing)."""
    rng = np.random.default_rng(n)
    src = misaligned(rng.integers(0, 2**16, n, dtype=np.uint16).view(F16))
    guard = 0x7E7E
    buf = np.full(n + 9, guard, np.uint16).view(F16)  # 1 element before dst, 8 after
    dst = buf[1:n + 1]
    stochdepth._core.stream_copy(dst, src)
    assert_bits_equal(dst, src)
    outside = np.concatenate([bits(buf[:1]), bits(buf[n + 1:])])
    assert (outside == guard).all(), f"stream_copy wrote outside dst: {outside}"
