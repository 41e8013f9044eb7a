"""The CUDA kernels against stochdepth.reference and the CPU path, bit for bit (the arithmetic is
pinned: docs/design.md, "Arithmetic"; no tolerance), through torch.cuda tensors (DLPack) and the
raw hook.

Covers: every dtype, mode, scaling, training/inference, axis; the allocating form (the result is
taken by torch.from_dlpack without a copy and outlives the Array), `out=` poisoned with NaN (every
element written), in place (dropped rows keep their bits), the single-input form, backward;
awkward shapes (inner 1, 7, 8, 9, 1000003; batch 1, 2, 33; many tiles; empty), misaligned
pointers (all alike: vector path with a head; one alone: scalar path), NaN in dropped rows (never
read), masks vs the reference and the CPU, a non-default stream, device errors, run_raw,
stream_copy_raw, the compact rows of StochasticResidual, torch's stream 0 and a consumer on
another stream. Skipped where no GPU is present; test_build_info.py checks that CUDA is compiled.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16, DTYPE_IDS, DTYPES, F16, F32, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

if stochdepth.build_info()["cuda_device_count"] == 0:
    pytest.skip("no CUDA device", allow_module_level=True)
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("ieee_overflow_ok")]

TORCH_DTYPES = {F16: torch.float16, BF16: torch.bfloat16, F32: torch.float32, F64: torch.float64}
SEED, OFFSET = 2**63 + 0x1234_5678_9ABC, 2**32 + 7  # both 32-bit halves of both words in play

# (shape, axis) -> [outer, batch, inner]: inner 1, 7, 8, 9, 1000003; batch 1, 2, 33; tiles that
# cut rows anywhere (inner 7 over 3000 rows), and a batch of 70000 single-element rows.
SHAPES = [
    ((33,), 0),
    ((2, 7), 0),
    ((33, 8), 0),
    ((3, 2, 9), 1),
    ((5, 33), -1),
    ((2, 33, 3, 3), 1),
    ((3, 3000, 7), 1),
    ((70000,), 0),
    ((2, 1, 20000), 1),
    pytest.param((1, 1000003), 0, marks=pytest.mark.slow),
]
EMPTY = [((0,), 0), ((0, 7), 0), ((3, 0), 0), ((2, 0, 5), 1)]
# (mode, scaling, training)
CONFIGS = [
    ("row", "inference", True),
    ("row", "training", True),
    ("batch", "training", True),
    ("row", "inference", False),
    ("batch", "training", False),
]


def shape_id(value):
    """Test id of one value of a (shape, axis) parameter: "3x33x9" or "ax1"."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else f"ax{value}"


def to_cuda(a):
    """NumPy -> torch.cuda tensor with the same bits (bf16 via an int16 view)."""
    a = np.ascontiguousarray(a)
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(a).cuda()


def to_numpy(x):
    """torch.cuda tensor or any DLPack producer (stochdepth.Array) -> NumPy with the same bits."""
    t = x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
    assert t.is_cuda
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def poisoned(shape, dtype, *, offset=0):
    """A NaN-filled CUDA tensor, starting `offset` elements into its buffer."""
    n = int(np.prod(shape, dtype=np.int64))
    buf = torch.full((n + offset,), float("nan"), dtype=TORCH_DTYPES[dtype], device="cuda")
    return buf[offset:].view(shape)


def at_offset(a, offset):
    """The CUDA copy of `a` starting `offset` elements into a larger buffer (misaligned data)."""
    t = poisoned(a.shape, a.dtype, offset=offset)
    t.copy_(to_cuda(a))
    return t


def kwargs(mode, scaling, training, axis, *, seed=SEED, offset=OFFSET):
    return dict(training=training, seed=seed, offset=offset, mode=mode, axis=axis, scaling=scaling)


@pytest.mark.parametrize("mode, scaling, training", CONFIGS)
@pytest.mark.parametrize("shape, axis", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_forward_backward_match_reference_and_cpu(rng, dtype, shape, axis, mode, scaling,
                                                  training):
    kw = kwargs(mode, scaling, training, axis)
    sc, res = random_array(rng, shape, dtype), random_array(rng, shape, dtype)
    want = reference.forward(sc, res, 0.8, **kw)
    want_single = reference.forward(None, res, 0.8, **kw)
    assert_bits_equal(stochdepth.forward(sc, res, 0.8, **kw), want, "CPU")
    sc_t, res_t = to_cuda(sc), to_cuda(res)

    got = stochdepth.forward(sc_t, res_t, 0.8, **kw)  # allocating: a stochdepth.Array
    assert_bits_equal(to_numpy(got), want, "allocating")
    out = poisoned(shape, dtype)
    assert stochdepth.forward(sc_t, res_t, 0.8, out=out, **kw) is out
    assert_bits_equal(to_numpy(out), want, "out=")
    assert_bits_equal(to_numpy(stochdepth.forward(None, res_t, 0.8, **kw)), want_single, "single")
    out = poisoned(shape, dtype)
    assert stochdepth.forward(None, res_t, 0.8, out=out, **kw) is out
    assert_bits_equal(to_numpy(out), want_single, "single out=")

    g = to_cuda(res)
    gs, gr = stochdepth.backward(g, 0.8, **kw)
    assert gs is g
    assert_bits_equal(to_numpy(gr), reference.backward(res, 0.8, **kw)[1], "backward")
    assert_bits_equal(to_numpy(g), res, "grad_out modified")
    assert_bits_equal(to_numpy(sc_t), sc, "shortcut modified")
    assert_bits_equal(to_numpy(res_t), res, "residual modified")

    assert stochdepth.forward(sc_t, res_t, 0.8, out=sc_t, **kw) is sc_t  # in place, last
    assert_bits_equal(to_numpy(sc_t), want, "in place")


# Which of (shortcut, residual, out) start one element into their buffer: all alike keeps the
# vector path (with a head), one alone forces the scalar path.
MISALIGNED = {"all": (1, 1, 1), "residual": (0, 1, 0), "out": (0, 0, 1), "shortcut": (3, 0, 0)}


@pytest.mark.parametrize("which", list(MISALIGNED))
@pytest.mark.parametrize("shape, axis", [((33, 9), 0), ((3, 3000, 7), 1), ((2, 40000), 0)],
                         ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_misaligned_pointers(rng, dtype, shape, axis, which):
    kw = kwargs("row", "training", True, axis)
    sc, res = random_array(rng, shape, dtype), random_array(rng, shape, dtype)
    o_sc, o_res, o_out = MISALIGNED[which]
    sc_t, res_t, out = at_offset(sc, o_sc), at_offset(res, o_res), poisoned(shape, dtype,
                                                                            offset=o_out)
    stochdepth.forward(sc_t, res_t, 0.8, out=out, **kw)
    assert_bits_equal(to_numpy(out), reference.forward(sc, res, 0.8, **kw), which)
    out = poisoned(shape, dtype, offset=o_out)
    stochdepth.backward(res_t, 0.8, out=out, **kw)
    assert_bits_equal(to_numpy(out), reference.backward(res, 0.8, **kw)[1], "backward " + which)
    stochdepth.forward(sc_t, res_t, 0.8, out=sc_t, **kw)
    assert_bits_equal(to_numpy(sc_t), reference.forward(sc, res, 0.8, **kw), "in place " + which)


@pytest.mark.parametrize("shape, axis", [((64, 5), 0), ((3, 40, 1), 1), ((4, 9000), 0)],
                         ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_dropped_rows_are_not_read_and_in_place_not_written(rng, dtype, shape, axis):
    kw = kwargs("row", "training", True, axis)
    sc, res = random_array(rng, shape, dtype), random_array(rng, shape, dtype)
    keep = reference.mask(sc.shape[axis], 0.5, seed=SEED, offset=OFFSET)
    assert keep.any() and not keep.all()
    dropped = [slice(None)] * sc.ndim
    dropped[axis] = ~keep
    dropped = tuple(dropped)
    res[dropped] = np.nan  # read anywhere, it would reach the output (or the gradient)
    # Dropped shortcut rows hold a signalling NaN: a copy through float arithmetic would quiet it.
    bits_of = sc.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[sc.itemsize])
    bits_of[dropped] = {2: 0x7C01 if dtype == F16 else 0x7F81, 4: 0x7F800001,
                        8: 0x7FF0000000000001}[sc.itemsize]
    want = reference.forward(sc, res, 0.5, **kw)
    sc_t, res_t = to_cuda(sc), to_cuda(res)
    assert_bits_equal(to_numpy(stochdepth.forward(sc_t, res_t, 0.5, **kw)), want)
    assert_bits_equal(to_numpy(stochdepth.backward(res_t, 0.5, **kw)[1]),
                      reference.backward(res, 0.5, **kw)[1])
    assert stochdepth.forward(sc_t, res_t, 0.5, out=sc_t, **kw) is sc_t
    assert_bits_equal(to_numpy(sc_t), want, "in place")


@pytest.mark.parametrize("p", [0.0, 0.5, 0.8, 1.0, 1 - 2**-33])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("batch, inner", [(100003, 1), (4099, 3), (33, 2000)])
def test_mask_matches_reference_and_cpu(batch, inner, mode, p):
    """The GPU's mask, read off the single-input form on ones (kept -> 1, dropped -> 0)."""
    for seed, offset in [(0, 0), (SEED, OFFSET), (2**64 - 1, 2**64 - 1)]:
        ones = torch.ones((2, batch, inner), dtype=torch.float32, device="cuda")
        out = stochdepth.forward(None, ones, p, seed=seed, offset=offset, mode=mode, axis=1)
        got = to_numpy(out)
        assert set(np.unique(got)) <= {0.0, 1.0}
        assert (got == got[0:1, :, 0:1]).all(), "one decision per sample"
        want = reference.mask(batch, p, seed=seed, offset=offset, mode=mode)
        np.testing.assert_array_equal(got[0, :, 0] == 1.0, want, f"seed={seed} offset={offset}")
        np.testing.assert_array_equal(
            stochdepth.mask(batch, p, seed=seed, offset=offset, mode=mode), want)


@pytest.mark.parametrize("shape, axis", EMPTY, ids=shape_id)
@pytest.mark.parametrize("dtype", [F16, F64], ids=DTYPE_IDS.get)
def test_empty_tensors(dtype, shape, axis):
    x = torch.empty(shape, dtype=TORCH_DTYPES[dtype], device="cuda")
    got = torch.from_dlpack(stochdepth.forward(x, x.clone(), 0.8, seed=1, axis=axis))
    assert got.shape == x.shape and got.is_cuda
    assert stochdepth.forward(x, x, 0.8, seed=1, axis=axis, out=x) is x
    assert torch.from_dlpack(stochdepth.backward(x, 0.8, seed=1, axis=axis)[1]).shape == x.shape
    torch.cuda.synchronize()


def test_result_is_taken_without_copy_and_outlives_the_array(rng):
    sc, res = random_array(rng, (33, 129), F32), random_array(rng, (33, 129), F32)
    arr = stochdepth.forward(to_cuda(sc), to_cuda(res), 0.8, seed=SEED)
    assert isinstance(arr, stochdepth.Array)
    assert tuple(arr.shape) == (33, 129)
    t1, t2 = torch.from_dlpack(arr), torch.from_dlpack(arr)
    assert t1.data_ptr() == t2.data_ptr() and t1.is_cuda
    del arr, t2
    torch.cuda.synchronize()
    torch.empty(1 << 20, device="cuda").fill_(7.0)  # reuse of freed memory would show
    assert_bits_equal(to_numpy(t1), reference.forward(sc, res, 0.8, seed=SEED))


def test_runs_on_the_given_stream(rng):
    sc, res = random_array(rng, (256, 4099), F32), random_array(rng, (256, 4099), F32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        sc_t, res_t = to_cuda(sc), to_cuda(res)
        out = torch.empty_like(sc_t)
        stream = torch.cuda.current_stream().cuda_stream
        assert stream == s.cuda_stream
        for offset in range(3):  # queued back to back; no host synchronisation in between
            stochdepth.forward(sc_t, res_t, 0.8, seed=SEED, offset=offset, out=out, stream=stream)
        got = out.clone()  # ordered after the kernels on s
    s.synchronize()
    assert_bits_equal(to_numpy(got), reference.forward(sc, res, 0.8, seed=SEED, offset=2))


def test_device_mismatch_is_a_value_error():
    x = torch.ones((4, 3), device="cuda")
    with pytest.raises(ValueError):
        stochdepth.forward(x, torch.ones((4, 3)), 0.8, seed=1)
    with pytest.raises(ValueError):
        stochdepth.forward(torch.ones((4, 3)), x, 0.8, seed=1)
    with pytest.raises(ValueError):
        stochdepth.forward(x, x.clone(), 0.8, seed=1, out=torch.ones((4, 3)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_and_current_device_restored(rng):
    sc = random_array(rng, (33, 70), F32)
    with torch.cuda.device(0):
        got = stochdepth.forward(to_cuda(sc).to("cuda:1"), to_cuda(sc).to("cuda:1"), 0.8, seed=3)
        assert torch.cuda.current_device() == 0
    t = torch.from_dlpack(got)
    assert t.device == torch.device("cuda", 1)
    assert_bits_equal(to_numpy(t), reference.forward(sc, sc, 0.8, seed=3))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_run_raw(rng, dtype):
    core = stochdepth._core
    sc, res = random_array(rng, (3, 33, 9), dtype), random_array(rng, (3, 33, 9), dtype)
    sc_t, res_t, out = to_cuda(sc), to_cuda(res), poisoned(sc.shape, dtype)
    name = getattr(core.DType, {F16: "float16", BF16: "bfloat16", F32: "float32",
                                F64: "float64"}[dtype])
    dev, stream = torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream
    for training, scaling in [(True, "training"), (False, "inference")]:
        sc_enum = getattr(core.Scaling, scaling)
        core.run_raw(sc_t.data_ptr(), res_t.data_ptr(), out.data_ptr(), 3, 33, 9, name, 0.8,
                     training, False, sc_enum, SEED, OFFSET, dev, stream)
        kw = kwargs("row", scaling, training, 1)
        assert_bits_equal(to_numpy(out), reference.forward(sc, res, 0.8, **kw), "forward")
        core.run_raw(0, res_t.data_ptr(), out.data_ptr(), 3, 33, 9, name, 0.8, training, False,
                     sc_enum, SEED, OFFSET, dev, stream)
        assert_bits_equal(to_numpy(out), reference.backward(res, 0.8, **kw)[1], "backward")


@pytest.mark.parametrize("nbytes", [1, 15, 16, 17, 4096 * 16 + 5, 3_000_001])
@pytest.mark.parametrize("src_off, dst_off", [(0, 0), (3, 3), (1, 0)])
def test_stream_copy_raw(rng, nbytes, src_off, dst_off):
    src = torch.from_numpy(rng.integers(0, 256, nbytes + src_off, dtype=np.uint8)).cuda()
    dst = torch.zeros(nbytes + dst_off + 1, dtype=torch.uint8, device="cuda")
    stochdepth._core.stream_copy_raw(dst.data_ptr() + dst_off, src.data_ptr() + src_off, nbytes,
                                     torch.cuda.current_device(),
                                     torch.cuda.current_stream().cuda_stream)
    got = dst.cpu().numpy()
    np.testing.assert_array_equal(got[dst_off:dst_off + nbytes], src.cpu().numpy()[src_off:])
    assert not got[:dst_off].any() and got[-1] == 0, "wrote outside [dst, dst + nbytes)"


# ---- the compact kernels of StochasticResidual (also emulated on the CPU: test_cuda_emulated.py)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("batch, inner", [(37, 1), (9, 7), (300, 16), (3, 8200), (1030, 2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_compact_rows_match_reference(rng, dtype, batch, inner, mode):
    core = stochdepth._core
    p = 0.55
    keep = reference.mask(batch, p, seed=SEED, offset=OFFSET, mode=mode)
    n_kept = int(keep.sum())
    sc, grad = random_array(rng, (batch, inner), dtype), random_array(rng, (batch, inner), dtype)
    kept_res = random_array(rng, (n_kept, inner), dtype)
    kw = dict(seed=SEED, offset=OFFSET, mode=mode, axis=0, scaling="training")
    name = getattr(core.DType, {F16: "float16", BF16: "bfloat16", F32: "float32",
                                F64: "float64"}[dtype])
    dev, stream = torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream
    args = (1, batch, inner, name, p, True, mode == "batch", core.Scaling.training, SEED, OFFSET,
            dev, stream)
    sc_t, res_t, out = to_cuda(sc), to_cuda(kept_res), poisoned(sc.shape, dtype)
    core.run_raw(sc_t.data_ptr(), res_t.data_ptr(), out.data_ptr(), *args, compact_input=True)
    want = reference.forward_kept(sc, kept_res, p, **kw)
    assert_bits_equal(to_numpy(out), want, "scatter-add")
    core.run_raw(sc_t.data_ptr(), res_t.data_ptr(), sc_t.data_ptr(), *args, compact_input=True)
    assert_bits_equal(to_numpy(sc_t), want, "scatter-add in place")
    if n_kept:
        g_t, gout = to_cuda(grad), poisoned((n_kept, inner), dtype)
        core.run_raw(0, g_t.data_ptr(), gout.data_ptr(), *args, compact_output=True)
        assert_bits_equal(to_numpy(gout), reference.backward_kept(grad, p, **kw), "gather")


# ---- streams: torch's legacy default stream (0), and a consumer on another stream


def test_torch_default_stream_zero_is_accepted(rng):
    sc, res = random_array(rng, (33, 70), F32), random_array(rng, (33, 70), F32)
    stream = torch.cuda.default_stream().cuda_stream
    assert stream == 0  # what the benchmark passes; DLPack reserves 0, the binding sends 1
    got = stochdepth.forward(to_cuda(sc), to_cuda(res), 0.8, seed=SEED, stream=stream)
    assert_bits_equal(to_numpy(got), reference.forward(sc, res, 0.8, seed=SEED))


def test_consumer_on_another_stream_waits_for_the_kernel(rng):
    sc, res = random_array(rng, (512, 8192), F32), random_array(rng, (512, 8192), F32)
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    sc_t, res_t = to_cuda(sc), to_cuda(res)
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(50_000_000)  # the kernel below starts late
        arr = stochdepth.forward(sc_t, res_t, 0.8, seed=SEED, stream=producer.cuda_stream)
    with torch.cuda.stream(consumer):
        got = torch.from_dlpack(arr).clone()  # on `consumer`: must wait for `producer`
    consumer.synchronize()
    assert_bits_equal(to_numpy(got), reference.forward(sc, res, 0.8, seed=SEED))
