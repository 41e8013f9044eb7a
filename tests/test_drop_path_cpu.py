"""The CPU op against stochdepth.reference, bit for bit, on every ISA this CPU supports and in both
thread modes (1 thread; 2 threads with the parallel threshold at 0).

Covers: every dtype, mode, scaling, training/inference, axis (ranks 1-4), the allocating form,
`out=`, in place (`out=shortcut`), the single-input form, misaligned pointers, empty tensors,
awkward row sizes (1, 7, 9, 1000003) and batches (1, 2, 33); backward, and that forward and
backward draw the same mask; the keep rate (binomial bound), p = 0 and p = 1 exactly, "batch"
mode, and the NaN/Inf policy for dropped samples; ISA selection (set_isa, STOCHDEPTH_CPU).
"""

from __future__ import annotations

import functools
import math
import os
import zlib

import numpy as np
import pytest
from sd_testutil import (
    BF16,
    COMPILED_ISAS,
    F16,
    F32,
    F64,
    SUPPORTED_ISAS,
    assert_bits_equal,
    bits,
    filled_like,
    misaligned,
    random_array,
    run_python,
    use_isa,
    use_threads,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

MODES = ["row", "batch"]
SCALINGS = ["inference", "training"]

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


def compute_type(dtype):
    return F64 if dtype == F64 else F32


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


def test_isas_agree_bitwise(dtype):
    """Every supported ISA gives the same bits (each also matches the reference elsewhere)."""
    rng = np.random.default_rng(5)
    sc, res = random_array(rng, (33, 37), dtype), random_array(rng, (33, 37), dtype)
    outs = {}
    for name in SUPPORTED_ISAS:
        with use_isa(name):
            outs[name] = stochdepth.forward(sc, res, 0.6, seed=9, scaling="training")
    first = outs[SUPPORTED_ISAS[0]]
    for name, out in outs.items():
        assert_bits_equal(out, first, f"{name} vs {SUPPORTED_ISAS[0]}")


# ---- the mask: forward and backward agree, keep rate, p = 0 / 1, batch mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_forward_and_backward_use_the_same_mask(isa, threads, dtype, mode, scaling):
    for shape, axis in [((64, 5), 0), ((3, 40, 2), 1), ((2, 3, 50), -1)]:
        for offset in (0, 1, 2**40):
            kw = dict(seed=1234567, offset=offset, mode=mode, axis=axis, scaling=scaling)
            sc = np.zeros(shape, dtype)
            res = np.ones(shape, dtype)
            out = stochdepth.forward(sc, res, 0.5, **kw)
            _, gr = stochdepth.backward(np.ones(shape, dtype), 0.5, **kw)
            batch = shape[axis]
            keep = stochdepth.mask(batch, 0.5, seed=1234567, offset=offset, mode=mode)
            fwd_dropped = np.moveaxis(out, axis, 0).reshape(batch, -1)
            bwd_rows = np.moveaxis(gr, axis, 0).reshape(batch, -1)
            fwd_dropped = (bits(fwd_dropped) == bits(np.zeros((), dtype))).all(axis=1)
            bwd_zero = (bits(bwd_rows) == bits(np.zeros((), dtype))).all(axis=1)
            np.testing.assert_array_equal(fwd_dropped, ~keep)
            np.testing.assert_array_equal(bwd_zero, ~keep)
            if mode == "row":
                assert 0 < keep.sum() < batch


def z_score(kept, n, p):
    return (kept - n * p) / math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_binomial(isa, p):
    """The kept count of 200000 samples is within 5 sigma of n * p (normal approximation)."""
    n = 200000
    for seed, offset in [(0, 0), (2**63 + 12345, 2**32 + 1)]:
        keep = stochdepth.mask(n, p, seed=seed, offset=offset)
        z = z_score(int(keep.sum()), n, p)
        assert abs(z) < 5, f"seed={seed} offset={offset} p={p}: z = {z:.2f}"
        # The op itself: the same rate (one element per sample, shortcut 0, residual 1).
        out = stochdepth.forward(np.zeros(n, F32), np.ones(n, F32), p, seed=seed, offset=offset)
        np.testing.assert_array_equal(out != 0, keep)


def test_keep_rate_across_offsets():
    """Offsets give fresh masks: pooled over 200 offsets of a batch of 1000 the rate holds, and
    consecutive masks are not equal."""
    n, p = 1000, 0.5
    masks = np.stack([stochdepth.mask(n, p, seed=99, offset=o) for o in range(200)])
    z = z_score(int(masks.sum()), masks.size, p)
    assert abs(z) < 5, z
    assert not any(np.array_equal(masks[i], masks[i + 1]) for i in range(199))


@pytest.mark.parametrize("mode", MODES)
def test_p0_drops_everything(isa, threads, dtype, mode):
    rng = np.random.default_rng(0)
    sc, res = random_array(rng, (33, 7), dtype), random_array(rng, (33, 7), dtype)
    for scaling in SCALINGS:
        for seed in (0, 1, 2**64 - 1):
            kw = dict(seed=seed, mode=mode, scaling=scaling)
            assert not stochdepth.mask(33, 0.0, seed=seed, mode=mode).any()
            assert_bits_equal(stochdepth.forward(sc, res, 0.0, **kw), sc)
            zeros = np.zeros_like(res)
            assert_bits_equal(stochdepth.forward(None, res, 0.0, **kw), zeros)
            assert_bits_equal(stochdepth.backward(res, 0.0, **kw)[1], zeros)
            inplace = sc.copy()
            stochdepth.forward(inplace, res, 0.0, out=inplace, **kw)
            assert_bits_equal(inplace, sc)


@pytest.mark.parametrize("mode", MODES)
def test_p1_keeps_everything_with_scale_one(isa, threads, dtype, mode):
    """p = 1: every sample kept and the scale is exactly 1 under both conventions, so the
    output is the plain sum (rounded once) and backward is grad_out itself."""
    rng = np.random.default_rng(1)
    sc, res = random_array(rng, (33, 7), dtype), random_array(rng, (33, 7), dtype)
    ct = compute_type(dtype)
    plain_sum = (sc.astype(ct) + res.astype(ct)).astype(dtype)
    for scaling in SCALINGS:
        for training in (True, False):
            for seed in (0, 2**64 - 1):
                kw = dict(training=training, seed=seed, mode=mode, scaling=scaling)
                assert stochdepth.mask(33, 1.0, seed=seed, mode=mode).all()
                assert_bits_equal(stochdepth.forward(sc, res, 1.0, **kw), plain_sum, str(kw))
                assert_bits_equal(stochdepth.forward(None, res, 1.0, **kw), res, str(kw))
                assert_bits_equal(stochdepth.backward(res, 1.0, **kw)[1], res, str(kw))


def test_inference_scaling_factors(dtype):
    """Inference: factor p with scaling="inference", 1 with scaling="training"; no mask."""
    rng = np.random.default_rng(2)
    sc, res = random_array(rng, (9, 5), dtype), random_array(rng, (9, 5), dtype)
    ct = compute_type(dtype)
    p = 0.7
    want = (sc.astype(ct) + ct.type(p) * res.astype(ct)).astype(dtype)
    got = stochdepth.forward(sc, res, p, training=False, seed=None, scaling="inference")
    assert_bits_equal(got, want)
    want = (sc.astype(ct) + res.astype(ct)).astype(dtype)
    got = stochdepth.forward(sc, res, p, training=False, seed=None, scaling="training")
    assert_bits_equal(got, want)
    # the seed does not matter at inference
    again = stochdepth.forward(sc, res, p, training=False, seed=5, scaling="training")
    assert_bits_equal(again, got)


def test_training_scale_is_rounded_once_from_float64(isa, dtype):
    """s = 1/p evaluated in float64 and rounded once to the compute type. For p = 0.85 and
    p = 0.6551136029553816, float32(1/p) differs from float32(1) / float32(p)."""
    ct = compute_type(dtype)
    ps = (0.3, 0.85, 0.6551136029553816, 0.123456789)
    assert any(np.float32(1 / p) != np.float32(1) / np.float32(p) for p in ps)
    for p in ps:
        res = np.ones((64, 3), dtype)
        got = stochdepth.forward(None, res, p, seed=0, scaling="training")
        keep = stochdepth.mask(64, p, seed=0)
        assert keep.any()
        want = np.zeros((64, 3), dtype)
        want[keep] = np.array(ct.type(np.float64(1.0) / np.float64(p))).astype(dtype)
        assert_bits_equal(got, want, f"p={p}")


@pytest.mark.parametrize("axis", [0, 1])
def test_batch_mode_is_one_draw_per_call(isa, axis):
    shape = (16, 3) if axis == 0 else (3, 16)
    sc, res = np.zeros(shape, F32), np.ones(shape, F32)
    seen = set()
    for offset in range(64):
        out = stochdepth.forward(sc, res, 0.5, seed=2024, offset=offset, mode="batch", axis=axis)
        rows = np.moveaxis(out, axis, 0).reshape(16, -1)
        kept = (rows != 0).all(axis=1)
        assert kept.all() or not (rows != 0).any(), f"offset {offset}: mixed mask in batch mode"
        assert kept[0] == reference.mask(1, 0.5, seed=2024, offset=offset)[0]
        seen.add(bool(kept[0]))
        m = stochdepth.mask(16, 0.5, seed=2024, offset=offset, mode="batch")
        assert m.all() or not m.any()
    assert seen == {True, False}, "batch mode never varied across 64 offsets"


# ---- NaN / Inf policy, signed zeros, NaN payloads


@pytest.mark.parametrize("single", [False, True], ids=["two-input", "single-input"])
def test_nan_inf_in_dropped_residual_do_not_reach_output(isa, threads, dtype, single):
    rng = np.random.default_rng(3)
    shape = (33, 9)
    seed, p = 31337, 0.5
    keep = stochdepth.mask(33, p, seed=seed)
    assert 0 < keep.sum() < 33
    sc = random_array(rng, shape, dtype, special=False)
    res = random_array(rng, shape, dtype, special=False)
    specials = np.array([np.nan, np.inf, -np.inf], np.float64).astype(dtype)
    res[~keep] = specials[rng.integers(0, 3, ((~keep).sum(), shape[1]))]
    shortcut = None if single else sc
    for scaling in SCALINGS:
        kw = dict(seed=seed, scaling=scaling)
        out = stochdepth.forward(shortcut, res, p, **kw)
        assert np.isfinite(out.astype(np.float64)).all()
        assert_bits_equal(out, reference.forward(shortcut, res, p, **kw))
        dropped_want = np.zeros_like(sc[~keep]) if single else sc[~keep]
        assert_bits_equal(out[~keep], dropped_want)
        if not single:
            inplace = sc.copy()
            stochdepth.forward(inplace, res, p, out=inplace, **kw)
            assert_bits_equal(inplace, out)
        _, gr = stochdepth.backward(res, p, **kw)
        assert np.isfinite(gr.astype(np.float64)).all()
        assert_bits_equal(gr[~keep], np.zeros_like(sc[~keep]))


def signaling_nan_bits(dtype):
    """A signaling NaN with a payload, and a negative quiet NaN with a payload."""
    return {F16: (0x7C01, 0xFE05), BF16: (0x7F81, 0xFFC5), F32: (0x7F800001, 0xFFC00005),
            F64: (0x7FF0000000000001, 0xFFF8000000000005)}[dtype]


def test_dropped_samples_copy_shortcut_bits_exactly(isa, threads, dtype):
    """A dropped sample's output is the shortcut bit for bit: signaling NaNs, NaN payloads and
    -0.0 in the shortcut come through unchanged (no arithmetic on dropped samples)."""
    seed, p = 4242, 0.5
    keep = stochdepth.mask(33, p, seed=seed)
    assert 0 < keep.sum() < 33
    rng = np.random.default_rng(4)
    sc = random_array(rng, (33, 11), dtype)
    res = random_array(rng, (33, 11), dtype)
    snan, qnan = signaling_nan_bits(dtype)
    b = bits(sc)
    dropped = np.flatnonzero(~keep)
    b[dropped, 0] = snan
    b[dropped, 1] = qnan
    sc[dropped, 2] = -0.0
    out = stochdepth.forward(sc, res, p, seed=seed)
    assert_bits_equal(out[~keep], sc[~keep])
    assert_bits_equal(out, reference.forward(sc, res, p, seed=seed))


def test_signed_zeros(isa, dtype):
    """-0.0 + (s * -0.0) = -0.0 and -0.0 + (s * +0.0) = +0.0 in kept samples; the single-input
    form writes +0.0 for dropped samples."""
    sc = np.array([[-0.0, -0.0, 0.0, 0.0]] * 8, dtype)
    res = np.array([[-0.0, 0.0, -0.0, 0.0]] * 8, dtype)
    out = stochdepth.forward(sc, res, 1.0, seed=0)
    assert_bits_equal(out, np.array([[-0.0, 0.0, 0.0, 0.0]] * 8, dtype))
    res_neg = np.full((8, 4), -1.0, dtype)
    keep = stochdepth.mask(8, 0.5, seed=8)
    single = stochdepth.forward(None, res_neg * 0, 0.5, seed=8)
    assert_bits_equal(single, reference.forward(None, res_neg * 0, 0.5, seed=8))
    assert (bits(single[~keep]) == 0).all()


def test_half_rounding_on_store(isa, threads):
    """f16 / bf16: round to nearest even once on store, including overflow to inf and results
    that become subnormal; compared against the float32 computation rounded by NumPy/ml_dtypes."""
    for dtype in (F16, BF16):
        rng = np.random.default_rng(6)
        sc = random_array(rng, (64, 257), dtype)
        res = random_array(rng, (64, 257), dtype)
        for p in (1.0, 0.3):
            kw = dict(seed=1, scaling="training")
            want = reference.forward(sc, res, p, **kw)
            assert_bits_equal(stochdepth.forward(sc, res, p, **kw), want, f"{dtype} p={p}")


# ---- ISA selection and threads


def test_isa_lists_are_consistent():
    assert "scalar" in SUPPORTED_ISAS
    assert set(SUPPORTED_ISAS) <= set(COMPILED_ISAS)
    assert stochdepth.get_isa() in SUPPORTED_ISAS


def test_set_isa_roundtrip_and_errors():
    old = stochdepth.get_isa()
    try:
        for name in SUPPORTED_ISAS:
            stochdepth.set_isa(name)
            assert stochdepth.get_isa() == name
            assert stochdepth.build_info()["cpu_isa"] == name
        with pytest.raises(ValueError, match="avx512_bogus"):
            stochdepth.set_isa("avx512_bogus")
        assert stochdepth.get_isa() == SUPPORTED_ISAS[-1]
        for name in set(COMPILED_ISAS) - set(SUPPORTED_ISAS):
            with pytest.raises(ValueError, match=name):
                stochdepth.set_isa(name)
    finally:
        stochdepth.set_isa(old)


ISA_PROBE = (
    "import stochdepth, sys; "
    "print(stochdepth.get_isa(), stochdepth.build_info()['cpu_isa'])"
)


@pytest.mark.parametrize("name", SUPPORTED_ISAS)
def test_env_forces_isa_at_import(name):
    r = run_python(ISA_PROBE, env={"STOCHDEPTH_CPU": name})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, name]


def test_default_isa_is_the_best_supported():
    r = run_python(ISA_PROBE)
    assert r.returncode == 0, r.stderr
    best = "avx2" if "avx2" in SUPPORTED_ISAS else "scalar"
    assert r.stdout.split() == [best, best]


@pytest.mark.parametrize("name", ["sse9000", "AVX3", "cuda"])
def test_env_unknown_isa_raises_at_import(name):
    r = run_python("import stochdepth", env={"STOCHDEPTH_CPU": name})
    assert r.returncode != 0
    assert "ValueError" in r.stderr and name in r.stderr, r.stderr
    assert "Fatal Python error" not in r.stderr


def test_env_unsupported_isa_raises_at_import():
    unsupported = sorted(set(COMPILED_ISAS) - set(SUPPORTED_ISAS))
    if not unsupported:
        pytest.skip("every compiled ISA is supported by this CPU")
    r = run_python("import stochdepth", env={"STOCHDEPTH_CPU": unsupported[0]})
    assert r.returncode != 0
    assert "ValueError" in r.stderr, r.stderr


def test_num_threads_roundtrip_and_errors():
    old = stochdepth.get_num_threads()
    try:
        stochdepth.set_num_threads(1)
        assert stochdepth.get_num_threads() == 1
        assert stochdepth.build_info()["num_threads"] == 1
        stochdepth.set_num_threads(3)
        assert stochdepth.get_num_threads() == 3
        for bad in (0, -1):
            with pytest.raises(ValueError):
                stochdepth.set_num_threads(bad)
        assert stochdepth.get_num_threads() == 3
    finally:
        stochdepth.set_num_threads(old)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_more_threads_than_rows(isa, n):
    """Thread counts above the number of rows or cores, with the threshold at 0."""
    rng = np.random.default_rng(n)
    with use_threads(n, 0):
        for shape, axis in [((1, 1), 0), ((2, 3), 0), ((3, 1, 5), 1), ((5, 1000), 0), ((1, 5), 1)]:
            sc, res = random_array(rng, shape, F32), random_array(rng, shape, F32)
            kw = dict(seed=n, axis=axis, scaling="training")
            assert_bits_equal(stochdepth.forward(sc, res, 0.5, **kw),
                              reference.forward(sc, res, 0.5, **kw), f"{shape} threads={n}")


# ---- dropped samples: the residual is not read, an in-place shortcut is not written

GUARD_SCRIPT = r'''
import ctypes, mmap, sys
import ml_dtypes, numpy as np
import stochdepth
from stochdepth import reference

np.seterr(all="ignore")
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
keep_alive = []

def paged(shape, dtype, values):
    """An array whose every (outer, sample) row is exactly one page of its own mapping."""
    buf = mmap.mmap(-1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    keep_alive.append(buf)
    a = np.frombuffer(buf, dtype=dtype).reshape(shape)
    a[...] = values
    return a

def protect(a, keep, prot):
    outer, batch = a.shape[0], a.shape[1]
    for o in range(outer):
        for b in np.flatnonzero(~keep):
            addr = a.ctypes.data + (o * batch + int(b)) * PAGE
            if libc.mprotect(addr, PAGE, prot) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")

def check(got, want, what):
    g = got.view(np.uint8)
    w = want.view(np.uint8)
    if not np.array_equal(g, w):
        raise AssertionError(what)

rng = np.random.default_rng(0)
for isa in stochdepth.build_info()["cpu_isas_supported"]:
    stochdepth.set_isa(isa)
    for threads, threshold in ((1, 1 << 40), (2, 0)):
        stochdepth.set_num_threads(threads)
        stochdepth._core.set_parallel_threshold(threshold)
        for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
            inner = PAGE // np.dtype(dtype).itemsize
            for outer, batch, mode, offset in ((1, 9, "row", 0), (2, 5, "row", 1),
                                               (1, 4, "batch", None)):
                seed = 12345
                if offset is None:  # batch mode: find an offset that drops the whole batch
                    offset = next(o for o in range(100)
                                  if not stochdepth.mask(1, 0.5, seed=seed, offset=o)[0])
                keep = stochdepth.mask(batch, 0.5, seed=seed, offset=offset, mode=mode)
                assert (~keep).any()
                shape = (outer, batch, inner)
                kw = dict(seed=seed, offset=offset, mode=mode, axis=1, scaling="training")
                what = f"{isa} threads={threads} {np.dtype(dtype).name} {shape} {mode}"
                sc0 = rng.standard_normal(shape).astype(dtype)
                res0 = rng.standard_normal(shape).astype(dtype)
                want = reference.forward(sc0, res0, 0.5, **kw)
                want1 = reference.forward(None, res0, 0.5, **kw)
                sc, res = paged(shape, dtype, sc0), paged(shape, dtype, res0)
                protect(res, keep, PROT_NONE)   # dropped residual rows: any read faults
                protect(sc, keep, PROT_READ)    # dropped shortcut rows: any write faults
                check(stochdepth.forward(sc, res, 0.5, **kw), want, "alloc " + what)
                check(stochdepth.forward(None, res, 0.5, **kw), want1, "single " + what)
                check(stochdepth.backward(res, 0.5, **kw)[1], want1, "backward " + what)
                assert stochdepth.forward(sc, res, 0.5, out=sc, **kw) is sc
                check(sc, want, "in place " + what)
                protect(res, keep, PROT_RW)
                protect(sc, keep, PROT_RW)
print("guard ok")
'''


def test_dropped_rows_are_neither_read_nor_written():
    """Each (outer, sample) row gets a page of its own; the pages of dropped samples are made
    unreadable in the residual / grad_out and read-only in the in-place shortcut. A kernel that
    reads a dropped residual or writes a dropped shortcut row faults (in the subprocess)."""
    r = run_python(GUARD_SCRIPT)
    assert r.returncode == 0 and "guard ok" in r.stdout, (
        f"exit code {r.returncode} (-11: a dropped row was read or written)\n"
        f"{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    )


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
    elements: 2-byte granularity; both pointers one element off 64-byte alignment)."""
    rng = np.random.default_rng(n)
    src = misaligned(rng.integers(0, 2**16, n, dtype=np.uint16).view(F16))
    dst = misaligned(np.zeros(n, F16))
    stochdepth._core.stream_copy(dst, src)
    assert_bits_equal(dst, src)
