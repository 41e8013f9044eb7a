"""Property tests (hypothesis): over shapes, dtypes, axes, p, seeds, offsets, modes, scalings,
training and calling forms, every ISA and thread mode, the op equals stochdepth.reference bit
for bit. Random *bad* inputs run in a subprocess, so that a crash fails a test instead of
killing pytest: each call must raise TypeError/ValueError or be accepted, and an accepted call's
result must be the reference's for the same (normalised) arguments, value for value.
"""

from __future__ import annotations

import ast
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sd_testutil import (
    DTYPES,
    SUPPORTED_ISAS,
    THREAD_MODES,
    assert_bits_equal,
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

MAX_ELEMS = 60_000


@st.composite
def op_cases(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(0, 40), min_size=rank, max_size=rank)))
    assume(int(np.prod(shape, dtype=np.int64)) <= MAX_ELEMS)
    training = draw(st.booleans())
    seed = draw(st.integers(0, 2**64 - 1))
    if not training and draw(st.booleans()):
        seed = None
    return dict(
        shape=shape,
        dtype=draw(st.sampled_from(DTYPES)),
        axis=draw(st.integers(-rank, rank - 1)),
        p=draw(st.one_of(st.floats(0.0, 1.0),
                         st.sampled_from([0.0, 1.0, 0.5, 2**-32, 1 - 2**-53]))),
        seed=seed,
        offset=draw(st.integers(0, 2**64 - 1)),
        mode=draw(st.sampled_from(["row", "batch"])),
        scaling=draw(st.sampled_from(["inference", "training"])),
        training=training,
        form=draw(st.sampled_from(["alloc", "out", "inplace", "single", "misaligned", "backward"])),
        isa=draw(st.sampled_from(SUPPORTED_ISAS)),
        threads=draw(st.sampled_from(list(THREAD_MODES))),
        data_seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                  HealthCheck.too_slow])
@given(case=op_cases())
def test_op_equals_reference(case):
    rng = np.random.default_rng(case["data_seed"])
    shape, dtype, p, form = case["shape"], case["dtype"], case["p"], case["form"]
    kw = {k: case[k] for k in ("training", "seed", "offset", "mode", "axis", "scaling")}
    ref_kw = dict(kw, seed=kw["seed"] or 0)
    sc = random_array(rng, shape, dtype)
    res = random_array(rng, shape, dtype)
    with use_isa(case["isa"]), use_threads(*THREAD_MODES[case["threads"]]):
        if form == "alloc":
            got = stochdepth.forward(sc, res, p, **kw)
            want = reference.forward(sc, res, p, **ref_kw)
        elif form == "out":
            out = filled_like(sc)
            assert stochdepth.forward(sc, res, p, out=out, **kw) is out
            got, want = out, reference.forward(sc, res, p, **ref_kw)
        elif form == "inplace":
            want = reference.forward(sc, res, p, **ref_kw)
            assert stochdepth.forward(sc, res, p, out=sc, **kw) is sc
            got = sc
        elif form == "single":
            got = stochdepth.forward(None, res, p, **kw)
            want = reference.forward(None, res, p, **ref_kw)
        elif form == "misaligned":
            msc, mres = misaligned(sc), misaligned(res)
            got = stochdepth.forward(msc, mres, p, **kw)
            want = reference.forward(sc, res, p, **ref_kw)
        else:
            gs, got = stochdepth.backward(res, p, **kw)
            assert gs is res
            want = reference.backward(res, p, **ref_kw)[1]
    assert_bits_equal(got, want, str(case))


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(0, 3000), p=st.floats(0.0, 1.0), seed=st.integers(0, 2**64 - 1),
       offset=st.integers(0, 2**64 - 1), mode=st.sampled_from(["row", "batch"]))
def test_mask_equals_reference(batch, p, seed, offset, mode):
    got = stochdepth.mask(batch, p, seed=seed, offset=offset, mode=mode)
    want = reference.mask(batch, p, seed=seed, offset=offset, mode=mode)
    np.testing.assert_array_equal(got, want)


# ---- random bad inputs, in a subprocess

FUZZ_SCRIPT = textwrap.dedent(
    r'''
    import sys
    import ml_dtypes
    import numpy as np
    from hypothesis import HealthCheck, given, settings, strategies as st
    import stochdepth
    from stochdepth import reference

    np.seterr(all="ignore")
    GOOD = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64]
    WEIRD = [np.int8, np.int32, np.int64, np.uint16, np.uint64, np.bool_, np.complex64,
             np.complex128, np.longdouble, object, "U3", "datetime64[s]", "V4"]

    def make(draw, shape, dtype, odd):
        kinds = ["plain"]
        if odd:
            kinds += ["strided", "transposed", "readonly", "misaligned-bytes", "list", "scalar",
                      "str"]
        kind = draw(st.sampled_from(kinds))
        try:
            a = np.ones(shape, dtype=dtype)
        except (TypeError, ValueError):
            a = np.ones(shape, dtype=np.float32)
        if a.dtype in GOOD:  # values that differ per element, so that a wrong answer shows
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            a[...] = (rng.standard_normal(a.shape) * 4).astype(a.dtype)
        if kind == "strided" and a.ndim >= 1 and a.shape[-1] > 0:
            a = np.concatenate([a, a], axis=-1)[..., ::2]
        elif kind == "transposed":
            a = a.T
        elif kind == "readonly":
            a.setflags(write=False)
        elif kind == "misaligned-bytes" and a.dtype.kind == "f":
            raw = np.zeros(a.nbytes + 1, np.uint8)
            b = raw[1:].view(a.dtype).reshape(a.shape)
            b[...] = a
            a = b
        elif kind == "list":
            return a.tolist() if a.dtype.kind in "fiub" else [1.0]
        elif kind == "scalar":
            return 1.5
        elif kind == "str":
            return "abc"
        return a

    ints = st.one_of(st.integers(-2**70, 2**70), st.integers(-5, 5),
                     st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1]))
    junk = st.sampled_from([None, 1.5, float("nan"), "x", b"y", [1], (), object(), True,
                            np.uint64(3), np.int64(-1), np.float32(0.5), 1j])
    ARGS = ("rank", "dtype", "residual", "shortcut", "out", "training", "seed", "offset", "mode",
            "axis", "scaling", "p")

    @st.composite
    def call(draw):
        # About half the calls draw every argument from its whole range, junk included (most
        # are rejected); the others are valid but for at most two arguments, so that accepted
        # calls, whose values are checked, are common, and a rejection has one or two causes.
        if draw(st.booleans()):
            bad = set(ARGS)
        else:
            bad = draw(st.sets(st.sampled_from(ARGS), max_size=2))

        def pick(name, good, anything):
            return draw(anything if name in bad else good)

        rank = pick("rank", st.integers(1, 4), st.integers(0, 5))
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank)))
        dtype = pick("dtype", st.sampled_from(GOOD), st.sampled_from(GOOD + WEIRD))
        residual = make(draw, shape, dtype, "residual" in bad)
        which = pick("shortcut", st.sampled_from(["none", "same"]), st.sampled_from(
            ["none", "same", "other-shape", "other-dtype", "alias"]))
        if which == "none":
            shortcut = None
        elif which == "same":
            shortcut = make(draw, shape, dtype, "shortcut" in bad)
        elif which == "other-shape":
            shortcut = make(draw, tuple(d + 1 for d in shape) or (2,), dtype, True)
        elif which == "other-dtype":
            shortcut = make(draw, shape, draw(st.sampled_from(GOOD + WEIRD)), True)
        else:
            shortcut = residual
        out_kind = pick("out", st.sampled_from(["none", "fresh", "shortcut"]), st.sampled_from(
            ["none", "fresh", "shortcut", "residual", "wrong", "overlap"]))
        if out_kind == "fresh":
            out = make(draw, shape, dtype, "out" in bad)
        elif out_kind == "shortcut":
            out = shortcut
        elif out_kind == "residual":
            out = residual
        elif out_kind == "wrong":
            out = make(draw, tuple(draw(st.lists(st.integers(0, 5), max_size=4))),
                       draw(st.sampled_from(GOOD + WEIRD)), True)
        elif out_kind == "overlap" and isinstance(residual, np.ndarray) and residual.size:
            buf = np.ones(residual.size + 1, residual.dtype)
            out = buf[1:].reshape(residual.shape)
            residual = buf[:-1].reshape(residual.shape)
        else:
            out = None
        kw = dict(
            training=pick("training", st.booleans(), st.one_of(st.booleans(), junk)),
            seed=pick("seed", st.integers(0, 2**64 - 1), st.one_of(ints, junk)),
            offset=pick("offset", st.integers(0, 2**64 - 1), st.one_of(ints, junk)),
            mode=pick("mode", st.sampled_from(["row", "batch"]), st.one_of(
                st.sampled_from(["row", "batch"]), st.text(max_size=6), junk)),
            axis=pick("axis", st.integers(-max(rank, 1), max(rank, 1) - 1),
                      st.one_of(ints, junk)),
            scaling=pick("scaling", st.sampled_from(["inference", "training"]), st.one_of(
                st.sampled_from(["inference", "training"]), st.text(max_size=6), junk)),
        )
        p = pick("p", st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, 2**-32])),
                 st.one_of(st.floats(allow_nan=True, allow_infinity=True), ints, junk,
                           st.just(2**2000)))
        fn = draw(st.sampled_from(["forward", "backward", "mask"]))
        if fn == "mask":
            # mask() allocates `batch` bools: huge valid batches (2**34) would really allocate,
            # so draw small ones or ones that no int64 holds.
            kw["axis"] = pick("axis", st.integers(0, 50), st.one_of(
                st.integers(-5, 50), junk, st.sampled_from([2**63, 2**64, -2**63 - 1, 2**100])))
        return fn, shortcut, residual, p, out, kw

    def snapshot(a):
        return a.copy() if isinstance(a, np.ndarray) else a

    def same_values(got, want):
        """Equal dtype, shape and bits; two NaNs count as equal (a kept NaN's payload is
        unspecified)."""
        if got.dtype != want.dtype or got.shape != want.shape:
            return False
        width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
        both_nan = np.isnan(got.astype(np.float64)) & np.isnan(want.astype(np.float64))
        return bool(((got.view(width) == want.view(width)) | both_nan).all())

    accepted = {"forward": 0, "backward": 0, "mask": 0}

    @settings(max_examples=int(sys.argv[1]), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(call())
    def fuzz(c):
        fn, shortcut, residual, p, out, kw = c
        sc0, res0 = snapshot(shortcut), snapshot(residual)  # in place / out= may overwrite them
        try:
            if fn == "forward":
                got = stochdepth.forward(shortcut, residual, p, out=out, **kw)
            elif fn == "backward":
                gs, got = stochdepth.backward(residual, p, out=out, **kw)
            else:
                got = stochdepth.mask(kw["axis"], p, seed=kw["seed"], offset=kw["offset"],
                                      mode=kw["mode"])
        except (TypeError, ValueError):
            return
        # Accepted: the inputs were valid after all, so the answer must be the reference's for
        # the same arguments (as plain Python numbers), value for value.
        accepted[fn] += 1
        if fn == "mask":
            want = reference.mask(int(kw["axis"]), float(p), seed=int(kw["seed"]),
                                  offset=int(kw["offset"]), mode=kw["mode"])
            assert np.array_equal(got, want), (got, want)
            return
        ref_kw = dict(training=kw["training"], seed=0 if kw["seed"] is None else int(kw["seed"]),
                      offset=int(kw["offset"]), mode=kw["mode"], axis=int(kw["axis"]),
                      scaling=kw["scaling"])
        if fn == "forward":
            want = reference.forward(sc0, res0, float(p), **ref_kw)
        else:
            assert gs is residual
            want = reference.backward(res0, float(p), **ref_kw)[1]
        assert type(got) is np.ndarray, type(got)
        assert out is None or got is out
        assert same_values(got, want), (fn, got.dtype, got.shape, p, kw, got, want)

    fuzz()
    print("fuzz ok, accepted:", accepted)
    '''
)


@pytest.mark.slow
def test_random_bad_inputs_never_crash():
    r = run_python(FUZZ_SCRIPT.replace("sys.argv[1]", "800"), timeout=600)
    assert r.returncode == 0 and "fuzz ok" in r.stdout, (
        f"exit code {r.returncode}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-8000:]}"
    )
    # The value checks above ran only on accepted calls: make sure there were some of each.
    accepted = ast.literal_eval(r.stdout.rsplit("accepted:", 1)[1].strip())
    assert all(n > 0 for n in accepted.values()), accepted
