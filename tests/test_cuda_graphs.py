"""Fresh masks under CUDA graphs (docs/design.md, "CUDA"): a captured step replayed three times
draws three masks, each the one `stochdepth.mask` gives for the words that replay used, and its
backward regenerates exactly its forward's mask.

Covers: the raw API (`seed=` device words, `out=`, `stream=`) captured and replayed with new
words; the PyTorch adapter under `torch.cuda.graph` (unseeded: words from torch's CUDA
generator; seeded: the module's device words advance by one offset per replay) for a
forward+backward step; `torch.compile(mode="reduce-overhead")` of a small block; and the refusals
(a CPU generator while capturing, StochasticResidual). Runs on a GPU only (the GPU check); the
pointer path itself is checked without a GPU in test_rng_words.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import stochdepth

if stochdepth.build_info()["cuda_device_count"] == 0:
    pytest.skip("no CUDA device", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch without CUDA", allow_module_level=True)

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.torch import _keys, _seeded  # noqa: E402

pytestmark = pytest.mark.cuda

M64 = 2**64 - 1
BATCH, P = 64, 0.5


def u64(words):
    w0, w1 = (int(v) & M64 for v in words.cpu().tolist())
    return w0, w1


def mask_of(out):
    """The mask a single-input output shows: a sample is kept iff its row is nonzero."""
    return (out.detach().reshape(out.shape[0], -1) != 0).any(dim=1).cpu().numpy()


def capture(step, warmup=2):
    """torch's documented recipe: warm up on a side stream, then capture `step` into a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


def test_raw_api_with_device_words_out_and_stream_replays_new_masks():
    x = torch.ones(BATCH, 8, device="cuda")
    out = torch.empty_like(x)
    words = torch.tensor([2**63 + 5, 0], dtype=torch.int64, device="cuda")

    def step():
        stream = torch.cuda.current_stream().cuda_stream
        stochdepth.forward(None, x, P, seed=words, out=out, stream=stream)

    graph, _ = capture(step)
    masks = []
    for k in range(3):
        words[1].fill_(k + 10)  # new words for this replay, written outside the graph
        graph.replay()
        torch.cuda.synchronize()
        masks.append(mask_of(out))
        np.testing.assert_array_equal(masks[-1], stochdepth.mask(BATCH, P, seed=2**63 + 5,
                                                                 offset=k + 10))
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def _record_draws(monkeypatch):
    """The words tensors drawn on the device: graph memory, so after a replay they hold the
    words that replay drew."""
    drawn = []
    original = _keys.draw_on_device

    def recording(generator, like):
        w = original(generator, like)
        drawn.append(w)
        return w

    for module in (_keys, _seeded):  # a function's draw and an unseeded module's
        monkeypatch.setattr(module, "draw_on_device", recording)
    return drawn


@pytest.mark.parametrize("seeded", [False, True])
def test_captured_forward_backward_step_draws_a_new_mask_per_replay(monkeypatch, seeded):
    drawn = _record_draws(monkeypatch)
    module = sdt.StochasticDepth(P, scaling="training", seed=77 if seeded else None).cuda()
    shortcut = torch.zeros(BATCH, 4, device="cuda")
    residual = torch.ones(BATCH, 4, device="cuda", requires_grad=True)

    def step():
        out = module(shortcut, residual)
        (grad,) = torch.autograd.grad(out, residual, torch.ones_like(out))
        return out, grad

    graph, (out, grad) = capture(step)
    offset0 = module.offset if seeded else None
    masks = []
    for k in range(3):
        graph.replay()
        torch.cuda.synchronize()
        if seeded:
            seed, offset = 77, offset0 + k
        else:
            seed, offset = u64(drawn[-1])
        want = stochdepth.mask(BATCH, P, seed=seed, offset=offset)
        np.testing.assert_array_equal(mask_of(out), want)
        np.testing.assert_array_equal(mask_of(grad), want)  # backward: the forward's words
        masks.append(want)
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    if seeded:
        assert module.offset == offset0 + 3  # one offset per replay, as per eager call
        # Eager again: the next offset, the same masks as the host path gives.
        out = module(shortcut, residual)
        np.testing.assert_array_equal(mask_of(out), stochdepth.mask(BATCH, P, seed=77,
                                                                    offset=offset0 + 3))
        assert module.offset == offset0 + 4


def test_functional_capture_draws_from_the_device_generator(monkeypatch):
    drawn = _record_draws(monkeypatch)
    x = torch.ones(BATCH, 3, device="cuda")
    graph, out = capture(lambda: sdt.drop_path(x, 1 - P, training=True))
    seen = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seed, offset = u64(drawn[-1])
        seen.append((seed, offset))
        np.testing.assert_array_equal(mask_of(out), stochdepth.mask(BATCH, P, seed=seed,
                                                                    offset=offset))
    assert len(set(seen)) == 3


def test_capture_refuses_a_cpu_generator_and_stochastic_residual():
    x = torch.ones(BATCH, 3, device="cuda")
    block = sdt.StochasticResidual(torch.nn.Identity(), P).cuda()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="a CPU generator cannot draw the mask inside a CUDA "
                                         "graph capture"):
        with torch.cuda.graph(graph):
            sdt.drop_path(x, 0.5, training=True, generator=torch.Generator())
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="StochasticResidual cannot be captured"):
        with torch.cuda.graph(graph):
            block(x)


@pytest.mark.timeout(300)  # torch.compile: tens of seconds cold
@pytest.mark.parametrize("seeded", [False, True])
def test_compile_reduce_overhead_draws_a_new_mask_per_call(seeded):
    torch._dynamo.reset()
    drop = sdt.DropPath(1 - P, seed=5 if seeded else None).cuda()
    linear = torch.nn.Linear(4, 4, bias=False).cuda()
    torch.nn.init.eye_(linear.weight)
    block = torch.nn.Sequential(linear, drop).train()
    compiled = torch.compile(block, mode="reduce-overhead")
    x = torch.ones(BATCH, 4, device="cuda", requires_grad=True)
    masks = []
    for _ in range(5):  # the first calls warm up and record; later ones replay
        offset = drop.offset
        out = compiled(x)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
        torch.cuda.synchronize()
        got = mask_of(out)
        np.testing.assert_array_equal(mask_of(grad), got)  # backward used the forward's words
        if seeded:
            np.testing.assert_array_equal(got, stochdepth.mask(BATCH, P, seed=5, offset=offset))
            assert drop.offset == offset + 1
        masks.append(got)
    assert all(not np.array_equal(a, b) for a, b in zip(masks, masks[1:]))


def test_two_seeded_modules_keep_their_words_across_a_temporary_freed_in_the_capture():
    # The words are reserved by .cuda(), outside the capture: a temporary allocated and freed
    # between the two modules inside the capture cannot take their memory and overwrite them.
    first = sdt.DropPath(1 - P, seed=11).cuda()
    second = sdt.DropPath(1 - P, seed=12).cuda()
    x = torch.ones(BATCH, 64, device="cuda")

    def step():
        y = first(x)
        tmp = torch.full((4096,), -1, dtype=torch.int64, device="cuda")
        y = y + tmp[:1].float() * 0  # used, then freed inside the capture
        del tmp
        return y, second(x)

    graph, (y, z) = capture(step)
    o1, o2 = first.offset, second.offset
    for k in range(3):
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(mask_of(y), stochdepth.mask(BATCH, P, seed=11, offset=o1 + k))
        np.testing.assert_array_equal(mask_of(z), stochdepth.mask(BATCH, P, seed=12, offset=o2 + k))
    assert (first.offset, second.offset) == (o1 + 3, o2 + 3)


def test_a_seeded_module_never_run_on_the_device_is_refused_in_a_capture():
    drop = sdt.DropPath(1 - P, seed=3)  # on the CPU: nothing reserved on the GPU
    x = torch.ones(BATCH, 4, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be allocated inside a CUDA graph capture"):
        with torch.cuda.graph(graph):
            drop(x)


def test_raw_api_without_stream_runs_on_torchs_current_stream_under_capture():
    # Without stream= the raw API takes torch's current stream (the capture's): the legacy
    # default stream would have broken the capture.
    x = torch.ones(BATCH, 8, device="cuda")
    out = torch.empty_like(x)
    words = torch.tensor([21, 0], dtype=torch.int64, device="cuda")
    graph, _ = capture(lambda: stochdepth.forward(None, x, P, seed=words, out=out))
    for k in range(2):
        words[1].fill_(k + 3)
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(mask_of(out), stochdepth.mask(BATCH, P, seed=21,
                                                                    offset=k + 3))


def test_freeing_an_exported_output_inside_a_capture_leaves_the_capture_valid():
    # A library-allocated output consumed on another stream, freed while a graph is captured:
    # no device synchronisation (which would invalidate the capture), the free is deferred.
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    x = torch.ones(BATCH, 8, device="cuda")
    with torch.cuda.stream(producer):
        arr = stochdepth.forward(x, x, P, seed=1, stream=producer.cuda_stream)
    with torch.cuda.stream(consumer):
        t = torch.from_dlpack(arr)
        t.sum()
    del arr
    y = torch.zeros(BATCH, 8, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        del t  # the last reference: the DLPack deleter runs inside the capture
        y.add_(1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.ones_like(y))
    stochdepth.empty_cache()  # the deferred free goes through, the pool is trimmed
    torch.cuda.synchronize()
