"""The CPU worker pool: results do not depend on it, a forked child gets its own, concurrent
callers (which find it busy) still get the reference's answers, and a process that cannot start
threads still gets them, on fewer threads."""

import multiprocessing
import threading

import numpy as np
import pytest
from sd_testutil import run_python

import stochdepth
from stochdepth import _core, reference


@pytest.fixture
def always_parallel():
    before = _core.get_parallel_threshold()
    _core.set_parallel_threshold(0)
    yield
    _core.set_parallel_threshold(before)


def _child(queue):
    x = np.arange(4096 * 8, dtype=np.float32).reshape(64, 512)
    _core.set_parallel_threshold(0)
    out = stochdepth.forward(x, x, 0.5, seed=3)
    queue.put(bool(np.array_equal(out, reference.forward(x, x, 0.5, seed=3))))


# Python >= 3.12 warns about fork() in a process with threads: forking such a process is the
# point of this test.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_runs_the_parallel_path(always_parallel):
    x = np.ones((64, 512), np.float32)
    stochdepth.forward(x, x, 0.5, seed=1)  # the parent's pool exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked child hung or crashed in the parallel path"
    assert queue.get(timeout=5) is True


def test_growing_the_thread_count_and_concurrent_callers(always_parallel):
    before = stochdepth.get_num_threads()
    try:
        stochdepth.set_num_threads(4)  # more threads than cores: the pool grows
        rng = np.random.default_rng(0)
        x = rng.standard_normal((33, 1000)).astype(np.float32)
        expected = {s: reference.forward(x, x, 0.7, seed=s) for s in range(8)}
        failures = []

        def work(seed):
            for _ in range(20):
                if not np.array_equal(stochdepth.forward(x, x, 0.7, seed=seed), expected[seed]):
                    failures.append(seed)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
    finally:
        stochdepth.set_num_threads(before)


# Run in a fresh interpreter, so that no pool exists yet. RLIMIT_NPROC = 0 makes every new thread
# fail (EAGAIN); root is exempt from it, so a root process first drops to nobody.
NO_THREADS = """
import os, resource, threading
import numpy as np
import stochdepth
from stochdepth import _core, reference

x = np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096)
want = reference.forward(x, x, 0.5, seed=3)
if os.getuid() == 0:
    try:
        os.setgid(65534)
        os.setuid(65534)
    except OSError as e:
        print("SKIP cannot drop root:", e)
        raise SystemExit(0)
resource.setrlimit(resource.RLIMIT_NPROC, (0, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
try:
    threading.Thread(target=lambda: None).start()
    print("SKIP the thread limit does not hold here")
    raise SystemExit(0)
except RuntimeError:
    pass
_core.set_parallel_threshold(0)
stochdepth.set_num_threads(4)
for _ in range(3):  # the pool retries on each call, and still falls back
    assert np.array_equal(stochdepth.forward(x, x, 0.5, seed=3), want)
print("OK")
"""


def test_threads_that_cannot_start_mean_fewer_threads_not_an_error():
    r = run_python(NO_THREADS)
    assert r.returncode == 0, r.stderr
    if r.stdout.startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.strip() == "OK", r.stdout + r.stderr
