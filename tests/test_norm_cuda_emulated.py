"""The fused norm's CUDA kernels (cuda/norm_kernel.cuh), run on the CPU by
stochdepth._cuda_emulator, against stochdepth.reference bit for bit (docs/design.md, "CUDA" and
"Fused residual and norm"): every dtype, both norms, gamma on and off, awkward widths, both
modes, p in {0, 0.5, 1}, threads of a phase run in reverse (a missing barrier shows), and many
row blocks. Outputs are poisoned first: every element written."""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16, DTYPE_IDS, DTYPES, F16, F32, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

if not stochdepth.build_info()["cuda_emulator"]:
    pytest.skip("no emulator in this build (no CUDA, or a wheel for users; test_build_info "
                "checks which)", allow_module_level=True)
from stochdepth import _cuda_emulator as emu  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

NAMES = {F16: "float16", BF16: "bfloat16", F32: "float32", F64: "float64"}


def poisoned(shape, dtype):
    a = np.empty(shape, dtype)
    a.view(np.uint8)[...] = 0xFF
    return a


def emulate(sc, res, p, w, b, *, norm, eps, gamma, seed, offset, training, mode, scaling,
            gy, gn, reverse, rng_words=None):
    dtype = sc.dtype
    shape = sc.shape
    batch, width = shape[0], shape[-1]
    per = int(np.prod(shape[1:-1], dtype=np.int64))
    common = (batch, per, width, NAMES[np.dtype(dtype)], norm, eps, p, training, mode == "batch",
              scaling, seed, offset, reverse)

    def addr(a):
        return 0 if a is None else a.ctypes.data

    y, n = poisoned(shape, dtype), poisoned(shape, dtype)
    emu.norm(False, dict(shortcut=addr(sc), residual=addr(res), gamma=addr(gamma), weight=addr(w),
                         bias=addr(b), y=y.ctypes.data, n=n.ctypes.data,
                         rng_words=addr(rng_words)), *common)
    gs, gr = poisoned(shape, dtype), poisoned(shape, dtype)
    vecs = [None if v is None else poisoned((width,), dtype) for v in (gamma, w, b)]
    emu.norm(True, dict(grad_y=addr(gy), grad_n=addr(gn), y_in=addr(y), residual=addr(res),
                        gamma=addr(gamma), weight=addr(w), grad_shortcut=addr(gs),
                        grad_residual=addr(gr), grad_gamma=addr(vecs[0]),
                        grad_weight=addr(vecs[1]), grad_bias=addr(vecs[2]),
                        rng_words=addr(rng_words)), *common)
    return (y, n), (gs, gr, *vecs)


def check(dtype, width, norm, with_gamma, p, mode="row", *, batch=6, per=3, reverse=False,
          scaling="training", training=True):
    rng = np.random.default_rng([width, batch, per])
    shape = (batch, per, width)
    sc = random_array(rng, shape, dtype, special=False)
    res = random_array(rng, shape, dtype, special=False)
    gy = random_array(rng, shape, dtype, special=False)
    gn = random_array(rng, shape, dtype, special=False)
    w = (1 + 0.2 * rng.standard_normal(width)).astype(dtype)
    b = None if norm == "rms" else (0.1 * rng.standard_normal(width)).astype(dtype)
    g = (0.5 + rng.random(width)).astype(dtype) if with_gamma else None
    kw = dict(norm=norm, eps=1e-5, gamma=g, seed=2**63 + 99, offset=2**32 + 5, training=training,
              mode=mode, scaling=scaling)
    (y, n), grads = emulate(sc, res, p, w, b, gy=gy, gn=gn, reverse=reverse, **kw)
    ey, en = reference.forward_norm(sc, res, p, w, b, **kw)
    assert_bits_equal(y, ey, "y")
    assert_bits_equal(n, en, "n")
    want = reference.backward_norm(gy, gn, ey, res, p, w, b, **kw)
    for name, a, e in zip(["grad_shortcut", "grad_residual", "grad_gamma", "grad_weight",
                           "grad_bias"], grads, want):
        assert (a is None) == (e is None)
        if e is not None:
            assert_bits_equal(a, e, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("width", [1, 2, 3, 15, 16, 17, 63, 64, 65, 768, 1023])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_gamma", [False, True], ids=["nogamma", "gamma"])
def test_matches_reference(dtype, width, norm, with_gamma):
    check(dtype, width, norm, with_gamma, 0.5)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_probabilities_modes(p, mode, scaling):
    for norm in ("layer", "rms"):
        check(F32, 33, norm, True, p, mode, scaling=scaling)
        check(BF16, 20, norm, False, p, mode, scaling=scaling, training=False)


@pytest.mark.parametrize("dtype", [F16, F64])
def test_threads_in_reverse_and_many_row_blocks(dtype):
    """200 x 3 rows: 38 blocks of 16 rows, 10 blocks of 64 rows for the column sums."""
    check(dtype, 40, "layer", True, 0.7, batch=200, reverse=True)
    check(dtype, 24, "rms", True, 0.7, batch=50, per=5, reverse=True)


def test_wide_rows():
    check(F32, 16384, "layer", True, 0.5, batch=3, per=1)
    check(BF16, 4099, "rms", True, 0.5, batch=2, per=2, reverse=True)


def test_no_rows_gives_zero_parameter_gradients():
    x = np.zeros((0, 3, 5), np.float32)
    w = np.ones(5, np.float32)
    _, grads = emulate(x, x, 0.5, w, w, norm="layer", eps=1e-5, gamma=w, seed=1, offset=0,
                       training=True, mode="row", scaling="training", gy=x, gn=x, reverse=False)
    for v in grads[2:]:
        assert_bits_equal(v, np.zeros(5, np.float32))


def test_rng_words_replace_seed_and_offset():
    """NormParams::rng_words (the JAX adapter's key operand): the kernels draw the mask of the
    words [seed, offset] they read, whatever the seed and offset arguments say."""
    rng = np.random.default_rng(5)
    shape = (40, 2, 33)
    sc, res, gy, gn = (random_array(rng, shape, F32, special=False) for _ in range(4))
    w = np.ones(33, np.float32)
    seed, offset = 2**40 + 17, 2**33 + 3
    words = np.array([seed, offset], np.uint64)
    (y, n), grads = emulate(sc, res, 0.5, w, None, norm="rms", eps=1e-5, gamma=w, seed=1,
                            offset=0, training=True, mode="row", scaling="training", gy=gy, gn=gn,
                            reverse=False, rng_words=words)
    kw = dict(norm="rms", eps=1e-5, gamma=w, seed=seed, offset=offset, scaling="training")
    ey, en = reference.forward_norm(sc, res, 0.5, w, **kw)
    assert_bits_equal(y, ey, "y")
    assert_bits_equal(n, en, "n")
    want = reference.backward_norm(gy, gn, ey, res, 0.5, w, **kw)
    for a, e in zip(grads[:4], want[:4]):
        assert_bits_equal(a, e)
    ny, _ = reference.forward_norm(sc, res, 0.5, w, **dict(kw, seed=1, offset=0))
    assert not np.array_equal(ey, ny)  # the arguments' mask differs: the words were read
