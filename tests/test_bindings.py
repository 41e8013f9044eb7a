"""The Python boundary: one test per bad input of DESIGN.md's list (exception type AND a message
that names the argument), and DLPack round trips with torch CPU tensors (no copies).

CUDA cases use a hand-made DLPack capsule that claims a CUDA device over host memory: a build
without CUDA (or a process without a GPU) must reject it before touching the data. On a machine
with a CUDA device those tests skip (the data would really be read as device memory there);
tests/test_drop_path_cuda.py covers real device arrays.
"""

from __future__ import annotations

import ctypes
import gc

import numpy as np
import pytest
from sd_testutil import (
    BF16,
    DTYPES,
    F16,
    F32,
    F64,
    HAS_CUDA_DEVICE,
    assert_bits_equal,
    random_array,
)

import stochdepth
from stochdepth import reference

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


def fwd(shortcut, residual, p=0.5, **kw):
    kw.setdefault("seed", 1)
    return stochdepth.forward(shortcut, residual, p, **kw)


def bwd(grad_out, p=0.5, **kw):
    kw.setdefault("seed", 1)
    return stochdepth.backward(grad_out, p, **kw)


def arrays(shape=(4, 5), dtype=F32):
    rng = np.random.default_rng(0)
    return (random_array(rng, shape, dtype, special=False),
            random_array(rng, shape, dtype, special=False))


# ---- a DLPack capsule that claims to live on a CUDA device (host memory underneath)

kDLCPU, kDLCUDA = 1, 2


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _DELETER),
]
_NOOP_DELETER = _DELETER(lambda _: None)
_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeDeviceArray:
    """A DLPack producer (legacy, unversioned capsule) over a NumPy buffer that reports
    `device_type`. It owns everything the capsule points to, and its deleter does nothing."""

    def __init__(self, host, device_type=kDLCUDA, device_id=0):
        assert host.flags.c_contiguous and host.dtype == F32
        self.host = host
        self.device = (device_type, device_id)
        self._shape = (ctypes.c_int64 * max(host.ndim, 1))(*host.shape)
        self._mt = _DLManagedTensor()
        t = self._mt.dl_tensor
        t.data = host.ctypes.data
        t.device = _DLDevice(device_type, device_id)
        t.ndim = host.ndim
        t.dtype = _DLDataType(2, 32, 1)  # kDLFloat, 32 bits
        t.shape = self._shape
        t.strides = None
        t.byte_offset = 0
        self._mt.deleter = _NOOP_DELETER

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return _PyCapsule_New(ctypes.addressof(self._mt), b"dltensor", None)

    def __dlpack_device__(self):
        return self.device


def test_fake_device_array_is_a_valid_producer():
    """Sanity check of the helper itself: as a CPU capsule NumPy takes it without a copy."""
    host = np.arange(6, dtype=F32).reshape(2, 3)
    fake = FakeDeviceArray(host, device_type=kDLCPU)
    back = np.from_dlpack(fake)
    np.testing.assert_array_equal(back, host)
    assert back.ctypes.data == host.ctypes.data


# ---- Types


def test_dtype_mismatch():
    sc, res = arrays()
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(sc, res.astype(F64))
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(sc.astype(F16), res.astype(BF16))


BAD_DTYPES = [np.int8, np.int32, np.int64, np.uint8, np.uint64, np.bool_, np.complex64,
              np.complex128, np.longdouble, object]


@pytest.mark.parametrize("bad", BAD_DTYPES, ids=lambda d: np.dtype(d).name)
def test_unsupported_dtypes(bad):
    if np.dtype(bad) == np.dtype(np.float64):  # longdouble is float64 on some platforms
        pytest.skip("longdouble is float64 here")
    x = np.ones((4, 3), dtype=bad)
    with pytest.raises(TypeError, match="residual"):
        fwd(None, x)
    with pytest.raises(TypeError, match="shortcut|residual"):
        fwd(x, x.copy())
    with pytest.raises(TypeError, match="grad_out"):
        bwd(x)


@pytest.mark.parametrize("bad", [torch.int32, torch.int64, torch.bool, torch.complex64,
                                 torch.uint8])
def test_unsupported_torch_dtypes(bad):
    x = torch.ones((4, 3), dtype=bad)
    with pytest.raises(TypeError, match="residual"):
        fwd(None, x)
    with pytest.raises(TypeError, match="grad_out"):
        bwd(x)


@pytest.mark.parametrize("bad", [None, "0.5", [0.5], 0.5j, object()], ids=repr)
def test_survival_prob_not_a_number(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="survival_prob"):
        fwd(sc, res, bad)
    with pytest.raises(TypeError, match="survival_prob"):
        bwd(res, bad)
    with pytest.raises(TypeError, match="survival_prob"):
        stochdepth.mask(4, bad, seed=1)


@pytest.mark.parametrize("bad", [-0.1, -1e-300, 1.0000001, 2, float("inf"), -float("inf"),
                                 float("nan"), np.float32("nan")], ids=repr)
def test_survival_prob_out_of_range(bad):
    sc, res = arrays()
    with pytest.raises(ValueError, match="survival_prob"):
        fwd(sc, res, bad)
    with pytest.raises(ValueError, match="survival_prob"):
        bwd(res, bad)
    with pytest.raises(ValueError, match="survival_prob"):
        stochdepth.mask(4, bad, seed=1)
    with pytest.raises(ValueError, match="survival_prob"):
        fwd(sc, res, bad, training=False, seed=None)


@pytest.mark.parametrize("bad", [2**2000, -(2**2000), 2**64], ids=["2**2000", "-2**2000", "2**64"])
def test_survival_prob_huge_integer(bad):
    """Integers beyond float range are out of [0, 1] (ValueError), not a cast failure."""
    sc, res = arrays()
    with pytest.raises(ValueError, match="survival_prob"):
        fwd(sc, res, bad)
    with pytest.raises(ValueError, match="survival_prob"):
        stochdepth.mask(4, bad, seed=1)


@pytest.mark.parametrize("good", [0, 1, 0.0, 1.0, np.float32(0.25), np.float64(0.75), np.int64(1)],
                         ids=repr)
def test_survival_prob_accepted_forms(good):
    sc, res = arrays()
    want = reference.forward(sc, res, float(good), seed=1)
    assert_bits_equal(fwd(sc, res, good), want)


# ---- seed / offset / mode / scaling / training / stream


def test_seed_missing():
    sc, res = arrays()
    with pytest.raises(TypeError, match="seed"):
        stochdepth.forward(sc, res, 0.5)
    with pytest.raises(TypeError, match="seed"):
        stochdepth.backward(res, 0.5)
    with pytest.raises(TypeError, match="seed"):
        stochdepth.mask(4, 0.5)


def test_seed_none_only_at_inference():
    sc, res = arrays()
    with pytest.raises((TypeError, ValueError), match="seed"):
        fwd(sc, res, seed=None)
    with pytest.raises((TypeError, ValueError), match="seed"):
        bwd(res, seed=None)
    want = reference.forward(sc, res, 0.5, training=False)
    assert_bits_equal(fwd(sc, res, seed=None, training=False), want)
    assert_bits_equal(bwd(res, seed=None, training=False)[1],
                      reference.backward(res, 0.5, training=False)[1])


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("bad", [-1, -(2**63), 2**64, 2**64 + 1, 2**200], ids=repr)
def test_seed_offset_out_of_range(name, bad):
    sc, res = arrays()
    with pytest.raises(ValueError, match=name):
        fwd(sc, res, **{name: bad})
    with pytest.raises(ValueError, match=name):
        bwd(res, **{name: bad})
    with pytest.raises(ValueError, match=name):
        stochdepth.mask(4, 0.5, **{"seed": 1, name: bad})


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("bad", [1.0, 2.5, "3", True, np.float64(1.0), [1]], ids=repr)
def test_seed_offset_wrong_type(name, bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match=name):
        fwd(sc, res, **{name: bad})
    with pytest.raises(TypeError, match=name):
        bwd(res, **{name: bad})


def test_offset_none_is_rejected():
    sc, res = arrays()
    with pytest.raises(TypeError, match="offset"):
        fwd(sc, res, offset=None)


@pytest.mark.parametrize("good", [0, 2**64 - 1, np.uint64(2**64 - 1), np.int64(7), np.uint32(9)],
                         ids=repr)
def test_seed_offset_accepted_forms(good):
    sc, res = arrays((9, 3))
    want = reference.forward(sc, res, 0.5, seed=int(good), offset=int(good))
    assert_bits_equal(fwd(sc, res, seed=good, offset=good), want)
    np.testing.assert_array_equal(stochdepth.mask(9, 0.5, seed=good, offset=good),
                                  reference.mask(9, 0.5, seed=int(good), offset=int(good)))


@pytest.mark.parametrize("name, bad", [("mode", "rows"), ("mode", "ROW"), ("mode", ""),
                                       ("mode", "sample"), ("scaling", "train"),
                                       ("scaling", "Inference"), ("scaling", "timm")])
def test_bad_mode_or_scaling_string(name, bad):
    sc, res = arrays()
    with pytest.raises(ValueError, match=name):
        fwd(sc, res, **{name: bad})
    with pytest.raises(ValueError, match=name):
        bwd(res, **{name: bad})
    if name == "mode":
        with pytest.raises(ValueError, match=name):
            stochdepth.mask(4, 0.5, seed=1, mode=bad)


@pytest.mark.parametrize("name", ["mode", "scaling"])
@pytest.mark.parametrize("bad", [None, 1, b"row"], ids=repr)
def test_mode_or_scaling_not_a_string(name, bad):
    sc, res = arrays()
    with pytest.raises((TypeError, ValueError), match=name):
        fwd(sc, res, **{name: bad})


@pytest.mark.parametrize("bad", ["yes", None, 2, 0.5], ids=repr)
def test_training_not_a_bool(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="training"):
        fwd(sc, res, training=bad)


@pytest.mark.parametrize("bad", ["0", 1.5, object()], ids=repr)
def test_stream_wrong_type(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="stream"):
        fwd(sc, res, stream=bad)


@pytest.mark.parametrize("bad", [2**64, 2**70, -(2**64)], ids=repr)
def test_stream_out_of_range(bad):
    sc, res = arrays()
    with pytest.raises((TypeError, ValueError), match="stream"):
        fwd(sc, res, stream=bad)


# ---- Shapes


def test_shape_mismatch():
    sc, _ = arrays((4, 5))
    _, res = arrays((4, 6))
    with pytest.raises(ValueError, match="shape"):
        fwd(sc, res)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res.reshape(4, 6, 1)[:, :5])  # different rank


def test_same_size_different_shape_is_a_mismatch():
    sc, res = arrays((4, 6))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res.reshape(6, 4))


def test_rank0():
    x = np.array(1.0, F32)
    with pytest.raises(ValueError, match="residual|shortcut"):
        fwd(x, x.copy())
    with pytest.raises(ValueError, match="residual"):
        fwd(None, x)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(x)


@pytest.mark.parametrize("shape, bad", [((4,), 1), ((4,), -2), ((4, 5), 2), ((4, 5), -3),
                                        ((2, 3, 4, 5), 4), ((2, 3, 4, 5), -5),
                                        ((4, 5), 2**62), ((4, 5), -(2**62))])
def test_axis_out_of_range(shape, bad):
    sc, res = arrays(shape)
    with pytest.raises(ValueError, match="axis"):
        fwd(sc, res, axis=bad)
    with pytest.raises(ValueError, match="axis"):
        bwd(res, axis=bad)


@pytest.mark.parametrize("bad", [2**63, 2**64, -(2**63) - 1, 2**100], ids=repr)
def test_axis_beyond_int64(bad):
    """An axis too large for int64 is still 'out of range', not an overflow or cast error."""
    sc, res = arrays()
    with pytest.raises(ValueError, match="axis"):
        fwd(sc, res, axis=bad)


@pytest.mark.parametrize("bad", [1.0, "0", None, True], ids=repr)
def test_axis_wrong_type(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="axis"):
        fwd(sc, res, axis=bad)


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, "abc", None, object()], ids=repr)
def test_residual_not_an_array(bad):
    with pytest.raises(TypeError, match="residual"):
        fwd(None, bad)
    with pytest.raises(TypeError, match="grad_out"):
        bwd(bad)
    if bad is not None:
        sc, _ = arrays((2,))
        with pytest.raises(TypeError, match="residual"):
            fwd(sc, bad)


def test_shortcut_not_an_array():
    _, res = arrays((2,))
    with pytest.raises(TypeError, match="shortcut"):
        fwd([1.0, 2.0], res)


# ---- Layout


def _noncontiguous(arr):
    return {"every-other-column": np.ascontiguousarray(np.concatenate([arr, arr], 1))[:, ::2],
            "transpose": np.ascontiguousarray(arr.T).T}


@pytest.mark.parametrize("kind", ["every-other-column", "transpose"])
def test_noncontiguous_inputs(kind):
    sc, res = arrays((4, 5))
    bad_sc, bad_res = _noncontiguous(sc)[kind], _noncontiguous(res)[kind]
    assert not bad_sc.flags.c_contiguous
    with pytest.raises(ValueError, match="shortcut"):
        fwd(bad_sc, res)
    with pytest.raises(ValueError, match="residual"):
        fwd(sc, bad_res)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, bad_res)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(bad_res)
    with pytest.raises(ValueError, match="contiguous"):
        fwd(sc, bad_res)


def test_noncontiguous_out():
    sc, res = arrays((4, 5))
    out = _noncontiguous(np.empty_like(sc))["transpose"]
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=out)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=out)


def test_noncontiguous_torch_tensor():
    t = torch.ones((4, 5)).t()
    with pytest.raises(ValueError, match="residual"):
        fwd(None, t)


def test_item_misaligned_buffer_is_rejected_or_correct():
    """A float32 array starting 1 byte into its buffer: either computed correctly or a
    ValueError naming the argument (never a crash or a wrong answer)."""
    sc, res = arrays((4, 5))
    raw = np.zeros(res.nbytes + 1, np.uint8)
    odd = raw[1:].view(F32).reshape(res.shape)
    odd[...] = res
    try:
        got = fwd(sc, odd)
    except ValueError as e:
        assert "residual" in str(e)
    else:
        assert_bits_equal(got, reference.forward(sc, res, 0.5, seed=1))


# ---- out=


def test_out_read_only():
    sc, res = arrays()
    out = np.empty_like(sc)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=out)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=out)
    ro = sc.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        fwd(ro, res, out=ro)


def test_read_only_inputs_are_fine():
    sc, res = arrays()
    sc.setflags(write=False)
    res.setflags(write=False)
    assert_bits_equal(fwd(sc, res), reference.forward(sc, res, 0.5, seed=1))
    assert_bits_equal(bwd(res)[1], reference.backward(res, 0.5, seed=1)[1])


def test_out_wrong_shape():
    sc, res = arrays((4, 5))
    for shape in [(4, 6), (5, 4), (20,), (4, 5, 1)]:
        with pytest.raises(ValueError, match="out"):
            fwd(sc, res, out=np.empty(shape, F32))
        with pytest.raises(ValueError, match="out"):
            bwd(res, out=np.empty(shape, F32))


def test_out_wrong_dtype():
    sc, res = arrays((4, 5))
    for dt in (F64, F16, BF16, np.int32):
        with pytest.raises(TypeError, match="out"):
            fwd(sc, res, out=np.empty((4, 5), dt))
        with pytest.raises(TypeError, match="out"):
            bwd(res, out=np.empty((4, 5), dt))


def test_out_not_an_array():
    sc, res = arrays((4, 5))
    with pytest.raises(TypeError, match="out"):
        fwd(sc, res, out=[0.0] * 20)


def test_out_overlapping_residual():
    sc, res = arrays((4, 5))
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=res)
    with pytest.raises(ValueError, match="out"):
        fwd(None, res, out=res)
    buf = np.zeros(21, F32)
    r, o = buf[:20].reshape(4, 5), buf[1:].reshape(4, 5)
    with pytest.raises(ValueError, match="out"):
        fwd(sc, r, out=o)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=res)
    with pytest.raises(ValueError, match="out"):
        bwd(r, out=o)


def test_out_partially_overlapping_shortcut():
    _, res = arrays((4, 5))
    buf = np.zeros(21, F32)
    s, o = buf[:20].reshape(4, 5), buf[1:].reshape(4, 5)
    with pytest.raises(ValueError, match="out"):
        fwd(s, res, out=o)
    # a reshaped view of the same memory at the same address is in place, not partial overlap
    s = np.zeros((4, 5), F32)
    want = reference.forward(s, res, 0.5, seed=1)
    assert fwd(s, res, out=s) is s
    assert_bits_equal(s, want)


def test_shortcut_and_residual_may_alias():
    """Inputs may share memory with each other (only `out` must not overlap them)."""
    _, res = arrays((4, 5))
    want = reference.forward(res, res, 0.5, seed=1)
    assert_bits_equal(fwd(res, res), want)


# ---- Device


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="the fake CUDA capsule would be dereferenced on a GPU")
def test_cuda_array_without_cuda():
    host = np.ones((4, 5), F32)
    fake = FakeDeviceArray(host)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, fake)
    with pytest.raises(ValueError, match="CUDA"):
        fwd(None, fake)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(fake)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(fake, FakeDeviceArray(host.copy()))
    assert (host == 1).all()


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="the fake CUDA capsule would be dereferenced on a GPU")
def test_device_mismatch():
    sc, res = arrays((4, 5))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, FakeDeviceArray(res))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(FakeDeviceArray(sc), res)
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=FakeDeviceArray(np.empty_like(sc)))
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=FakeDeviceArray(np.empty_like(sc)))


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="the fake CUDA capsule would be dereferenced on a GPU")
def test_cuda_ordinal_out_of_range():
    host = np.ones((4, 5), F32)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, FakeDeviceArray(host, device_id=7))


@pytest.mark.cuda
def test_real_device_mismatch_torch():
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    sc = torch.ones((4, 5), device="cuda")
    res = torch.ones((4, 5))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res)


@pytest.mark.parametrize("device_type", [4, 7, 14], ids=["opencl", "vulkan", "oneapi"])
def test_unsupported_device_types(device_type):
    host = np.ones((4, 5), F32)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, FakeDeviceArray(host, device_type=device_type))


def test_cuda_host_pinned_memory_is_cpu_memory():
    """kDLCUDAHost (pinned host memory) is readable by the CPU kernels."""
    rng = np.random.default_rng(27)
    sc, res = random_array(rng, (6, 4), F32), random_array(rng, (6, 4), F32)
    got = fwd(FakeDeviceArray(sc.copy(), device_type=3), FakeDeviceArray(res.copy(), device_type=3))
    assert_bits_equal(np.from_dlpack(got), reference.forward(sc, res, 0.5, seed=1))


# ---- the mask() entry point


def test_mask_bad_batch():
    for bad in (-1, -(2**63), 2**63, 2**64, 2**100):
        with pytest.raises(ValueError, match="batch"):
            stochdepth.mask(bad, 0.5, seed=1)
    for bad in (2.0, "3", None, True):
        with pytest.raises(TypeError, match="batch"):
            stochdepth.mask(bad, 0.5, seed=1)


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


def test_array_as_input_and_out():
    """A stochdepth.Array is a valid input and a valid out= buffer."""
    rng = np.random.default_rng(25)
    sc, res = random_array(rng, (6, 4), F32), random_array(rng, (6, 4), F32)
    a_sc = stochdepth.forward(None, to_torch(sc), 1.0, seed=0)  # an Array holding sc's values
    a_res = stochdepth.forward(None, to_torch(res), 1.0, seed=0)
    got = stochdepth.forward(a_sc, a_res, 0.5, seed=4)
    assert isinstance(got, stochdepth.Array)
    want = reference.forward(sc, res, 0.5, seed=4)
    assert_bits_equal(np.from_dlpack(got), want)
    assert stochdepth.forward(a_sc, a_res, 0.5, seed=4, out=a_sc) is a_sc
    assert_bits_equal(np.from_dlpack(a_sc), want)


def test_generic_dlpack_producer():
    """Any object with __dlpack__/__dlpack_device__ works, not just torch tensors."""
    rng = np.random.default_rng(26)
    sc, res = random_array(rng, (5, 3), F32), random_array(rng, (5, 3), F32)
    got = stochdepth.forward(FakeDeviceArray(sc.copy(), kDLCPU),
                             FakeDeviceArray(res.copy(), kDLCPU), 0.5, seed=6)
    assert isinstance(got, stochdepth.Array)
    assert_bits_equal(np.from_dlpack(got), reference.forward(sc, res, 0.5, seed=6))


def test_numpy_in_numpy_out():
    sc, res = arrays()
    assert type(fwd(sc, res)) is np.ndarray
    assert type(fwd(None, res)) is np.ndarray
    assert type(bwd(res)[1]) is np.ndarray
    assert fwd(sc, res).flags.c_contiguous and fwd(sc, res).flags.writeable
