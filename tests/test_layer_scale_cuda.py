"""The layer scale on CUDA (docs/design.md, "Layer scale"): `stochdepth.forward(..., gamma=)` and
`stochdepth.backward(..., gamma=, residual=)` on torch.cuda tensors against stochdepth.reference
and the CPU, bit for bit: every dtype, odd widths, widths past one block of column threads,
many 64-row blocks, both modes, inference, the sample axis first or inside; the allocating form,
`out=` poisoned with NaN, in place, the single-input form; misaligned pointers; every sample
dropped (the residual, all NaN, never read) and every sample kept; a non-default stream; a CUDA
graph capture of the forward and backward. Skipped where no GPU is present (the GPU check runs
it); tests/test_layer_scale_cuda_emulated.py runs the same kernels on the CPU in CI.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import DTYPE_IDS, DTYPES, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

if stochdepth.build_info()["cuda_device_count"] == 0:
    pytest.skip("no CUDA device", allow_module_level=True)
torch = pytest.importorskip("torch")
from test_drop_path_cuda import at_offset, poisoned, to_cuda, to_numpy  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("ieee_overflow_ok")]

SEED, OFFSET = 2**63 + 0x1234_5678_9ABC, 2**32 + 7
# (shape, axis): C = the last axis, 1 to 769; rows of one sample from 1 to 41 x 3; up to 600 rows
# (10 row blocks); the sample axis first or inside.
SHAPES = [
    ((33, 1), 0),
    ((5, 7, 3), 0),
    ((3, 50, 4, 7), 1),
    ((9, 11, 13), 0),
    ((2, 3, 5, 257), 1),
    ((4, 41, 769), 0),
    ((600, 12), 0),
]
CONFIGS = [  # (mode, scaling, training)
    ("row", "training", True),
    ("row", "inference", True),
    ("batch", "training", True),
    ("row", "inference", False),
]


def shape_id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else f"ax{value}"


def inputs(rng, dtype, shape):
    sc, res, go = (random_array(rng, shape, dtype, special=False) for _ in range(3))
    gamma = (0.5 + rng.random(shape[-1])).astype(dtype)
    return sc, res, go, gamma


def kwargs(mode, scaling, training, axis):
    return dict(training=training, seed=SEED, offset=OFFSET, mode=mode, axis=axis, scaling=scaling)


@pytest.mark.parametrize("mode, scaling, training", CONFIGS)
@pytest.mark.parametrize("shape, axis", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_forward_backward_match_reference_and_cpu(rng, dtype, shape, axis, mode, scaling,
                                                  training):
    kw = kwargs(mode, scaling, training, axis)
    sc, res, go, gamma = inputs(rng, dtype, shape)
    want = reference.forward(sc, res, 0.6, gamma=gamma, **kw)
    want_single = reference.forward(None, res, 0.6, gamma=gamma, **kw)
    _, want_gr, want_gg = reference.backward(go, 0.6, gamma=gamma, residual=res, **kw)
    assert_bits_equal(stochdepth.forward(sc, res, 0.6, gamma=gamma, **kw), want, "CPU")
    sc_t, res_t, go_t, g_t = to_cuda(sc), to_cuda(res), to_cuda(go), to_cuda(gamma)

    got = stochdepth.forward(sc_t, res_t, 0.6, gamma=g_t, **kw)
    assert_bits_equal(to_numpy(got), want, "allocating")
    out = poisoned(shape, dtype)
    assert stochdepth.forward(sc_t, res_t, 0.6, gamma=g_t, out=out, **kw) is out
    assert_bits_equal(to_numpy(out), want, "out=")
    single = stochdepth.forward(None, res_t, 0.6, gamma=g_t, **kw)
    assert_bits_equal(to_numpy(single), want_single, "single")

    gs, gr, gg = stochdepth.backward(go_t, 0.6, gamma=g_t, residual=res_t, **kw)
    assert gs is go_t
    assert_bits_equal(to_numpy(gr), want_gr, "grad_residual")
    assert_bits_equal(to_numpy(gg), want_gg, "grad_gamma")
    out = poisoned(shape, dtype)
    _, gr, gg = stochdepth.backward(go_t, 0.6, gamma=g_t, residual=res_t, out=out, **kw)
    assert gr is out
    assert_bits_equal(to_numpy(out), want_gr, "grad_residual out=")
    assert_bits_equal(to_numpy(gg), want_gg, "grad_gamma (out=)")
    cpu = stochdepth.backward(go, 0.6, gamma=gamma, residual=res, **kw)
    assert_bits_equal(cpu[2], want_gg, "grad_gamma CPU")
    for name, t, a in [("shortcut", sc_t, sc), ("residual", res_t, res), ("grad_out", go_t, go),
                       ("gamma", g_t, gamma)]:
        assert_bits_equal(to_numpy(t), a, name + " modified")

    assert stochdepth.forward(sc_t, res_t, 0.6, gamma=g_t, out=sc_t, **kw) is sc_t  # in place
    assert_bits_equal(to_numpy(sc_t), want, "in place")


# Which of (shortcut, residual, out) start one element into their buffer: all alike keeps the
# vector kernel (with a head), one alone forces the scalar one.
MISALIGNED = {"all": (1, 1, 1), "residual": (0, 1, 0), "out": (0, 0, 1), "shortcut": (3, 0, 0)}


@pytest.mark.parametrize("which", list(MISALIGNED))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_misaligned_pointers(rng, dtype, which):
    shape, axis = (3, 40, 4, 13), 1
    kw = kwargs("row", "training", True, axis)
    sc, res, go, gamma = inputs(rng, dtype, shape)
    o_sc, o_res, o_out = MISALIGNED[which]
    sc_t, res_t, g_t = at_offset(sc, o_sc), at_offset(res, o_res), to_cuda(gamma)
    out = poisoned(shape, dtype, offset=o_out)
    stochdepth.forward(sc_t, res_t, 0.6, gamma=g_t, out=out, **kw)
    assert_bits_equal(to_numpy(out), reference.forward(sc, res, 0.6, gamma=gamma, **kw), which)
    out = poisoned(shape, dtype, offset=o_out)
    _, _, gg = stochdepth.backward(at_offset(go, o_res), 0.6, gamma=g_t, residual=res_t, out=out,
                                   **kw)
    _, want_gr, want_gg = reference.backward(go, 0.6, gamma=gamma, residual=res, **kw)
    assert_bits_equal(to_numpy(out), want_gr, "grad_residual " + which)
    assert_bits_equal(to_numpy(gg), want_gg, "grad_gamma " + which)


@pytest.mark.parametrize("p", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_every_sample_dropped_or_kept(rng, dtype, mode, p):
    shape = (70, 3, 9)
    kw = kwargs(mode, "training", True, 0)
    sc, res, go, gamma = inputs(rng, dtype, shape)
    if p == 0.0:  # never read: NaN would reach the output or grad_gamma
        res[...] = np.nan
        go[...] = np.nan
    sc_t, res_t, go_t, g_t = to_cuda(sc), to_cuda(res), to_cuda(go), to_cuda(gamma)
    want = reference.forward(sc, res, p, gamma=gamma, **kw)
    assert_bits_equal(to_numpy(stochdepth.forward(sc_t, res_t, p, gamma=g_t, **kw)), want, "out")
    _, gr, gg = stochdepth.backward(go_t, p, gamma=g_t, residual=res_t, **kw)
    _, want_gr, want_gg = reference.backward(go, p, gamma=gamma, residual=res, **kw)
    assert_bits_equal(to_numpy(gr), want_gr, "grad_residual")
    assert_bits_equal(to_numpy(gg), want_gg, "grad_gamma")
    if p == 0.0:
        assert_bits_equal(want, sc, "the shortcut")
        assert not to_numpy(gg).view(np.uint8).any()  # +0
        stochdepth.forward(sc_t, res_t, p, gamma=g_t, out=sc_t, **kw)  # in place: untouched
        assert_bits_equal(to_numpy(sc_t), sc, "in place")


def test_no_rows_gives_a_zero_grad_gamma():
    go = torch.empty((0, 4, 6), device="cuda")
    gamma = torch.ones(6, device="cuda")
    _, gr, gg = stochdepth.backward(go, 0.5, gamma=gamma, residual=go, seed=SEED)
    assert to_numpy(gr).shape == (0, 4, 6)
    assert_bits_equal(to_numpy(gg), np.zeros(6, np.float32), "grad_gamma")


def test_runs_on_the_stream_given(rng):
    shape = (64, 5, 96)
    sc, res, go, gamma = inputs(rng, np.float32, shape)
    kw = kwargs("row", "training", True, 0)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        sc_t, res_t, go_t, g_t = to_cuda(sc), to_cuda(res), to_cuda(go), to_cuda(gamma)
        out = torch.empty_like(sc_t)
        torch.cuda._sleep(10_000_000)  # a late stream: work queued elsewhere would run first
        stochdepth.forward(sc_t, res_t, 0.6, gamma=g_t, out=out, stream=s.cuda_stream, **kw)
        _, gr, gg = stochdepth.backward(go_t, 0.6, gamma=g_t, residual=res_t,
                                        stream=s.cuda_stream, **kw)
        gr, gg = torch.from_dlpack(gr).clone(), torch.from_dlpack(gg).clone()
    s.synchronize()
    _, want_gr, want_gg = reference.backward(go, 0.6, gamma=gamma, residual=res, **kw)
    assert_bits_equal(to_numpy(out), reference.forward(sc, res, 0.6, gamma=gamma, **kw), "out")
    assert_bits_equal(to_numpy(gr), want_gr, "grad_residual")
    assert_bits_equal(to_numpy(gg), want_gg, "grad_gamma")


def test_forward_and_backward_under_a_cuda_graph_capture(rng):
    """No synchronisation inside the calls (it would invalidate the capture); the forward with
    device words and out= draws the mask of each replay's words; the backward's scratch and
    outputs are stream-ordered allocations of the capture."""
    shape, p = (64, 3, 40), 0.5
    sc, res, go, gamma = inputs(rng, np.float32, shape)
    sc_t, res_t, go_t, g_t = to_cuda(sc), to_cuda(res), to_cuda(go), to_cuda(gamma)
    out = torch.empty_like(sc_t)
    words = torch.tensor([21, 0], dtype=torch.int64, device="cuda")
    results = {}

    def step():
        stochdepth.forward(sc_t, res_t, p, gamma=g_t, seed=words, out=out)
        results["grads"] = stochdepth.backward(go_t, p, gamma=g_t, residual=res_t, seed=words)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    _, gr, gg = results["grads"]
    gr_t, gg_t = torch.from_dlpack(gr), torch.from_dlpack(gg)
    words[1].fill_(5)
    graph.replay()
    torch.cuda.synchronize()
    kw = dict(seed=21, offset=5)
    assert_bits_equal(to_numpy(out), reference.forward(sc, res, p, gamma=gamma, **kw), "out")
    _, want_gr, want_gg = reference.backward(go, p, gamma=gamma, residual=res, **kw)
    assert_bits_equal(to_numpy(gr_t), want_gr, "grad_residual")
    assert_bits_equal(to_numpy(gg_t), want_gg, "grad_gamma")
    results.clear()
    del graph, gr, gg, gr_t, gg_t
    stochdepth.empty_cache()  # the frees deferred by the capture go through
    torch.cuda.synchronize()
