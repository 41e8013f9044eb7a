"""The test suite's shared helpers, imported by test modules as `from sd_testutil import ...`
(tests/conftest.py holds the fixtures and hooks, built on these).

- DTYPES / TOLERANCES: the four dtypes; every backend must match `stochdepth.reference` exactly
  (docs/design.md, "Arithmetic" pins it), so the tolerance table is all "exact".
- CPU_ISAS (read from /proc/cpuinfo, independently of the library), BUILD_INFO, the ISAs the
  build compiled and supports, HAS_CUDA_DEVICE.
- `use_isa` / `use_threads` context managers (the `isa` and `threads` fixtures use them; tests
  that cannot take fixtures, e.g. under hypothesis, call them directly).
- `bits`, `assert_bits_equal`: exact comparison of bit patterns, so NaN payloads and -0.0 count.
- `random_array`: values with negatives, subnormals, large magnitudes and signed zeros.
- `run_python`: run a snippet in a fresh interpreter (import-time env vars, crash-prone inputs);
  `junit_outcomes`: what an inner pytest run's JUnit report says, test by test.
- `fwd`, `bwd`, `arrays`: the binding tests' shorthands (seed 1, p = 0.5, a small float32 pair).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import ml_dtypes
import numpy as np

import stochdepth
from stochdepth import reference

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)
DTYPES = [F16, BF16, F32, F64]
DTYPE_IDS = {F16: "f16", BF16: "bf16", F32: "f32", F64: "f64"}

# Every backend reproduces stochdepth.reference bit for bit (docs/design.md, "Arithmetic"), half
# types included: they compute in float32 and round once on store, like the reference.
TOLERANCES = {F16: "exact", BF16: "exact", F32: "exact", F64: "exact"}

def cpu_isas():
    """The ISAs this CPU runs, best first, read independently of the library: the kernel's
    /proc/cpuinfo flags (it hides the AVX and AVX-512 flags when the OS does not save their
    register state) and the machine type. What the build should find with CPUID + XGETBV."""
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["neon", "scalar"]
    if machine not in ("x86_64", "amd64"):
        return ["scalar"]
    flags = set()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isas = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags:
        isas.insert(0, "avx2")
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
            isas.insert(0, "avx512")
            if "avx512_bf16" in flags:
                isas.insert(0, "avx512_bf16")
    return isas


CPU_ISAS = cpu_isas()

BUILD_INFO = stochdepth.build_info()
SUPPORTED_ISAS = list(BUILD_INFO["cpu_isas_supported"])
COMPILED_ISAS = list(BUILD_INFO["cpu_isas_compiled"])
HAS_CUDA_DEVICE = bool(BUILD_INFO["cuda_compiled"]) and int(BUILD_INFO["cuda_device_count"]) > 0

MODES = ["row", "batch"]
SCALINGS = ["inference", "training"]


def compute_type(dtype):
    """The type the kernels compute in (docs/design.md, "Arithmetic"): float32 for half types."""
    return F64 if dtype == F64 else F32


# (num_threads, parallel threshold in bytes or None = leave the library's default)
THREAD_MODES = {"1thread": (1, None), "2threads": (2, 0)}


# ---- ISA and thread selection


@contextlib.contextmanager
def use_isa(name):
    """Force the CPU path `name` for the duration of the block, then restore the previous one."""
    old = stochdepth.get_isa()
    stochdepth.set_isa(name)
    try:
        assert stochdepth.get_isa() == name
        yield name
    finally:
        stochdepth.set_isa(old)


@contextlib.contextmanager
def use_threads(n, threshold=None):
    """Run with `n` threads; threshold=0 forces the multi-threaded path and the streaming stores
    even on tiny tensors (both are otherwise kept for large ones)."""
    core = stochdepth._core
    old_n = stochdepth.get_num_threads()
    old_t = core.get_parallel_threshold()
    old_s = core.get_stream_threshold()
    stochdepth.set_num_threads(n)
    if threshold is not None:
        core.set_parallel_threshold(threshold)
        core.set_stream_threshold(threshold)
    try:
        yield n
    finally:
        stochdepth.set_num_threads(old_n)
        core.set_parallel_threshold(old_t)
        core.set_stream_threshold(old_s)


# ---- comparisons


def bits(a):
    """The raw bit pattern of a float array, as unsigned integers of the same width."""
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(actual, expected, err_msg=""):
    """Exact equality of dtype, shape and every bit (NaN payloads and the sign of zero too)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}. {err_msg}"
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}. {err_msg}"
    a, e = bits(actual), bits(expected)
    if not np.array_equal(a, e):
        bad = np.argwhere(a != e)
        first = [tuple(int(i) for i in idx) for idx in bad[:5]]
        shown = ", ".join(
            f"{idx}: got {actual[idx]!r} ({int(a[idx]):#x}) want {expected[idx]!r} "
            f"({int(e[idx]):#x})"
            for idx in first
        )
        raise AssertionError(
            f"{len(bad)} of {a.size} elements differ (dtype {actual.dtype}, shape "
            f"{actual.shape}); first: {shown}. {err_msg}"
        )


# ---- inputs


def random_array(rng, shape, dtype, *, special=True):
    """Random values of `dtype`: mostly N(0, 1), plus (if special) negatives and positives of
    large magnitude (so that scaling may overflow to inf), subnormals, and signed zeros.
    No NaN or Inf: tests place those where they need them."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    vals = rng.standard_normal(n)
    if special and n:
        fi = ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)
        kind = rng.integers(0, 10, n)
        sign = np.where(rng.integers(0, 2, n) == 1, -1.0, 1.0)
        big = sign * float(fi.max) * rng.uniform(0.3, 0.9, n)
        sub = sign * float(fi.smallest_subnormal) * rng.integers(1, 64, n)
        vals = np.where(kind == 0, big, vals)
        vals = np.where(kind == 1, sub, vals)
        vals = np.where(kind == 2, sign * 0.0, vals)
        vals = np.where(kind == 3, np.round(vals * 8), vals)
    return vals.astype(dtype).reshape(shape)


def misaligned(a):
    """A C-contiguous copy of `a` whose data starts one element into a larger buffer."""
    a = np.asarray(a)
    buf = np.empty(a.size + 1, a.dtype)
    view = buf[1:].reshape(a.shape)
    view[...] = a
    return view


def filled_like(a, byte=0xA5):
    """An array like `a` filled with a garbage byte pattern (so untouched outputs show)."""
    out = np.empty_like(a)
    out.view(np.uint8).reshape(-1)[:] = byte
    return out


def ref_forward(shortcut, residual, p, **kw):
    return reference.forward(shortcut, residual, p, **kw)


# ---- the binding tests' shorthands


def fwd(shortcut, residual, p=0.5, **kw):
    kw.setdefault("seed", 1)
    return stochdepth.forward(shortcut, residual, p, **kw)


def bwd(grad_out, p=0.5, **kw):
    kw.setdefault("seed", 1)
    return stochdepth.backward(grad_out, p, **kw)


def arrays(shape=(4, 5), dtype=F32):
    """A (shortcut, residual) pair of plain values (no specials), the same on every call."""
    rng = np.random.default_rng(0)
    return (random_array(rng, shape, dtype, special=False),
            random_array(rng, shape, dtype, special=False))


# ---- subprocesses


def run_python(code, *, env=None, timeout=300):
    """Run `code` in a fresh interpreter; returns CompletedProcess (text, both streams)."""
    full_env = dict(os.environ)
    full_env.pop("STOCHDEPTH_CPU", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def junit_outcomes(xml_path):
    """{module: [(test name, outcome, message)]} from a pytest JUnit XML report; outcome is
    passed, failure, error, skipped or xfailed. A module skipped at collection is one entry with
    an empty classname and the module as its name."""
    by_module = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        module = (case.get("classname") or case.get("name", "")).rpartition(".")[2]
        outcome, message = "passed", ""
        for child in case:
            text = child.get("message", "")
            if text in ("", "collection skipped"):  # the reason is then in the element's text
                text = (child.text or "").strip()
            if child.tag in ("failure", "error"):
                outcome, message = child.tag, text
            elif child.tag == "skipped":
                kind = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                outcome, message = kind, text
        by_module.setdefault(module, []).append((case.get("name"), outcome, message))
    return by_module
