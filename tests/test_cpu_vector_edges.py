"""Where vector code differs from the scalar loop, on every supported ISA: every tail length at
every misalignment (masked loads and stores on AVX-512, element loops elsewhere), tails that end
at an unmapped page (a masked lane must not fault), and bfloat16 values the native AVX512_BF16
conversion gets wrong (subnormals, NaN payloads) sitting among ordinary lanes of a full vector
(docs/design.md, "CPU kernels, threads and memory" and "Arithmetic").
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16, DTYPES, assert_bits_equal, random_array, run_python

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


def _calls(sc, res, p, **kw):
    """(name, got, want) for forward with and without a shortcut, in place, inference, backward."""
    out = [
        ("forward", stochdepth.forward(sc, res, p, **kw), reference.forward(sc, res, p, **kw)),
        ("single", stochdepth.forward(None, res, p, **kw), reference.forward(None, res, p, **kw)),
        ("inference", stochdepth.forward(sc, res, p, training=False, **kw),
         reference.forward(sc, res, p, training=False, **kw)),
        ("backward", stochdepth.backward(res, p, **kw)[1], reference.backward(res, p, **kw)[1]),
    ]
    inplace = sc.copy()
    stochdepth.forward(inplace, res, p, out=inplace, **kw)
    out.append(("in place", inplace, reference.forward(sc, res, p, **kw)))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_tail_length_and_misalignment(isa, dtype):
    """Rows of 1 to 2 vectors + 1 of the widest ISA (16 lanes), each starting 0-3 elements past an
    aligned address, with row lengths that take the long-row path (>= 32) and the short one."""
    rng = np.random.default_rng(14)
    kw = dict(seed=7, offset=3, scaling="training")
    for inner in list(range(1, 34)) + [47, 63, 64, 65, 95, 129]:
        for shift in range(4):
            n = 3 * inner + shift
            base_sc = random_array(rng, (n,), dtype)
            base_res = random_array(rng, (n,), dtype)
            sc = base_sc[shift:].reshape(3, inner)
            res = base_res[shift:].reshape(3, inner)
            for name, got, want in _calls(sc, res, 0.5, **kw):
                assert_bits_equal(got, want, f"{name} inner={inner} shift={shift}")


TAIL_SCRIPT = r'''
import mmap, ctypes
import ml_dtypes, numpy as np
import stochdepth
from stochdepth import reference

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
np.seterr(all="ignore")
bufs = []

def at_page_end(values):
    """A copy of `values` whose last byte is the last byte of a page followed by an unmapped
    (PROT_NONE) page, so a read or write one element past the end faults."""
    buf = mmap.mmap(-1, 2 * PAGE)
    bufs.append(buf)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mprotect(base + PAGE, PAGE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    nbytes = values.nbytes
    a = np.frombuffer(buf, dtype=values.dtype, count=values.size, offset=PAGE - nbytes)
    a[...] = values
    return a

rng = np.random.default_rng(1)
for isa in stochdepth.build_info()["cpu_isas_supported"]:
    stochdepth.set_isa(isa)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        for n in range(1, 40):
            sc = at_page_end(rng.standard_normal(n).astype(dtype))
            res = at_page_end(rng.standard_normal(n).astype(dtype))
            out = at_page_end(np.zeros(n, dtype))
            for training in (True, False):
                kw = dict(seed=3, scaling="training", training=training)
                got = stochdepth.forward(sc.reshape(1, n), res.reshape(1, n), 0.5,
                                         out=out.reshape(1, n), **kw)
                want = reference.forward(sc.reshape(1, n), res.reshape(1, n), 0.5, **kw)
                assert got.view(np.uint8).tobytes() == want.view(np.uint8).tobytes(), (isa, n)
print("tails ok")
'''


def test_tails_never_touch_the_next_page():
    r = run_python(TAIL_SCRIPT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "tails ok"


def test_bfloat16_special_lanes_among_ordinary_ones(isa):
    """One lane in each 16-lane step holds a value whose result is a subnormal or a NaN with a
    payload; the other lanes are ordinary. With AVX512_BF16 the step must take the exact
    rounding (the native one flushes subnormals and keeps payloads); steps without such a lane
    take the native one. Every result must match the reference bit for bit."""
    rng = np.random.default_rng(2)
    n = 16 * 64
    res = rng.standard_normal((4, n)).astype(np.float32)
    sc = rng.standard_normal((4, n)).astype(np.float32)
    tiny = np.float32(np.finfo(np.float32).tiny)
    specials = [
        np.float32(0.0), tiny * np.float32(0.5), -tiny * np.float32(0.25), tiny * np.float32(0.75),
        np.array(0x7FC12345, np.uint32).view(np.float32), np.array(0xFF812345, np.uint32).view(
            np.float32), np.float32(np.inf), np.float32(-np.inf)]
    for step in range(0, n, 16):
        lane = step + (step // 16) % 16
        res[:, lane] = specials[(step // 16) % len(specials)]
        sc[:, lane] = 0.0
    # The inputs are bfloat16 (what the kernel loads); the subnormal ones stay subnormal.
    res_b, sc_b = res.astype(BF16), sc.astype(BF16)
    # Every other 32-lane block has no special lane at all: those steps use the native rounding.
    res_b[:, 16 * 32:] = rng.standard_normal((4, n - 16 * 32)).astype(BF16)
    for p in (1.0, 0.5):
        for name, got, want in _calls(sc_b, res_b, p, seed=11, scaling="training"):
            assert_bits_equal(got, want, f"{name} p={p}")
