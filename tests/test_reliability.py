"""Reliability: concurrent calls from Python threads, the GIL released during kernels, memory that
stays flat over thousands of calls (no leaked buffers, capsules or references), and DLPack
lifetimes.

Sanitizers. The whole suite also runs under AddressSanitizer + UndefinedBehaviorSanitizer. The
extension is built with the CMake option STOCHDEPTH_SANITIZE=ON into a build folder of its own,
and Python runs with the ASan runtime preloaded (Python itself is not instrumented, and its
deliberate leaks at exit are not ours, hence detect_leaks=0; the RSS tests skip themselves under
ASan, whose quarantine keeps freed memory). One command, from the repository root,
in an environment that has the test dependencies (afterwards, reinstall without the option):

    pip install --no-build-isolation -e . -Ccmake.define.STOCHDEPTH_SANITIZE=ON \
        -Cbuild-dir=build/asan && \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
        python -m pytest -q -p no:cacheprovider tests
"""

from __future__ import annotations

import bisect
import gc
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sd_testutil import BF16, F32, assert_bits_equal, random_array, use_threads

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20

# Under ASan, freed memory sits in the allocator's quarantine, so RSS grows without a leak; the
# sanitizer itself checks memory safety there, and the RSS tests run in the normal build.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
rss_test = pytest.mark.skipif(UNDER_ASAN, reason="RSS is not meaningful under ASan's quarantine")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def settle():
    gc.collect()
    stochdepth._core.cache_clear()


# ---- threads


@pytest.mark.parametrize("lib_threads", [1, 2], ids=["lib1", "lib2-threshold0"])
def test_concurrent_python_threads_match_reference(lib_threads):
    """4 Python threads x 50 calls, each call with its own seed/offset/mode/dtype, all running
    at once (the GIL is released): every result is the reference's."""
    rng = np.random.default_rng(31)
    jobs = []
    for i in range(200):
        dtype = [F32, BF16, np.dtype(np.float16), np.dtype(np.float64)][i % 4]
        shape = [(33, 129), (7, 3, 65), (2, 1000)][i % 3]
        axis = [0, 1, -1][i % 3]
        sc, res = random_array(rng, shape, dtype), random_array(rng, shape, dtype)
        kw = dict(seed=int(rng.integers(0, 2**63)), offset=i, mode=["row", "batch"][i % 2],
                  axis=axis, scaling=["inference", "training"][(i // 2) % 2])
        jobs.append((sc, res, kw, reference.forward(sc, res, 0.6, **kw),
                     reference.backward(res, 0.6, **kw)[1]))
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        results = []
        for sc, res, kw, _, _ in jobs[k::4]:
            results.append((stochdepth.forward(sc, res, 0.6, **kw),
                            stochdepth.backward(res, 0.6, **kw)[1],
                            stochdepth.mask(res.shape[kw["axis"]], 0.6, seed=kw["seed"],
                                            offset=kw["offset"], mode=kw["mode"])))
        return results

    with use_threads(lib_threads, 0 if lib_threads > 1 else None):
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(worker, range(4)))
    for k in range(4):
        assert len(outs[k]) == 50
        for (_sc, res, kw, want_f, want_b), (got_f, got_b, got_m) in zip(jobs[k::4], outs[k]):
            assert_bits_equal(got_f, want_f, str(kw))
            assert_bits_equal(got_b, want_b, str(kw))
            np.testing.assert_array_equal(
                got_m, reference.mask(res.shape[kw["axis"]], 0.6, seed=kw["seed"],
                                      offset=kw["offset"], mode=kw["mode"]))


def test_concurrent_in_place_on_distinct_buffers():
    """Threads writing in place into their own shortcut buffers do not disturb each other."""
    rng = np.random.default_rng(32)
    bufs = [random_array(rng, (64, 257), F32) for _ in range(4)]
    res = random_array(rng, (64, 257), F32)
    wants = []
    for k, b in enumerate(bufs):
        w = b.copy()
        for step in range(50):
            w = reference.forward(w, res, 0.5, seed=k, offset=step, scaling="training")
        wants.append(w)

    def worker(k):
        for step in range(50):
            stochdepth.forward(bufs[k], res, 0.5, seed=k, offset=step, scaling="training",
                               out=bufs[k])

    with use_threads(2, 0), ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    for b, w in zip(bufs, wants):
        assert_bits_equal(b, w)


@pytest.mark.slow
def test_gil_is_released_during_kernels():
    """While one thread runs a long kernel, another Python thread keeps running."""
    n = 8 * MiB  # float32 elements: 32 MiB per array
    sc = np.ones(n, F32)
    res = np.ones(n, F32)
    out = np.empty(n, F32)
    stamps = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0)

    def ticks_inside(t0, t1):
        lo, hi = t0 + 0.25 * (t1 - t0), t1 - 0.25 * (t1 - t0)
        snap = stamps[:]  # appended in time order by one thread: sorted
        return bisect.bisect_left(snap, hi) - bisect.bisect_right(snap, lo)

    windows, inside = [], 0
    with use_threads(1):
        stochdepth.forward(sc, res, 0.5, seed=1, out=out)  # warm up (page faults)
        t = threading.Thread(target=ticker)
        t.start()
        try:
            # On a loaded machine the ticker may not be scheduled during one call: try up to 40.
            for i in range(40):
                t0 = time.perf_counter()
                stochdepth.forward(sc, res, 0.5, seed=i, out=out, training=False)
                windows.append((t0, time.perf_counter()))
                time.sleep(0.001)
                inside += ticks_inside(*windows[-1])
                if inside >= 3:
                    break
        finally:
            stop.set()
            t.join()
    assert inside > 0, f"no Python progress during {len(windows)} kernel calls"


# ---- memory stays flat


ROUNDS = 750


def _numpy_round(sc, res, out, i):
    stochdepth.forward(sc, res, 0.5, seed=i, offset=i)
    stochdepth.forward(sc, res, 0.5, seed=i, out=out)
    stochdepth.forward(None, res, 0.5, seed=i)
    stochdepth.backward(res, 0.5, seed=i)
    stochdepth.mask(res.shape[0], 0.5, seed=i)


def _torch_round(torch, tsc, tres, tout, i):
    a = stochdepth.forward(tsc, tres, 0.5, seed=i, offset=i)
    t = torch.from_dlpack(a)
    n = np.from_dlpack(a)
    assert t.data_ptr() == n.ctypes.data
    del a, t, n
    stochdepth.forward(tsc, tres, 0.5, seed=i, out=tout)
    _, g = stochdepth.backward(tres, 0.5, seed=i)
    cap = g.__dlpack__()  # a capsule nobody consumes: its destructor must free the tensor
    del cap, g
    stochdepth.forward(tsc, tres, 0.5, seed=i, out=tsc)


@rss_test
@pytest.mark.slow
@pytest.mark.parametrize("elems", [64 * 1024, 320 * 1024], ids=["256KiB", "1.25MiB"])
def test_memory_flat_numpy(elems):
    rng = np.random.default_rng(33)
    sc, res = random_array(rng, (64, elems // 64), F32), random_array(rng, (64, elems // 64), F32)
    out = np.empty_like(sc)
    for i in range(100):
        _numpy_round(sc, res, out, i)
    settle()
    before = rss_bytes()
    for i in range(ROUNDS):  # 5 calls a round: 3750 calls
        _numpy_round(sc, res, out, i)
    settle()
    grown = rss_bytes() - before
    assert grown < 20 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over {5 * ROUNDS} calls"


@rss_test
@pytest.mark.slow
@pytest.mark.parametrize("elems", [64 * 1024, 320 * 1024], ids=["256KiB", "1.25MiB"])
def test_memory_flat_torch_dlpack(elems):
    torch = pytest.importorskip("torch")
    tsc = torch.randn(64, elems // 64)
    tres = torch.randn(64, elems // 64)
    tout = torch.empty_like(tsc)
    for i in range(100):
        _torch_round(torch, tsc, tres, tout, i)
    settle()
    before = rss_bytes()
    for i in range(ROUNDS):  # 4 calls (3000), 2 from_dlpack, 1 unconsumed capsule a round
        _torch_round(torch, tsc, tres, tout, i)
    settle()
    grown = rss_bytes() - before
    assert grown < 20 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over {ROUNDS} rounds"


@rss_test
@pytest.mark.slow
def test_memory_flat_on_errors():
    """Calls that fail after consuming a DLPack capsule must still release it: fresh torch
    tensors (256 KiB) passed with a mismatched shape, an overlapping out, a bad axis must not
    accumulate."""
    torch = pytest.importorskip("torch")
    small = np.ones((2, 2), F32)

    def round_(i):
        t = torch.from_numpy(np.full((64, 1024), float(i), F32))
        with pytest.raises(ValueError):
            stochdepth.forward(small, t, 0.5, seed=1)
        with pytest.raises(ValueError):
            stochdepth.forward(t, t, 0.5, seed=1, out=t)
        with pytest.raises(ValueError):
            stochdepth.forward(None, t, 0.5, seed=1, axis=5)
        with pytest.raises(TypeError):
            stochdepth.forward(None, t, "p", seed=1)

    for i in range(50):
        round_(i)
    settle()
    before = rss_bytes()
    for i in range(400):
        round_(i)
    settle()
    grown = rss_bytes() - before
    assert grown < 20 * MiB, f"RSS grew by {grown / MiB:.1f} MiB over 400 failing rounds"


def test_no_reference_leaks_on_inputs():
    """Calls do not keep references to their arguments (a leaked reference is a leaked array)."""
    rng = np.random.default_rng(34)
    sc, res = random_array(rng, (8, 9), F32), random_array(rng, (8, 9), F32)
    out = np.empty_like(sc)
    objs = [sc, res, out]
    before = [sys.getrefcount(o) for o in objs]
    for i in range(200):
        stochdepth.forward(sc, res, 0.5, seed=i)
        stochdepth.forward(sc, res, 0.5, seed=i, out=out)
        stochdepth.forward(sc, res, 0.5, seed=i, out=sc)
        stochdepth.backward(res, 0.5, seed=i, out=out)
        try:
            stochdepth.forward(sc, res, 0.5, seed=-1)
        except ValueError:
            pass
        try:
            stochdepth.forward(sc, res[:4], 0.5, seed=1)
        except ValueError:
            pass
    gc.collect()
    assert [sys.getrefcount(o) for o in objs] == before


def test_no_reference_leaks_on_torch_inputs():
    torch = pytest.importorskip("torch")
    tsc, tres = torch.randn(8, 9), torch.randn(8, 9)
    tout = torch.empty(8, 9)
    objs = [tsc, tres, tout]
    before = [sys.getrefcount(o) for o in objs]
    for i in range(200):
        a = stochdepth.forward(tsc, tres, 0.5, seed=i)
        torch.from_dlpack(a)
        stochdepth.forward(tsc, tres, 0.5, seed=i, out=tout)
        stochdepth.backward(tres, 0.5, seed=i, out=tout)
        try:
            stochdepth.forward(tsc, tres, 0.5, seed=1, out=tres)
        except ValueError:
            pass
    del a
    gc.collect()
    assert [sys.getrefcount(o) for o in objs] == before


# ---- DLPack lifetimes


def test_array_outlives_its_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(35)
    sc, res = random_array(rng, (16, 33), F32), random_array(rng, (16, 33), F32)
    want = reference.forward(sc, res, 0.5, seed=2)
    a = stochdepth.forward(torch.from_numpy(sc.copy()), torch.from_numpy(res.copy()), 0.5, seed=2)
    gc.collect()
    [torch.full((16, 33), 9.0) for _ in range(10)]
    assert_bits_equal(np.from_dlpack(a), want)


def test_consumers_outlive_the_array():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(36)
    res = random_array(rng, (16, 33), F32)
    want = reference.forward(None, res, 0.5, seed=3)
    a = stochdepth.forward(None, torch.from_numpy(res.copy()), 0.5, seed=3)
    t = torch.from_dlpack(a)
    n = np.from_dlpack(a)
    del a
    gc.collect()
    stochdepth._core.cache_clear()
    [stochdepth.forward(None, torch.from_numpy(res.copy()), 1.0, seed=0) for _ in range(10)]
    assert_bits_equal(t.numpy(), want)
    del t
    gc.collect()
    assert_bits_equal(n, want)


@rss_test
def test_unconsumed_capsules_are_freed():
    """Creating capsules and dropping them unconsumed, many times, keeps memory flat."""
    torch = pytest.importorskip("torch")
    x = torch.ones(64, 1024)
    a = stochdepth.forward(None, x, 1.0, seed=0)
    for _ in range(50):
        a.__dlpack__()
        stochdepth.forward(None, x, 1.0, seed=0).__dlpack__()
    settle()
    before = rss_bytes()
    for _ in range(1000):
        a.__dlpack__()
        stochdepth.forward(None, x, 1.0, seed=0).__dlpack__()
    settle()
    grown = rss_bytes() - before
    assert grown < 20 * MiB, f"RSS grew by {grown / MiB:.1f} MiB"
