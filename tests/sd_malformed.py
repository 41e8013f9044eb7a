"""Malformed DLPack producers for the fuzz in test_reliability_dlpack.py, and its runner.

`Raw(**fields)` is a producer whose every DLTensor field can lie: the data pointer (NULL), the
rank, the shape and strides arrays (NULL, negative, overflowing), the dtype, the device, the
capsule's kind (legacy, versioned with any version and flags, a wrong name, not a capsule) and
the deleter (counting, or NULL). `CASES` holds the cases by class, each with the exception the
library must raise (None: it must be accepted) and a fragment of its message.

Run as a script (`python sd_malformed.py CLASS`) it tries every case of CLASS in this process and
prints one JSON line per case: what was raised, the message, and how many capsules were made and
released. The test runs one subprocess per class, so that a crash fails one class, not the suite.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys

import numpy as np

# The DLPack structures and the capsule API, as the well-formed producers of sd_dlpack use them.
from sd_dlpack import DLDataType, DLDevice, DLTensor, _api


class Managed(ctypes.Structure):
    pass


class ManagedV(ctypes.Structure):
    pass


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
Managed._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                    ("deleter", DELETER)]
ManagedV._fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32),
                     ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER),
                     ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]

NAMES = {k: ctypes.create_string_buffer(k.encode()) for k in
         ("dltensor", "dltensor_versioned", "used_dltensor", "something_else")}
_LIVE = {}  # address -> producer, while a capsule of it is unreleased


def _release(address):
    producer = _LIVE.pop(address, None)
    if producer is not None:
        producer.deletes += 1
    else:  # a second call for the same tensor: counted on every producer that could own it
        for p in Raw.instances:
            if p.address == address:
                p.deletes += 1


@DELETER
def _deleter(address):
    _release(address)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _destructor(capsule):
    for name in ("dltensor", "dltensor_versioned"):
        if _api.PyCapsule_IsValid(capsule, NAMES[name]):
            address = _api.PyCapsule_GetPointer(capsule, NAMES[name])
            _release(address)


class Raw:
    """A producer over `host` (a NumPy array) whose DLTensor fields are overridden by `fields`:
    data (int or 0), ndim, shape (list or None), strides (list or None), dtype (code, bits,
    lanes), device (type, id), byte_offset; `capsule` is "legacy", "versioned", "wrong-name",
    "used" or "not-a-capsule"; `version`, `flags` for versioned ones; `deleter=False` leaves it
    NULL; `dev` overrides what __dlpack_device__ returns; `raises` makes __dlpack__ raise it."""

    instances = []

    def __init__(self, host=None, **f):
        host = np.ones((4, 3), np.float32) if host is None else host
        self.host, self.f = host, f
        self.exports = self.deletes = 0
        Raw.instances.append(self)
        shape = f.get("shape", list(host.shape))
        strides = f.get("strides")
        self._shape = (ctypes.c_int64 * max(len(shape or []), 1))(*(shape or []))
        self._strides = (ctypes.c_int64 * max(len(strides or []), 1))(*(strides or []))
        self.versioned = f.get("capsule") == "versioned"
        self._m = ManagedV() if self.versioned else Managed()
        t = self._m.dl_tensor
        t.data = f.get("data", host.ctypes.data)
        t.device = DLDevice(*f.get("device", (1, 0)))
        t.ndim = f.get("ndim", len(shape or []))
        t.dtype = DLDataType(*f.get("dtype", (2, 32, 1)))
        t.shape = self._shape if shape is not None else None
        t.strides = self._strides if strides is not None else None
        t.byte_offset = f.get("byte_offset", 0)
        if f.get("deleter", True):
            self._m.deleter = _deleter
        if self.versioned:
            self._m.major, self._m.minor = f.get("version", (1, 0))
            self._m.flags = f.get("flags", 0)
        self.address = ctypes.addressof(self._m)

    def __dlpack_device__(self):
        return self.f.get("dev", self.f.get("device", (1, 0)))

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if "raises" in self.f:
            raise self.f["raises"]
        kind = self.f.get("capsule", "legacy")
        if kind == "not-a-capsule":
            return object()
        self.exports += 1
        if self.f.get("deleter", True):
            _LIVE[self.address] = self
        name = {"legacy": "dltensor", "versioned": "dltensor_versioned",
                "wrong-name": "something_else", "used": "used_dltensor"}[kind]
        # Only a capsule named like a live tensor frees it when dropped: then a refused,
        # unconsumed capsule still counts as released.
        if kind in ("wrong-name", "used"):
            _LIVE.pop(self.address, None)
            self.exports -= 1  # not an export a consumer may take
        return _api.PyCapsule_New(self.address, NAMES[name],
                                  ctypes.cast(_destructor, ctypes.c_void_p))


F32 = (2, 32, 1)
class LyingShape(Raw):
    """A DLPack producer whose `.shape` says (2,), whatever its export holds: the `seed=` words
    form must be decided from the exported tensor (tests/test_reliability_words.py)."""

    shape = (2,)


class LyingArray(np.ndarray):
    """A NumPy array whose `.shape` says (2,), whatever it holds."""

    @property
    def shape(self):
        return (2,)


BIG = 2**32
# (id, producer fields, role, expected exception or None, message fragment)
CASES = {
    "shapes": [
        ("negative-dim", {"shape": [4, -4]}, "residual", "ValueError", "dimensions >= 0"),
        ("negative-first", {"shape": [-1, 4]}, "residual", "ValueError", "dimensions >= 0"),
        ("overflow-2**32-squared", {"shape": [BIG, BIG]}, "residual", "ValueError",
         "more than 2**63 bytes"),
        ("overflow-bytes", {"shape": [2**61, 4]}, "residual", "ValueError", "2**63 bytes"),
        ("overflow-int64-max", {"shape": [2**63 - 1, 2]}, "residual", "ValueError", "2**63"),
        ("null-data", {"data": 0}, "residual", "ValueError", "NULL data pointer"),
        ("null-data-as-out", {"data": 0}, "out", "ValueError", "NULL data pointer"),
        ("null-data-empty-ok", {"data": 0, "shape": [0, 3]}, "residual", None, ""),
        ("null-data-huge-empty-ok", {"data": 0, "shape": [0, 2**62]}, "residual", None, ""),
        ("null-shape", {"shape": None, "ndim": 2}, "residual", "ValueError", "NULL shape"),
        ("negative-ndim", {"ndim": -1}, "residual", "ValueError", "rank in [0, 64]"),
        ("huge-ndim", {"ndim": 1000}, "residual", "ValueError", "rank in [0, 64]"),
        ("rank-0", {"shape": [], "ndim": 0}, "residual", "ValueError", "rank >= 1"),
        ("shape-mismatch-out", {"shape": [4, 2]}, "out", "ValueError", "out must have shape"),
        ("ok", {}, "residual", None, ""),
        ("ok-as-out", {}, "out", None, ""),
    ],
    "strides": [
        ("transposed", {"strides": [1, 4]}, "residual", "ValueError", "C-contiguous"),
        ("negative", {"strides": [-3, 1]}, "residual", "ValueError", "C-contiguous"),
        ("zero", {"strides": [0, 1]}, "residual", "ValueError", "C-contiguous"),
        ("huge", {"strides": [2**62, 1]}, "residual", "ValueError", "C-contiguous"),
        ("explicit-contiguous-ok", {"strides": [3, 1]}, "residual", None, ""),
        ("size-one-any-stride-ok", {"shape": [4, 1], "strides": [1, 99]}, "residual", None, ""),
        ("misaligned", {"byte_offset": 2}, "residual", "ValueError", "aligned"),
        ("strided-out", {"strides": [1, 4]}, "out", "ValueError", "C-contiguous"),
    ],
    "dtypes": [
        ("int32", {"dtype": (0, 32, 1)}, "residual", "TypeError", "floating dtype"),
        ("uint8", {"dtype": (1, 8, 1)}, "residual", "TypeError", "floating dtype"),
        ("bool", {"dtype": (6, 8, 1)}, "residual", "TypeError", "floating dtype"),
        ("complex64", {"dtype": (5, 64, 1)}, "residual", "TypeError", "floating dtype"),
        ("opaque", {"dtype": (3, 32, 1)}, "residual", "TypeError", "floating dtype"),
        ("float8", {"dtype": (2, 8, 1)}, "residual", "TypeError", "floating dtype"),
        ("float128", {"dtype": (2, 128, 1)}, "residual", "TypeError", "floating dtype"),
        ("float32x4", {"dtype": (2, 32, 4)}, "residual", "TypeError", "float32x4"),
        ("lanes-0", {"dtype": (2, 32, 0)}, "residual", "TypeError", "floating dtype"),
        ("bfloat32", {"dtype": (4, 32, 1)}, "residual", "TypeError", "floating dtype"),
        ("code-200", {"dtype": (200, 32, 1)}, "residual", "TypeError", "code 200"),
        ("float64-out-for-float32", {"dtype": (2, 64, 1)}, "out", "TypeError", "dtype float32"),
    ],
    "devices": [
        ("opencl", {"device": (4, 0)}, "residual", "ValueError", "device type 4"),
        ("unknown-type", {"device": (99, 0)}, "residual", "ValueError", "device type 99"),
        ("negative-type", {"device": (-1, 0)}, "residual", "ValueError", "device type -1"),
        ("cuda-negative-id", {"device": (2, -1)}, "residual", "ValueError", "id >= 0"),
        ("cuda-id-1000", {"device": (2, 1000)}, "residual", "ValueError", "cuda:1000"),
        ("dev-cpu-string", {"dev": ("cpu",)}, "residual", "TypeError", "('cpu',)"),
        ("dev-one", {"dev": (1,)}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-three", {"dev": (1, 0, 0)}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-none", {"dev": None}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-str", {"dev": "cpu"}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-float", {"dev": (1.5, 0)}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-bool", {"dev": (True, 0)}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-huge", {"dev": (2**40, 0)}, "residual", "TypeError", "(device_type, device_id)"),
        ("dev-list", {"dev": [1, 0]}, "residual", "TypeError", "(device_type, device_id)"),
        ("cuda-host-ok", {"device": (3, 0), "dev": (3, 0)}, "residual", None, ""),
    ],
    "capsules": [
        ("null-deleter-ok", {"deleter": False}, "residual", None, ""),
        ("null-deleter-refused", {"deleter": False, "dtype": (0, 32, 1)}, "residual",
         "TypeError", "floating dtype"),
        ("versioned-ok", {"capsule": "versioned"}, "residual", None, ""),
        ("versioned-2.0", {"capsule": "versioned", "version": (2, 0)}, "residual", "TypeError",
         "major version 2"),
        ("versioned-read-only-out", {"capsule": "versioned", "flags": 1}, "out", "ValueError",
         "writable"),
        ("versioned-read-only-in-ok", {"capsule": "versioned", "flags": 1}, "residual", None, ""),
        ("versioned-null-data", {"capsule": "versioned", "data": 0}, "residual", "ValueError",
         "NULL data"),
        ("versioned-negative-dim", {"capsule": "versioned", "shape": [3, -1]}, "residual",
         "ValueError", "dimensions >= 0"),
        ("wrong-name", {"capsule": "wrong-name"}, "residual", "TypeError", "DLPack capsule"),
        ("already-used", {"capsule": "used"}, "residual", "TypeError", "DLPack capsule"),
        ("not-a-capsule", {"capsule": "not-a-capsule"}, "residual", "TypeError",
         "DLPack capsule"),
        ("raises-buffer-error", {"raises": BufferError("no export")}, "residual", "TypeError",
         "raised BufferError: no export"),
        ("raises-runtime-error", {"raises": RuntimeError("boom")}, "residual", "TypeError",
         "residual.__dlpack__() raised RuntimeError: boom"),
        ("raises-memory-error", {"raises": MemoryError()}, "residual", "MemoryError", ""),
    ],
}


def run_case(fields, role):
    import stochdepth

    good = np.ones((4, 3), np.float32)
    p = Raw(**fields)
    # stream=0 (the legacy default stream): a CUDA producer without a stream would be refused
    # before any of its fields is read, and these cases are about the fields.
    if role == "residual":
        stochdepth.forward(None, p, 0.5, seed=1, stream=0)
    else:
        stochdepth.forward(good, good, 0.5, seed=1, out=p, stream=0)
    return p


def main(cls):
    for case_id, fields, role, _, _ in CASES[cls]:
        before = len(Raw.instances)
        got, msg = None, ""
        try:
            run_case(fields, role)
        except Exception as e:  # noqa: BLE001 - the test compares the class by name
            got, msg = type(e).__name__, str(e)
        gc.collect()
        p = Raw.instances[before]
        print(json.dumps({"id": case_id, "got": got, "msg": msg, "exports": p.exports,
                          "deletes": p.deletes, "null_deleter": not fields.get("deleter", True)}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
