"""(seed, offset) read from memory, the graph-safe path (docs/design.md, "CUDA"), without a GPU.

The kernels can take the pair as two 64-bit words [seed, offset] in memory on the data's device
(`DropPathParams::rng_words`), read when the op runs. Here that path is checked bit for bit
against the argument path on the CPU (through `forward`/`backward` with `seed=` an array, and
through `run_raw(rng_words_ptr=...)`) and in the CUDA kernels' own source run by the emulator
(`_cuda_emulator.run(words_ptr=...)`), with the arguments set to other values so that a kernel
that read them instead of the words would fail. Also: the array's accepted forms and its errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import DTYPE_IDS, DTYPES, F32, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import _core, reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SEED, OFFSET = 2**63 + 0x1234_5678_9ABC, 2**32 + 7
OTHER = (0x5EED_0000_0000_0001, 99)  # what the arguments say when the words must win
NAMES = {np.dtype(np.float16): "float16", np.dtype(F32): "float32", np.dtype(F64): "float64"}


def words(seed=SEED, offset=OFFSET, dtype=np.uint64):
    return np.array([seed, offset], dtype=np.uint64).view(dtype)


# ---- the array API: forward / backward with seed=[seed, offset]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("word_dtype", [np.uint64, np.int64])
def test_forward_with_words_equals_the_integer_arguments(dtype, mode, word_dtype):
    r = np.random.default_rng(3)
    sc = random_array(r, (37, 5), dtype)
    res = random_array(r, (37, 5), dtype)
    kw = dict(mode=mode, scaling="training")
    want = stochdepth.forward(sc, res, 0.6, seed=SEED, offset=OFFSET, **kw)
    assert_bits_equal(want, reference.forward(sc, res, 0.6, seed=SEED, offset=OFFSET, **kw))
    got = stochdepth.forward(sc, res, 0.6, seed=words(dtype=word_dtype), **kw)
    assert_bits_equal(got, want)
    _, g_want = stochdepth.backward(res, 0.6, seed=SEED, offset=OFFSET, **kw)
    _, g_got = stochdepth.backward(res, 0.6, seed=words(dtype=word_dtype), **kw)
    assert_bits_equal(g_got, g_want)


def test_words_are_read_at_call_time_and_change_the_mask():
    x = np.ones((64, 3), F32)
    w = words(seed=1, offset=0)
    out = np.empty_like(x)
    masks = []
    for step in range(3):
        w[1] = step  # the same array, new contents: as a captured graph replays
        stochdepth.forward(None, x, 0.5, seed=w, out=out)
        masks.append(out[:, 0] != 0)
        np.testing.assert_array_equal(masks[-1], stochdepth.mask(64, 0.5, seed=1, offset=step))
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


def test_words_with_axis_and_in_place():
    r = np.random.default_rng(4)
    sc = random_array(r, (3, 9, 4), F32)
    res = random_array(r, (3, 9, 4), F32)
    want = reference.forward(sc, res, 0.5, seed=7, offset=3, axis=1)
    inplace = sc.copy()
    ret = stochdepth.forward(inplace, res, 0.5, seed=words(7, 3), axis=1, out=inplace)
    assert ret is inplace
    assert_bits_equal(inplace, want)


def test_words_at_inference_draw_nothing():
    x = np.arange(12, dtype=F32).reshape(4, 3)
    got = stochdepth.forward(x, x, 0.5, training=False, seed=words())
    assert_bits_equal(got, reference.forward(x, x, 0.5, training=False, seed=0))


def test_words_errors():
    x = np.ones((4, 3), F32)
    with pytest.raises(ValueError, match=r"offset must be 0 when seed is a \[seed, offset\] "
                                         r"array \(its second word is the offset\), got 5"):
        stochdepth.forward(x, x, 0.5, seed=words(), offset=5)
    with pytest.raises(TypeError, match=r"seed as an array must hold two 64-bit integers "
                                        r"\[seed, offset\] \(uint64 or int64.*got dtype float64"):
        stochdepth.forward(x, x, 0.5, seed=np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="got dtype uint32"):
        stochdepth.backward(x, 0.5, seed=np.array([1, 2], np.uint32))
    with pytest.raises(TypeError, match="native byte order"):
        stochdepth.forward(x, x, 0.5, seed=np.array([1, 2], ">u8"))
    strided = np.zeros(4, np.uint64)[::2]
    with pytest.raises(ValueError, match="seed must be C-contiguous"):
        stochdepth.forward(x, x, 0.5, seed=strided)
    with pytest.raises(TypeError, match=r"mask takes seed and offset as integers"):
        stochdepth.mask(4, 0.5, seed=words())
    # Other shapes keep the integer path and its message.
    with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 2\*\*64\), got ndarray "
                                        r"of shape \(3,\)"):
        stochdepth.forward(x, x, 0.5, seed=np.array([1, 2, 3], np.uint64))


def test_words_from_a_dlpack_producer():
    torch = pytest.importorskip("torch")
    x = np.ones((40, 2), F32)
    w = torch.tensor([5, -1], dtype=torch.int64)  # -1: the offset 2**64 - 1, two's complement
    got = stochdepth.forward(None, torch.from_numpy(x), 0.5, seed=w)
    want = reference.forward(None, x, 0.5, seed=5, offset=2**64 - 1)
    assert_bits_equal(np.from_dlpack(got), want)
    with pytest.raises(TypeError, match=r"seed as an array must hold two 64-bit integers"):
        stochdepth.forward(None, torch.from_numpy(x), 0.5, seed=torch.tensor([5, 1.0]))


# ---- the raw entry: run_raw(rng_words_ptr=...) on the CPU


@pytest.mark.parametrize("dtype", [np.float16, F32, F64], ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_run_raw_words_pointer_on_the_cpu(dtype, mode):
    r = np.random.default_rng(5)
    sc = random_array(r, (50, 6), dtype)
    res = random_array(r, (50, 6), dtype)
    out = np.full_like(res, np.nan)
    w = words()
    _core.run_raw(sc.ctypes.data, res.ctypes.data, out.ctypes.data, 1, 50, 6,
                  getattr(_core.DType, NAMES[np.dtype(dtype)]), 0.5, True, mode == "batch",
                  _core.Scaling.training, *OTHER, -1, 0, rng_words_ptr=w.ctypes.data)
    assert_bits_equal(out, reference.forward(sc, res, 0.5, seed=SEED, offset=OFFSET, mode=mode,
                                             scaling="training"))


def test_run_raw_words_pointer_compact_rows_on_the_cpu():
    r = np.random.default_rng(6)
    batch, inner = 40, 5
    keep = stochdepth.mask(batch, 0.5, seed=SEED, offset=OFFSET)
    full = random_array(r, (batch, inner), F32)
    kept = np.empty((int(keep.sum()), inner), F32)
    w = words()
    _core.run_raw(0, full.ctypes.data, kept.ctypes.data, 1, batch, inner, _core.DType.float32,
                  0.5, True, False, _core.Scaling.inference, *OTHER, -1, 0,
                  compact_output=True, rng_words_ptr=w.ctypes.data)
    assert_bits_equal(kept, full[keep])


def test_run_raw_refuses_a_misaligned_words_pointer():
    x = np.ones(4, F32)
    raw = np.zeros(3, np.uint64)
    with pytest.raises(ValueError, match="rng_words_ptr must be aligned to 8 bytes"):
        _core.run_raw(0, x.ctypes.data, x.ctypes.data, 1, 4, 1, _core.DType.float32, 0.5, True,
                      False, _core.Scaling.training, 0, 0, -1, 0,
                      rng_words_ptr=raw.ctypes.data + 4)


# ---- the CUDA kernels' source on the CPU (the emulator)


@pytest.fixture(scope="module")
def emu():
    if not stochdepth.build_info()["cuda_emulator"]:
        pytest.skip("no emulator in this build (test_build_info checks which)")
    from stochdepth import _cuda_emulator

    return _cuda_emulator


def _emu_dense(emu, sc, res, geom, p, mode, words_ptr, seed, offset, reverse=False,
               training=True):
    out = np.full_like(res, np.nan)
    emu.run(0 if sc is None else sc.ctypes.data, res.ctypes.data, out.ctypes.data, *geom,
            NAMES[res.dtype], p, training, mode == "batch", "training", seed, offset,
            reverse_threads=reverse, words_ptr=words_ptr)
    return out


# inner 1 over many samples: the draw cache across Philox blocks; rows across tiles; one tile.
@pytest.mark.parametrize("geom", [(1, 5000, 1), (2, 33, 70), (1, 3, 4)])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("dtype", [np.float16, F32, F64], ids=["f16", "f32", "f64"])
def test_emulated_dense_kernel_words_equal_arguments(emu, geom, mode, dtype):
    r = np.random.default_rng(7)
    shape = (geom[0], geom[1], geom[2])
    sc = random_array(r, shape, dtype)
    res = random_array(r, shape, dtype)
    by_args = _emu_dense(emu, sc, res, geom, 0.5, mode, 0, SEED, OFFSET)
    w = words()
    by_words = _emu_dense(emu, sc, res, geom, 0.5, mode, w.ctypes.data, *OTHER)
    assert_bits_equal(by_words, by_args)
    assert_bits_equal(by_words, reference.forward(sc, res, 0.5, seed=SEED, offset=OFFSET,
                                                  mode=mode, axis=1, scaling="training"))
    # Backward (single-input form), threads in reverse order: the words need no barrier.
    g_args = _emu_dense(emu, None, res, geom, 0.5, mode, 0, SEED, OFFSET, reverse=True)
    g_words = _emu_dense(emu, None, res, geom, 0.5, mode, w.ctypes.data, *OTHER, reverse=True)
    assert_bits_equal(g_words, g_args)


def test_emulated_dense_kernel_reads_the_words_per_launch(emu):
    res = np.ones((1, 300, 2), F32)
    w = words(seed=11, offset=0)
    for step in range(3):
        w[1] = step
        out = _emu_dense(emu, None, res, (1, 300, 2), 0.5, "row", w.ctypes.data, *OTHER)
        np.testing.assert_array_equal(out[0, :, 0] != 0,
                                      stochdepth.mask(300, 0.5, seed=11, offset=step))


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("batch, inner", [(600, 4), (9, 1000)])
def test_emulated_compact_kernels_words_equal_arguments(emu, mode, batch, inner):
    r = np.random.default_rng(8)
    keep = stochdepth.mask(batch, 0.5, seed=SEED, offset=OFFSET, mode=mode)
    n_kept = int(keep.sum())
    full = random_array(r, (batch, inner), F32)
    kept_in = random_array(r, (n_kept, inner), F32)
    w = words()
    results = []
    for words_ptr, seed, offset in [(0, SEED, OFFSET), (w.ctypes.data, *OTHER)]:
        gathered = np.full((n_kept, inner), np.nan, F32)
        emu.run(0, full.ctypes.data, gathered.ctypes.data, 1, batch, inner, "float32", 0.5,
                True, mode == "batch", "training", seed, offset, compact_output=True,
                reverse_threads=True, words_ptr=words_ptr)
        scattered = np.full((batch, inner), np.nan, F32)
        emu.run(full.ctypes.data, kept_in.ctypes.data, scattered.ctypes.data, 1, batch, inner,
                "float32", 0.5, True, mode == "batch", "training", seed, offset,
                compact_input=True, words_ptr=words_ptr)
        results.append((gathered, scattered))
    assert_bits_equal(results[1][0], results[0][0])
    assert_bits_equal(results[1][1], results[0][1])
    assert_bits_equal(results[1][0], (full[keep] * np.float32(2.0)).astype(F32))


# ---- the PyTorch adapter's device-words helpers, on the CPU


def test_rank_words_is_rank_seed_on_the_words():
    torch = pytest.importorskip("torch")
    from stochdepth.torch import _keys

    for seed in [0, 1, 2**63, 2**64 - 1, SEED]:
        for rank in [-1, 0, 1, 7, 1023]:
            w = _keys.Rng(seed, OFFSET).tensor()
            got = _keys.Rng.of(_keys.rank_words(w, rank))
            assert got == _keys.Rng(seed, OFFSET).for_rank(rank)
            assert _keys.Rng.of(w) == _keys.Rng(seed, OFFSET)  # the input is left alone
    assert torch.equal(_keys.rank_words(w, -1), w)


def test_key_of_reads_cpu_words():
    torch = pytest.importorskip("torch")
    from stochdepth.torch import _keys

    r = _keys.Rng(3, 4)
    assert _keys.Key.of(r.tensor()) == _keys.Key(3, 4)  # read on the host: no words kept
    assert _keys.Key.of(torch.tensor([3, 4], dtype=torch.uint64)) == _keys.Key(3, 4)
    assert not _keys.capturing(torch.ones(2))  # a CPU tensor never captures


def test_a_cpu_generator_is_refused_for_a_device_draw():
    torch = pytest.importorskip("torch")
    from stochdepth.torch import _keys

    with pytest.raises(ValueError, match="a CPU generator cannot draw the mask inside a CUDA "
                                         "graph capture"):
        _keys.draw_on_device(torch.Generator(), torch.ones(2))


def test_write_device_words_on_the_cpu():
    w = np.zeros(2, np.uint64)
    _core.write_device_words(w.ctypes.data, 2**64 - 1, 5, -1)
    assert w.tolist() == [2**64 - 1, 5]
    with pytest.raises(ValueError, match="8-byte aligned"):
        _core.write_device_words(w.ctypes.data + 4, 1, 2, -1)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*64\)"):
        _core.write_device_words(w.ctypes.data, 1, -2, -1)
