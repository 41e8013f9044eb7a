"""The CPU op's policies, on every supported ISA and thread mode: forward and backward draw the
same mask; the keep rate (a binomial bound); p = 0 and p = 1 exactly; the inference factors and
the training scale's single rounding; "batch" mode; the NaN/Inf policy for dropped samples,
NaN payloads and signed zeros (docs/design.md, "NaN and non-finite values"); half types rounded
once on store; and, with guard pages, that a dropped sample's residual is never read and an
in-place shortcut's dropped rows never written (docs/design.md, "Skipping dropped samples").
"""

from __future__ import annotations

import math

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
    compute_type,
    random_array,
    run_python,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


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
