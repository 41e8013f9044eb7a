"""Malformed DLPack producers (issue 10, items 3, 4, 11, 14 and the fuzz): every field of a
producer's tensor can lie (tests/sd_malformed.py); the library raises a Python exception naming
the argument, never crashes, and releases each capsule it consumed exactly once. Each class of
cases runs in one subprocess, so that a crash fails one test, not the suite.

Also the export side: stochdepth.Array's DLPack deleter is idempotent (a consumer such as torch
calls it and then leaves the capsule unrenamed on an error path), and a cross-device request is
a BufferError.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from sd_malformed import CASES
from sd_testutil import run_python

import stochdepth

HERE = pathlib.Path(__file__).resolve().parent
HAS_CUDA_DEVICE = stochdepth.build_info()["cuda_device_count"] > 0


def _run_class(cls):
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import sd_malformed; " \
           f"sd_malformed.main({cls!r})"
    r = run_python(code, timeout=120)
    results = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row["id"]] = row
    return r, results


@pytest.mark.parametrize("cls", list(CASES))
def test_malformed_producers(cls):
    r, results = _run_class(cls)
    assert r.returncode == 0, (
        f"the {cls} run died (rc={r.returncode}) after {list(results)}\n{r.stderr[-3000:]}")
    problems = []
    for case_id, _fields, _role, exc, fragment in CASES[cls]:
        if case_id == "cuda-id-1000" and HAS_CUDA_DEVICE:
            continue  # still refused, but the message depends on the devices present
        row = results.get(case_id)
        if row is None:
            problems.append(f"{case_id}: no result")
            continue
        if row["got"] != exc:
            problems.append(f"{case_id}: expected {exc}, got {row['got']}: {row['msg']}")
        elif fragment and fragment not in row["msg"]:
            problems.append(f"{case_id}: message lacks {fragment!r}: {row['msg']}")
        elif exc is not None and exc != "MemoryError" and not row["msg"].startswith(
                ("residual", "out")):
            problems.append(f"{case_id}: message does not name the argument: {row['msg']}")
        # Every capsule handed out is released exactly once (by us when consumed, else by its
        # own destructor); a NULL deleter has nothing to call.
        if not row["null_deleter"] and row["deletes"] != row["exports"]:
            problems.append(f"{case_id}: {row['exports']} capsule(s), {row['deletes']} release(s)")
    assert problems == [], "\n".join(problems)


def test_the_fuzz_covers_every_class_of_the_issue():
    ids = {c[0] for cases in CASES.values() for c in cases}
    for needed in ("null-data", "negative-dim", "overflow-2**32-squared", "dev-cpu-string",
                   "versioned-read-only-out", "raises-buffer-error", "null-deleter-ok"):
        assert needed in ids
    assert sum(len(v) for v in CASES.values()) >= 60


# ---- the export side

DOUBLE_RELEASE = """
import ctypes, gc, numpy as np, stochdepth
from sd_dlpack import NumpyDLPack
api = ctypes.pythonapi
api.PyCapsule_GetPointer.restype = ctypes.c_void_p
api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
x = np.arange(12, dtype=np.float32).reshape(4, 3)
a = stochdepth.forward(None, NumpyDLPack(x), 1.0, seed=1)
for calls in (1, 2, 3):
    cap = a.__dlpack__()
    ptr = api.PyCapsule_GetPointer(cap, b"dltensor")
    # DLManagedTensor: DLTensor (48 bytes), manager_ctx, deleter
    deleter = DELETER(ctypes.c_void_p.from_address(ptr + 48 + 8).value)
    for _ in range(calls):  # a consumer's error path: released, capsule left unrenamed
        deleter(ptr)
    del cap
    gc.collect()
assert np.array_equal(a.numpy(), x)  # the array's own buffer is untouched
print("OK")
"""


def test_export_deleter_is_idempotent():
    r = run_python(f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + DOUBLE_RELEASE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"


def test_torch_from_dlpack_of_an_array_and_of_refused_shapes():
    torch = pytest.importorskip("torch")
    from sd_dlpack import NumpyDLPack
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    a = stochdepth.forward(None, NumpyDLPack(x), 1.0, seed=1)
    t = torch.from_dlpack(a)
    assert torch.equal(t, torch.from_numpy(x))
    del t
    # The shape that once made an Array backed by 0 bytes is refused before any Array exists.
    from sd_malformed import Raw
    with pytest.raises(ValueError, match="2\\*\\*63 bytes"):
        stochdepth.forward(None, Raw(shape=[2**32, 2**32]), 0.5, seed=1)


def test_cross_device_export_is_a_buffer_error():
    from sd_dlpack import NumpyDLPack
    a = stochdepth.forward(None, NumpyDLPack(np.ones((2, 2), np.float32)), 0.5, seed=1)
    with pytest.raises(BufferError, match="cannot be exported to DLPack device \\(2, 0\\)"):
        a.__dlpack__(dl_device=(2, 0))
    with pytest.raises(TypeError, match="dl_device must be"):
        a.__dlpack__(dl_device="cuda")
    assert np.array_equal(np.from_dlpack(a), a.numpy())  # its own device is fine
    a.__dlpack__(dl_device=(1, 0))
    with pytest.raises(BufferError):
        a.__dlpack__(copy=True)
