"""The Python boundary with torch tensors: torch dtypes and layouts rejected, a real CUDA/CPU
device mismatch, and DLPack round trips of torch CPU tensors (no copies; bfloat16 included).
Every test here needs torch, and only these: the argument checks and the DLPack round trips
without torch are in tests/test_bindings.py, test_bindings_arrays.py and test_bindings_dlpack.py.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from sd_dlpack import kDLCPU
from sd_testutil import BF16, DTYPES, F16, F32, F64, assert_bits_equal, bwd, fwd, random_array

import stochdepth
from stochdepth import reference

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("ieee_overflow_ok")]


@pytest.mark.parametrize("bad", [torch.int32, torch.int64, torch.bool, torch.complex64,
                                 torch.uint8])
def test_unsupported_torch_dtypes(bad):
    x = torch.ones((4, 3), dtype=bad)
    with pytest.raises(TypeError, match="residual"):
        fwd(None, x)
    with pytest.raises(TypeError, match="grad_out"):
        bwd(x)


def test_noncontiguous_torch_tensor():
    t = torch.ones((4, 5)).t()
    with pytest.raises(ValueError, match="residual"):
        fwd(None, t)


@pytest.mark.cuda
def test_real_device_mismatch_torch():
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    sc = torch.ones((4, 5), device="cuda")
    res = torch.ones((4, 5))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res)


# ---- DLPack round trips (torch CPU tensors)

TORCH_DTYPES = {F16: torch.float16, BF16: torch.bfloat16, F32: torch.float32, F64: torch.float64}
TORCH_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
NP_INT_VIEW = {2: np.int16, 4: np.int32, 8: np.int64}


def to_torch(a):
    """A torch CPU tensor with exactly the bits of the NumPy array `a` (bf16 included)."""
    t = torch.from_numpy(np.ascontiguousarray(a).view(NP_INT_VIEW[a.dtype.itemsize]).copy())
    return t.view(TORCH_DTYPES[a.dtype])


def to_numpy(t, dtype):
    """The bits of a torch CPU tensor as a NumPy array of `dtype` (bf16 through ml_dtypes)."""
    return t.view(TORCH_INT_VIEW[t.element_size()]).numpy().view(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "f32", "f64"])
def test_torch_in_array_out_no_copy(dtype):
    rng = np.random.default_rng(21)
    sc, res = random_array(rng, (33, 7), dtype), random_array(rng, (33, 7), dtype)
    want = reference.forward(sc, res, 0.6, seed=5, offset=2, scaling="training")
    out = stochdepth.forward(to_torch(sc), to_torch(res), 0.6, seed=5, offset=2, scaling="training")
    assert isinstance(out, stochdepth.Array)
    assert tuple(out.shape) == (33, 7)
    assert hasattr(out, "__dlpack__") and hasattr(out, "__dlpack_device__")
    assert tuple(out.__dlpack_device__()) == (kDLCPU, 0)
    t1 = torch.from_dlpack(out)
    t2 = torch.from_dlpack(out)
    assert t1.dtype == TORCH_DTYPES[dtype] and tuple(t1.shape) == (33, 7)
    assert t1.data_ptr() == t2.data_ptr(), "two from_dlpack calls must see the same buffer"
    if dtype != BF16:
        n = np.from_dlpack(out)
        assert n.ctypes.data == t1.data_ptr()
        assert_bits_equal(n, want)
    assert_bits_equal(to_numpy(t1, dtype), want)
    # the consumers keep the buffer alive after the producer is gone
    del out, t2
    gc.collect()
    junk = [np.full((33, 7), 7.0, F32) for _ in range(10)]  # reuse freed memory, if any
    assert_bits_equal(to_numpy(t1, dtype), want)
    del junk


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "f32", "f64"])
def test_torch_single_input_and_backward(dtype):
    rng = np.random.default_rng(22)
    res = random_array(rng, (2, 33, 9), dtype)
    kw = dict(seed=2**64 - 1, offset=2**40, axis=1, scaling="training", mode="row")
    out = stochdepth.forward(None, to_torch(res), 0.3, **kw)
    assert_bits_equal(to_numpy(torch.from_dlpack(out), dtype),
                      reference.forward(None, res, 0.3, **kw))
    g = to_torch(res)
    gs, gr = stochdepth.backward(g, 0.3, **kw)
    assert gs is g
    assert isinstance(gr, stochdepth.Array)
    assert_bits_equal(to_numpy(torch.from_dlpack(gr), dtype), reference.backward(res, 0.3, **kw)[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16", "f32", "f64"])
def test_torch_out_and_in_place(dtype):
    rng = np.random.default_rng(23)
    sc, res = random_array(rng, (33, 5), dtype), random_array(rng, (33, 5), dtype)
    want = reference.forward(sc, res, 0.5, seed=3)
    out_t = torch.empty((33, 5), dtype=TORCH_DTYPES[dtype])
    ret = stochdepth.forward(to_torch(sc), to_torch(res), 0.5, seed=3, out=out_t)
    assert ret is out_t
    assert_bits_equal(to_numpy(out_t, dtype), want)
    sc_t = to_torch(sc)
    ptr = sc_t.data_ptr()
    ret = stochdepth.forward(sc_t, to_torch(res), 0.5, seed=3, out=sc_t)
    assert ret is sc_t and sc_t.data_ptr() == ptr
    assert_bits_equal(to_numpy(sc_t, dtype), want)
    g_out = torch.empty((33, 5), dtype=TORCH_DTYPES[dtype])
    _, gr = stochdepth.backward(to_torch(res), 0.5, seed=3, out=g_out)
    assert gr is g_out
    assert_bits_equal(to_numpy(g_out, dtype), reference.backward(res, 0.5, seed=3)[1])


def test_torch_bf16_round_trip_through_numpy_result():
    """bf16 torch in -> Array -> torch: dtype, shape and bits survive; a NumPy bf16 input gives
    the same bits as the torch one."""
    rng = np.random.default_rng(24)
    sc, res = random_array(rng, (8, 16), BF16), random_array(rng, (8, 16), BF16)
    via_torch = torch.from_dlpack(stochdepth.forward(to_torch(sc), to_torch(res), 0.7, seed=8))
    via_numpy = stochdepth.forward(sc, res, 0.7, seed=8)
    assert via_torch.dtype == torch.bfloat16
    assert_bits_equal(to_numpy(via_torch, BF16), via_numpy)
    # and back in again: the Array is itself a DLPack producer that the library accepts
    again = stochdepth.forward(None, stochdepth.forward(None, to_torch(res), 1.0, seed=0), 1.0,
                               seed=0)
    assert_bits_equal(to_numpy(torch.from_dlpack(again), BF16), res)
