"""The CUDA kernels' own source, run on the CPU, against stochdepth.reference bit for bit.

`stochdepth._cuda_emulator` is built from the same headers as the GPU launches (cuda/dispatch.cuh,
cuda/launch_config.h, cuda/*_kernel.cuh): it runs every block and every thread of a launch on the
CPU, phase by phase between the kernels' barriers (docs/design.md, "CUDA"). So a change to a
kernel body changes what runs here, on every CI run, GPU or not.

Covers: the four dtypes; every alignment lead (0 .. V-1 elements) with the three pointers alike
(vector path) and apart (scalar path); inner around the tile size; rows that straddle tiles;
batch and row modes; in place, single-input, inference and backward; the compact gather/scatter
kernels of StochasticResidual; NaN-ness of kept rows (payloads unspecified) and exact bits of
dropped ones; threads run in reverse order (a missing barrier shows); launch configurations past
2**31 elements, computed without allocating. Outputs are poisoned first: every element written.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from sd_testutil import BF16, DTYPE_IDS, DTYPES, F16, F32, F64, bits, random_array

import stochdepth
from stochdepth import reference

if not stochdepth.build_info()["cuda_emulator"]:
    pytest.skip("no emulator in this build (no CUDA, or a wheel for users; test_build_info "
                "checks which)", allow_module_level=True)
from stochdepth import _cuda_emulator as emu  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

NAMES = {F16: "float16", BF16: "bfloat16", F32: "float32", F64: "float64"}
SEED, OFFSET = 2**63 + 0x1234_5678_9ABC, 2**32 + 7
POISON = 0xFF  # every byte: a NaN in all four dtypes, never what a kernel writes for these inputs


def vec(dtype):
    return 16 // np.dtype(dtype).itemsize


def tile(dtype):
    return emu.THREADS * emu.CHUNKS_PER_THREAD * vec(dtype)


def placed(a, lead, poison=False):
    """A copy of `a` whose data starts `lead` elements past a 64-byte boundary."""
    a = np.asarray(a)
    item = a.dtype.itemsize
    raw = np.empty(a.nbytes + 64 + lead * item + 64, np.uint8)
    start = (-raw.ctypes.data) % 64 + lead * item
    view = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    if poison:
        view.view(np.uint8)[...] = POISON
    else:
        view[...] = a
    return view


def ptr(a):
    return 0 if a is None else a.ctypes.data


def run(sc, x, out, geom, dtype, p, *, training=True, mode="row", scaling="training",
        compact_input=False, compact_output=False, reverse=False):
    outer, batch, inner = geom
    emu.run(ptr(sc), ptr(x), ptr(out), outer, batch, inner, NAMES[dtype], p, training,
            mode == "batch", scaling, SEED, OFFSET, compact_input, compact_output, reverse)
    return emu.last_launch()


def assert_kernel_equal(actual, expected, nan_ok):
    """Bits equal, except where `nan_ok` (kept rows) and both are NaN: payloads unspecified."""
    a, e = bits(actual).ravel(), bits(expected).ravel()
    diff = a != e
    if nan_ok is not None:
        nan_both = np.isnan(actual.astype(np.float64)) & np.isnan(expected.astype(np.float64))
        diff &= ~(np.broadcast_to(nan_ok, actual.shape).ravel() & nan_both.ravel())
    bad = np.flatnonzero(diff)
    assert bad.size == 0, (f"{bad.size} of {a.size} elements differ, first at {bad[:8]}: "
                           f"got {a[bad[:8]]}, want {e[bad[:8]]}")


# ---- the dense kernel

# [outer, batch, inner] as functions of the dtype's tile: one tile holds many rows; tiny; inner
# around the tile size (a row ends just before, at, or just after a tile boundary); rows
# straddling tiles over several tiles; the batch wrapping inside a tile (outer > 1).
GEOMETRIES = {
    "inner1": lambda t: (1, 33, 1),
    "tiny": lambda t: (2, 5, 7),
    "tile-1": lambda t: (1, 3, t - 1),
    "tile": lambda t: (1, 2, t),
    "tile+1": lambda t: (2, 2, t + 1),
    "straddle": lambda t: (3, 1000, 7),
    "wrap": lambda t: (5, 37, 50),
}
# (mode, scaling, training)
CONFIGS = [
    ("row", "training", True),
    ("row", "inference", True),
    ("batch", "training", True),
    ("row", "inference", False),
]


def leads(dtype):
    """(shortcut, input, out) leads: all alike at every lead (vector path), then apart (scalar)."""
    v = vec(dtype)
    alike = [(k, k, k) for k in range(v)]
    apart = [(0, 1, 0), (1, 0, 0), (0, 0, 1)] if v > 1 else []
    return alike + apart


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dense_matches_reference(dtype, geometry, config):
    mode, scaling, training = config
    geom = GEOMETRIES[geometry](tile(dtype))
    rng = np.random.default_rng(zlib.crc32(f"{dtype}-{geometry}-{config}".encode()))
    sc = random_array(rng, geom, dtype)
    x = random_array(rng, geom, dtype)
    # NaN and Inf in the residual: dropped rows never read it, kept rows propagate NaN-ness.
    x.reshape(-1)[rng.integers(0, x.size, 3)] = np.nan
    x.reshape(-1)[rng.integers(0, x.size, 2)] = np.inf
    sc.reshape(-1)[rng.integers(0, sc.size, 2)] = np.nan  # dropped rows: exact bits, payload too
    p = 0.6
    kw = dict(training=training, seed=SEED, offset=OFFSET, mode=mode, axis=1, scaling=scaling)
    want = reference.forward(sc, x, p, **kw)
    want_single = reference.forward(None, x, p, **kw)
    want_grad = reference.backward(x, p, **kw)[1]
    keep = reference.mask(geom[1], p, seed=SEED, offset=OFFSET, mode=mode)
    kept = keep[None, :, None] if training else np.ones((1, 1, 1), bool)
    for lead in leads(dtype):
        vector = lead[0] == lead[1] == lead[2]
        s_, x_ = placed(sc, lead[0]), placed(x, lead[1])
        out = placed(sc, lead[2], poison=True)
        launch = run(s_, x_, out, geom, dtype, p, training=training, mode=mode, scaling=scaling)
        assert launch["kernel"] == "dense" and launch["vec"] == (vec(dtype) if vector else 1)
        assert_kernel_equal(out, want, kept)
        # In place: out is the shortcut itself; dropped rows keep their bits, untouched.
        inplace = placed(sc, lead[0])
        run(inplace, x_, inplace, geom, dtype, p, training=training, mode=mode, scaling=scaling)
        assert_kernel_equal(inplace, want, kept)
        # Single-input form (and backward, the same kernel with grad_out as input).
        out = placed(x, lead[2], poison=True)
        run(None, x_, out, geom, dtype, p, training=training, mode=mode, scaling=scaling)
        assert_kernel_equal(out, want_single, kept)
        assert_kernel_equal(out, want_grad, kept)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dense_grid_and_vector_width(dtype):
    geom = (1, 3, 2 * tile(dtype) + 5)
    x = np.ones(geom, dtype)
    for lead in range(vec(dtype)):
        out = placed(x, lead, poison=True)
        launch = run(placed(x, lead), placed(x, lead), out, geom, dtype, 1.0)
        assert launch == {"kernel": "dense", "vec": vec(dtype),
                          "grid": -(-(x.size + lead) // tile(dtype))}
    launch = run(placed(x, 0), placed(x, 1), placed(x, 0, poison=True), geom, dtype, 1.0)
    scalar_tile = emu.THREADS * emu.CHUNKS_PER_THREAD
    assert launch == {"kernel": "dense", "vec": 1, "grid": -(-x.size // scalar_tile)}


@pytest.mark.parametrize("dtype", [F16, F64], ids=DTYPE_IDS.get)
def test_threads_in_any_order_within_a_phase(dtype):
    """Threads run last to first within each phase: a value read before its barrier would differ."""
    geom = (3, 1000, 7)
    rng = np.random.default_rng(5)
    sc, x = random_array(rng, geom, dtype), random_array(rng, geom, dtype)
    want = reference.forward(sc, x, 0.5, seed=SEED, offset=OFFSET, axis=1, scaling="training")
    out = placed(sc, 1, poison=True)
    run(placed(sc, 1), placed(x, 1), out, geom, dtype, 0.5, reverse=True)
    assert_kernel_equal(out, want, None)


# ---- the compact kernels (StochasticResidual): scatter-add forward, gather backward


# (batch, inner): inner 1 and 7 (scalar path), multiples of every V around the tile sizes.
COMPACT_GEOMETRIES = [(37, 1), (9, 7), (5, 8), (300, 16), (3, 4095), (3, 4096), (2, 8200),
                      (1030, 2)]


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("geom", COMPACT_GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compact_matches_reference(dtype, geom, mode):
    batch, inner = geom
    p = 0.55
    rng = np.random.default_rng(batch * 7919 + inner)
    keep = reference.mask(batch, p, seed=SEED, offset=OFFSET, mode=mode)
    n_kept = int(keep.sum())
    sc = random_array(rng, geom, dtype)
    kept_res = random_array(rng, (n_kept, inner), dtype)
    grad = random_array(rng, geom, dtype)
    kw = dict(seed=SEED, offset=OFFSET, mode=mode, axis=0, scaling="training")
    want_fwd = reference.forward_kept(sc, kept_res, p, **kw)
    want_bwd = reference.backward_kept(grad, p, **kw)
    g3 = (1, batch, inner)
    kept_rows = keep[:, None]
    vector_ok = inner % vec(dtype) == 0
    for lead in (0, 1):
        vector = vector_ok and lead == 0
        out = placed(sc, lead, poison=True)
        launch = run(placed(sc, lead), placed(kept_res, lead), out, g3, dtype, p, mode=mode,
                     compact_input=True)
        assert launch["kernel"] == "compact" and launch["vec"] == (vec(dtype) if vector else 1)
        assert_kernel_equal(out, want_fwd, kept_rows)
        inplace = placed(sc, lead)
        run(inplace, placed(kept_res, lead), inplace, g3, dtype, p, mode=mode, compact_input=True)
        assert_kernel_equal(inplace, want_fwd, kept_rows)
        if n_kept:
            out = placed(want_bwd, lead, poison=True)
            run(None, placed(grad, lead), out, g3, dtype, p, mode=mode, compact_output=True,
                reverse=True)
            assert_kernel_equal(out, want_bwd, None)


def test_compact_needs_the_sample_axis_first():
    x = np.ones((2, 3, 4), F32)
    with pytest.raises(ValueError, match="outer == 1"):
        run(x, x, x.copy(), (2, 3, 4), F32, 0.5, compact_input=True)


# ---- stream_copy (the benchmark's ceiling kernel)


@pytest.mark.parametrize("nbytes", [1, 15, 16, 17, 16384 * 2 + 3])
def test_stream_copy(nbytes):
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes + 32, dtype=np.uint8)
    for s_lead, d_lead in [(0, 0), (3, 3), (15, 15), (1, 0), (0, 7)]:
        dst = np.full(nbytes + 32, POISON, np.uint8)
        emu.stream_copy(dst.ctypes.data + d_lead, src.ctypes.data + s_lead, nbytes)
        np.testing.assert_array_equal(dst[d_lead:d_lead + nbytes], src[s_lead:s_lead + nbytes])
        assert (dst[:d_lead] == POISON).all() and (dst[d_lead + nbytes:] == POISON).all()
        assert emu.last_launch()["vec"] == (16 if s_lead == d_lead else 1)


# ---- launch configuration for tensors past 2**31 elements (addresses only, nothing allocated)

BASE = 1 << 40  # a 64-byte aligned address


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("numel", [2**31 - 1, 2**31, 2**31 + 5, 3 * 2**32 + 1, 2**40])
def test_dense_config_past_2_31(dtype, numel):
    size = np.dtype(dtype).itemsize
    for lead in range(vec(dtype)):
        a = BASE + lead * size
        c = emu.dense_config(NAMES[dtype], numel, a, a, a)
        assert (c["vec"], c["lead"], c["tile"]) == (vec(dtype), lead, tile(dtype))
        assert c["grid"] == -(-(numel + lead) // tile(dtype)) < 2**31
    # Pointers apart: scalar path, whose grid is 16 / size times larger.
    c = emu.dense_config(NAMES[dtype], numel, BASE, BASE + size, BASE)
    assert (c["vec"], c["lead"]) == (1, 0)
    assert c["grid"] == -(-numel // (emu.THREADS * emu.CHUNKS_PER_THREAD))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dense_config_refuses_a_grid_past_the_limit(dtype):
    limit = emu.MAX_GRID * tile(dtype)  # elements the largest grid covers with lead 0
    assert emu.dense_config(NAMES[dtype], limit, BASE, BASE, BASE)["grid"] == emu.MAX_GRID
    with pytest.raises(ValueError, match="too large"):
        emu.dense_config(NAMES[dtype], limit + 1, BASE, BASE, BASE)
    with pytest.raises(ValueError, match="too large"):
        emu.dense_config(NAMES[dtype], limit, BASE, BASE + 1 * np.dtype(dtype).itemsize, BASE)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compact_config_past_2_31(dtype):
    v, t = vec(dtype), tile(dtype)
    c = emu.compact_config(NAMES[dtype], 1024, 2**22 * v, BASE, BASE, BASE)  # 2**32+ elements
    per_row = 2**22 * v // t
    assert c == {"vec": v, "tile": t, "tiles_per_row": per_row, "grid": 1024 * per_row}
    c = emu.compact_config(NAMES[dtype], 3, 2**31 + 1, BASE, BASE, BASE)  # inner % v != 0
    assert c["vec"] == 1 and c["grid"] == 3 * -(-(2**31 + 1) // (t // v))
    with pytest.raises(ValueError, match="too large"):
        emu.compact_config(NAMES[dtype], 2**31, 2 * t, BASE, BASE, BASE)
    with pytest.raises(ValueError, match="too large"):
        emu.compact_config(NAMES[dtype], 2**40, 2**40, BASE, BASE, BASE)
