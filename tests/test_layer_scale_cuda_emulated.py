"""The layer scale's CUDA kernels (docs/design.md, "Layer scale"): DenseKernel with gamma
(cuda/drop_path_kernel.cuh) and the backward pass (cuda/layer_scale_kernel.cuh, the fused norm's
column-sum scheme), run on the CPU by stochdepth._cuda_emulator, against stochdepth.reference bit
for bit: every dtype, odd widths, widths past one block of column threads, many 64-row blocks,
both modes, inference, p in {0, 0.6, 1}, misaligned pointers (the scalar kernel), in place, the
single-input form, threads of a phase in reverse. Outputs are poisoned first (every element
written); dropped samples' residuals and gradients are NaN (never read)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from sd_testutil import BF16, DTYPE_IDS, DTYPES, F16, F32, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

if not stochdepth.build_info()["cuda_emulator"]:
    pytest.skip("no emulator in this build (no CUDA, or a wheel for users; test_build_info "
                "checks which)", allow_module_level=True)
from test_cuda_emulated import assert_kernel_equal, placed, vec  # noqa: E402

from stochdepth import _cuda_emulator as emu  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

NAMES = {F16: "float16", BF16: "bfloat16", F32: "float32", F64: "float64"}
SEED, OFFSET = 2**63 + 0x1234_5678_9ABC, 2**32 + 7

# (outer, batch, rows per sample, channels): the array is [outer, batch, rows, channels] with the
# sample axis 1, so a sample is outer * rows rows of `channels` (inner = rows * channels).
SHAPES = {
    "c1": (1, 33, 2, 1),
    "c3": (2, 5, 7, 3),
    "c7-many-blocks": (3, 50, 2, 7),
    "c13": (1, 9, 11, 13),
    "c257": (2, 3, 5, 257),
    "c769-tiles": (1, 4, 41, 769),
}
CONFIGS = [  # (mode, scaling, training)
    ("row", "training", True),
    ("row", "inference", True),
    ("batch", "training", True),
    ("row", "inference", False),
]


def ptr(a):
    return 0 if a is None else a.ctypes.data


def inputs(dtype, shape, p, mode, training, key):
    """shortcut, residual, grad_out and gamma, with NaN in the dropped samples' residual and
    grad_out, and the kept mask in the arrays' shape."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    sc = random_array(rng, shape, dtype, special=False)
    res = random_array(rng, shape, dtype, special=False)
    go = random_array(rng, shape, dtype, special=False)
    gamma = (0.5 + rng.random(shape[-1])).astype(dtype)
    if training:
        keep = reference.mask(shape[1], p, seed=SEED, offset=OFFSET, mode=mode)
    else:
        keep = np.ones(shape[1], bool)
    kept = np.broadcast_to(keep[None, :, None, None], shape)
    res[~kept] = np.nan
    go[~kept] = np.nan
    return sc, res, go, gamma, kept


def forward(sc, res, out, gamma, shape, dtype, p, *, mode, scaling, training, reverse=False):
    outer, batch = shape[0], shape[1]
    inner = shape[2] * shape[3]
    emu.run(ptr(sc), ptr(res), ptr(out), outer, batch, inner, NAMES[dtype], p, training,
            mode == "batch", scaling, SEED, OFFSET, reverse_threads=reverse,
            gamma_ptr=ptr(gamma), channels=shape[3])
    return emu.last_launch()


def backward(go, res, gamma, shape, dtype, p, *, mode, scaling, training, reverse=False):
    outer, batch = shape[0], shape[1]
    grad_residual = placed(go, 0, poison=True)
    grad_gamma = placed(gamma, 0, poison=True)
    emu.backward_gamma(ptr(go), ptr(grad_residual), ptr(res), ptr(gamma), ptr(grad_gamma), outer,
                       batch, shape[2] * shape[3], NAMES[dtype], p, training, mode == "batch",
                       scaling, SEED, OFFSET, shape[3], reverse_threads=reverse)
    return grad_residual, grad_gamma


def leads(dtype):
    """(shortcut, residual, out) leads: alike (the vector kernel), then apart (the scalar one)."""
    v = vec(dtype)
    return [(0, 0, 0), (v - 1, v - 1, v - 1)] + ([(0, 1, 0), (1, 0, 0)] if v > 1 else [])


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_forward_matches_reference(dtype, shape_id, config):
    mode, scaling, training = config
    shape, p = SHAPES[shape_id], 0.6
    sc, res, _, gamma, kept = inputs(dtype, shape, p, mode, training, f"{dtype}{shape_id}{config}")
    kw = dict(training=training, seed=SEED, offset=OFFSET, mode=mode, axis=1, scaling=scaling,
              gamma=gamma)
    want = reference.forward(sc, res, p, **kw)
    want_single = reference.forward(None, res, p, **kw)
    run = dict(mode=mode, scaling=scaling, training=training)
    for lead in leads(dtype):
        vector = lead[0] == lead[1] == lead[2]
        s_, r_ = placed(sc, lead[0]), placed(res, lead[1])
        out = placed(sc, lead[2], poison=True)
        launch = forward(s_, r_, out, gamma, shape, dtype, p, **run)
        assert launch["kernel"] == "dense_gamma"
        assert launch["vec"] == (vec(dtype) if vector else 1)
        assert_kernel_equal(out, want, kept)
        inplace = placed(sc, lead[0])  # dropped samples keep their bits
        forward(inplace, r_, inplace, gamma, shape, dtype, p, **run)
        assert_kernel_equal(inplace, want, kept)
        out = placed(res, lead[2], poison=True)
        forward(None, r_, out, gamma, shape, dtype, p, **run)
        assert_kernel_equal(out, want_single, kept)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_backward_matches_reference(dtype, shape_id, config):
    mode, scaling, training = config
    shape, p = SHAPES[shape_id], 0.6
    _, res, go, gamma, _ = inputs(dtype, shape, p, mode, training, f"b{dtype}{shape_id}{config}")
    _, want_res, want_gamma = reference.backward(go, p, training=training, seed=SEED,
                                                 offset=OFFSET, mode=mode, axis=1,
                                                 scaling=scaling, gamma=gamma, residual=res)
    got_res, got_gamma = backward(go, res, gamma, shape, dtype, p, mode=mode, scaling=scaling,
                                  training=training)
    assert_bits_equal(got_res, want_res, "grad_residual")
    assert_bits_equal(got_gamma, want_gamma, "grad_gamma")
    assert emu.last_launch()["kernel"] == "column_totals"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_threads_in_reverse_order(dtype):
    """A value read before the barrier that orders it would show with the threads reversed."""
    shape, p = SHAPES["c769-tiles"], 0.6
    sc, res, go, gamma, kept = inputs(dtype, shape, p, "row", True, f"rev{dtype}")
    kw = dict(seed=SEED, offset=OFFSET, axis=1, scaling="training", gamma=gamma)
    out = placed(sc, 0, poison=True)
    forward(sc, res, out, gamma, shape, dtype, p, mode="row", scaling="training", training=True,
            reverse=True)
    assert_kernel_equal(out, reference.forward(sc, res, p, **kw), kept)
    got = backward(go, res, gamma, shape, dtype, p, mode="row", scaling="training",
                   training=True, reverse=True)
    _, *want = reference.backward(go, p, residual=res, **kw)
    assert_bits_equal(got[0], want[0], "grad_residual")
    assert_bits_equal(got[1], want[1], "grad_gamma")


@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_every_sample_dropped_or_kept(dtype, mode, p):
    """p = 0: the output is the shortcut bit for bit (in place: untouched), grad_residual and
    grad_gamma +0, the residual and grad_out (all NaN) never read; p = 1: every sample kept."""
    shape = SHAPES["c7-many-blocks"]
    sc, res, go, gamma, kept = inputs(dtype, shape, p, mode, True, f"all{dtype}{mode}{p}")
    assert kept.all() if p == 1.0 else not kept.any()
    kw = dict(seed=SEED, offset=OFFSET, mode=mode, axis=1, scaling="training", gamma=gamma)
    run = dict(mode=mode, scaling="training", training=True)
    want = reference.forward(sc, res, p, **kw)
    out = placed(sc, 0, poison=True)
    forward(sc, res, out, gamma, shape, dtype, p, **run)
    assert_bits_equal(out, want, "out")
    inplace = placed(sc, 0)
    forward(inplace, res, inplace, gamma, shape, dtype, p, **run)
    assert_bits_equal(inplace, want, "in place")
    got_res, got_gamma = backward(go, res, gamma, shape, dtype, p, **run)
    _, want_res, want_gamma = reference.backward(go, p, residual=res, **kw)
    assert_bits_equal(got_res, want_res, "grad_residual")
    assert_bits_equal(got_gamma, want_gamma, "grad_gamma")
    if p == 0.0:
        assert_bits_equal(out, sc, "the shortcut")
        assert not np.any(got_res.view(np.uint8)) and not np.any(got_gamma.view(np.uint8))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=DTYPE_IDS.get)
def test_backward_without_rows_writes_zeros(dtype):
    """A batch of 0 samples: no row, grad_gamma +0 (the totals kernel alone)."""
    gamma = np.ones(5, dtype)
    grad_gamma = placed(gamma, 0, poison=True)
    empty = np.empty((0, 3, 5), dtype)
    emu.backward_gamma(ptr(empty), ptr(empty), ptr(empty), ptr(gamma), ptr(grad_gamma), 1, 0, 15,
                       NAMES[dtype], 0.5, True, False, "training", SEED, OFFSET, 5)
    assert not np.any(grad_gamma.view(np.uint8))
    assert emu.last_launch()["kernel"] == "column_totals"


def test_compact_rows_with_gamma_are_refused():
    x = np.ones((4, 6), np.float32)
    gamma = np.ones(6, np.float32)
    with pytest.raises(ValueError, match="CUDA compact rows do not take gamma"):
        emu.run(ptr(x), ptr(x), ptr(x), 1, 4, 6, "float32", 0.5, True, False, "training", SEED,
                OFFSET, compact_input=True, gamma_ptr=ptr(gamma), channels=6)


@pytest.mark.parametrize("rows, channels", [(2**31 // 768 + 1, 768), (2**26, 64), (2**33, 1)])
def test_backward_grids_past_2_31_elements(rows, channels):
    """The launch configuration of tensors past 2**31 elements, computed without allocating:
    one thread per (64-row block, column), one per column for the totals."""
    g = emu.layer_scale_grids(rows, channels)
    assert g["blocks"] == -(-rows // 64) * -(-channels // emu.THREADS)
    assert g["totals"] == -(-channels // emu.THREADS)


def test_backward_grid_past_the_limit_is_refused():
    with pytest.raises(ValueError, match="too large for one CUDA launch"):
        emu.layer_scale_grids(2**31 * 64, 257)
