"""Pure-Python DLPack producers and a consumer for the binding tests, so that they need no torch.

- `NumpyDLPack(a)`: NumPy's own `__dlpack__` (versioned capsules, the read-only flag) behind an
  object that is not an ndarray, so that the binding takes its DLPack path.
- `CtypesDLPack(a, device_type=...)`: a legacy capsule built with ctypes over a NumPy buffer. It
  can claim any device (a CUDA one over host memory, to test rejection without touching the
  data), any dtype (bfloat16, which NumPy cannot export; integers, bool, complex) and the
  array's strides, and it counts its capsules (`exports`) and the calls of its deleter
  (`deletes`): a consumer must release each capsule it consumed exactly once.
- `from_dlpack(x)`: a zero-copy consumer of a CPU producer (bfloat16 included) that returns a
  NumPy array keeping the producer's tensor alive, and releases it when the array dies.
"""

from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np

kDLCPU, kDLCUDA, kDLCUDAHost = 1, 2, 3
kDLInt, kDLUInt, kDLFloat, kDLBfloat, kDLComplex, kDLBool = 0, 1, 2, 4, 5, 6
BF16 = np.dtype(ml_dtypes.bfloat16)


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", DELETER),
]

_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_SetName.restype = ctypes.c_int
_api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
# A capsule keeps the pointer to its name, not a copy: these buffers live as long as the module.
_NAME = ctypes.create_string_buffer(b"dltensor")
_USED_NAME = ctypes.create_string_buffer(b"used_dltensor")


def _call_deleter(address):
    managed = DLManagedTensor.from_address(address)
    if managed.deleter:
        managed.deleter(ctypes.cast(address, ctypes.POINTER(DLManagedTensor)))


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule):
    # DLPack: a capsule dropped unconsumed frees its tensor; a consumed one was renamed and is
    # the consumer's to free.
    if _api.PyCapsule_IsValid(capsule, _NAME):
        _call_deleter(_api.PyCapsule_GetPointer(capsule, _NAME))


# CtypesDLPack objects with capsules not yet released: their memory must outlive the consumers.
_LIVE = {}


@DELETER
def _producer_deleter(managed):
    address = ctypes.addressof(managed.contents)
    producer, pending = _LIVE[address]
    producer.deletes += 1
    if pending == 1:
        del _LIVE[address]
    else:
        _LIVE[address] = (producer, pending - 1)


def dl_dtype(dtype):
    """The DLPack (code, bits, lanes) of a NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return (kDLBfloat, 16, 1)
    code = {"i": kDLInt, "u": kDLUInt, "f": kDLFloat, "c": kDLComplex, "b": kDLBool}[dtype.kind]
    return (code, dtype.itemsize * 8, 1)


def numpy_dtype(code, bits, lanes):
    """The NumPy dtype of a DLPack (code, bits, lanes)."""
    assert lanes == 1, lanes
    if (code, bits) == (kDLBfloat, 16):
        return BF16
    kind = {kDLInt: "i", kDLUInt: "u", kDLFloat: "f", kDLComplex: "c", kDLBool: "b"}[code]
    return np.dtype("?" if kind == "b" else f"{kind}{bits // 8}")


class NumpyDLPack:
    """NumPy's own DLPack export of `a`, in an object that the binding cannot see as an ndarray."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class CtypesDLPack:
    """A DLPack producer (legacy, unversioned capsule) over the buffer of the NumPy array `host`
    that reports `device_type`. It counts its capsules (`exports`) and the calls of its deleter
    (`deletes`), and stays alive until every capsule it handed out is released."""

    def __init__(self, host, device_type=kDLCPU, device_id=0):
        itemsize = host.dtype.itemsize
        assert all(s % itemsize == 0 for s in host.strides), "strides must be whole elements"
        self.host = host
        self.device = (device_type, device_id)
        self.exports = 0
        self.deletes = 0
        ndim = max(host.ndim, 1)
        self._shape = (ctypes.c_int64 * ndim)(*host.shape)
        self._strides = (ctypes.c_int64 * ndim)(*(s // itemsize for s in host.strides))
        self._mt = DLManagedTensor()
        t = self._mt.dl_tensor
        t.data = host.ctypes.data
        t.device = DLDevice(device_type, device_id)
        t.ndim = host.ndim
        t.dtype = DLDataType(*dl_dtype(host.dtype))
        t.shape = self._shape
        t.strides = None if host.flags.c_contiguous else self._strides
        t.byte_offset = 0
        self._mt.deleter = _producer_deleter

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.exports += 1
        address = ctypes.addressof(self._mt)
        _LIVE[address] = (self, _LIVE.get(address, (self, 0))[1] + 1)
        return _api.PyCapsule_New(address, _NAME,
                                  ctypes.cast(_capsule_destructor, ctypes.c_void_p))

    def __dlpack_device__(self):
        return self.device


class _Release:
    """Calls a consumed tensor's deleter when the last NumPy view of it is gone."""

    def __init__(self, address):
        self.address = address

    def __del__(self):
        _call_deleter(self.address)


def from_dlpack(x):
    """A NumPy array over the memory of the CPU DLPack producer `x`, without a copy (bfloat16
    included). It owns the consumed tensor and calls its deleter when it dies."""
    cap = x.__dlpack__()
    capsule = ctypes.c_void_p(id(cap))
    if not _api.PyCapsule_IsValid(capsule, _NAME):
        raise ValueError("not an unconsumed legacy DLPack capsule")
    address = _api.PyCapsule_GetPointer(capsule, _NAME)
    _api.PyCapsule_SetName(cap, _USED_NAME)  # consumed: the capsule no longer frees it
    release = _Release(address)
    t = DLManagedTensor.from_address(address).dl_tensor
    assert t.device.device_type in (kDLCPU, kDLCUDAHost), t.device.device_type
    dtype = numpy_dtype(t.dtype.code, t.dtype.bits, t.dtype.lanes)
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides:
        strides = tuple(t.strides[i] * dtype.itemsize for i in range(t.ndim))
    else:
        strides = tuple(s * dtype.itemsize for s in np.empty(shape, np.uint8).strides)
    if 0 in shape:
        return np.empty(shape, dtype)
    span = dtype.itemsize * (1 + sum((n - 1) * s for n, s in zip(shape, strides)))
    buf = (ctypes.c_char * span).from_address(t.data + t.byte_offset)
    buf.release = release  # the buffer keeps the tensor, each array view keeps the buffer
    return np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)
