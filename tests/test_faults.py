"""Fault injection for the CPU thread pool and the environment settings (issue 10, items 1, 2, 13).

Thread creation is made to fail for real: an LD_PRELOAD shim, compiled here with `cc`, wraps
pthread_create and returns EAGAIN once armed (after N more successful calls, or at once). Each
scenario runs in a fresh interpreter with a timeout, so that a hang or an abort fails one test.
The pool must give the reference's answers on the threads it could start (or on the calling
thread), and never hang: no condition variable a worker waits on is ever destroyed
(src/stochdepth/thread_pool.cc), which the exit, fork and regrowth scenarios exercise.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from sd_testutil import run_python

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>

static long allowed = -1; /* -1: not armed; else how many more threads may start */

void sd_shim_arm(long n) { __atomic_store_n(&allowed, n, __ATOMIC_SEQ_CST); }
long sd_shim_refused = 0;

int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  static int (*real)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
  if (!real) real = (int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*))
      dlsym(RTLD_NEXT, "pthread_create");
  for (;;) {
    long left = __atomic_load_n(&allowed, __ATOMIC_SEQ_CST);
    if (left == 0) {
      __atomic_fetch_add(&sd_shim_refused, 1, __ATOMIC_SEQ_CST);
      return EAGAIN;
    }
    if (left < 0) break;
    if (__atomic_compare_exchange_n(&allowed, &left, left - 1, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST)) break;
  }
  return real(t, a, f, arg);
}
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the pthread_create shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
                   check=True, capture_output=True)
    return str(d / "shim.so")


PRELUDE = """
import ctypes, os, sys, threading
import numpy as np
import stochdepth
from stochdepth import _core, reference

shim = ctypes.CDLL(os.environ["SD_SHIM"])
x = np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096)
want = reference.forward(x, x, 0.5, seed=3)
want_bwd = reference.backward(x, 0.5, seed=3)[1]
_core.set_parallel_threshold(0)

def check(times=3):
    for _ in range(times):
        assert np.array_equal(stochdepth.forward(x, x, 0.5, seed=3), want)
        assert np.array_equal(stochdepth.backward(x, 0.5, seed=3)[1], want_bwd)
"""

# Each scenario: (code after PRELUDE). The shim is armed after the imports, so that only the
# library's threads (and Python's own, which the scenario may start) meet the failures.
SCENARIOS = {
    # No thread can start: everything runs on the calling thread.
    "always-fails": """
stochdepth.set_num_threads(8)
shim.sd_shim_arm(ctypes.c_long(0))
check()
refused = ctypes.c_long.in_dll(shim, "sd_shim_refused").value
assert refused >= 1, refused
""",
    # Some threads start, then the rest fail: a smaller pool; later calls retry and still work.
    "fails-after-2": """
stochdepth.set_num_threads(8)
shim.sd_shim_arm(ctypes.c_long(2))
check()
stochdepth.set_num_threads(16)  # growing again meets the failure again
check()
""",
    # The pool exists with parked workers, then creation fails while it grows.
    "grow-after-pool-exists": """
stochdepth.set_num_threads(2)
check()
shim.sd_shim_arm(ctypes.c_long(1))
stochdepth.set_num_threads(12)
check()
""",
    # Python threads that cannot start do not disturb concurrent library calls.
    "python-threads-and-library": """
stochdepth.set_num_threads(4)
check(1)
shim.sd_shim_arm(ctypes.c_long(3))
results = []
def work():
    results.append(np.array_equal(stochdepth.forward(x, x, 0.5, seed=3), want))
started = []
for _ in range(6):
    t = threading.Thread(target=work)
    try:
        t.start()
        started.append(t)
    except RuntimeError:
        work()  # Python could not start it: the caller does the work itself
for t in started:
    t.join()
assert results == [True] * 6, results
""",
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_pool_survives_failed_thread_creation(shim, name):
    r = run_python(PRELUDE + SCENARIOS[name] + "\nprint('OK')\n",
                   env={"LD_PRELOAD": shim, "SD_SHIM": shim, "OPENBLAS_NUM_THREADS": "1"},
                   timeout=120)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


# Scenarios where a condition variable could be destroyed under a waiting worker, if the pool
# were ever destroyed or replaced: interpreter exit with workers parked (normally, from a
# non-main thread with a call in flight, by os._exit), a forked child using and leaving its own
# pool, and a pool grown while another thread's call runs.
NO_HANG = {
    "exit-with-parked-workers": """
stochdepth.set_num_threads(4)
check()
print("OK")
sys.exit(0)
""",
    "exit-while-a-daemon-thread-calls": """
stochdepth.set_num_threads(4)
def spin():
    while True:
        stochdepth.forward(x, x, 0.5, seed=3)
threading.Thread(target=spin, daemon=True).start()
check()
""",
    "fork-child-uses-and-exits": """
stochdepth.set_num_threads(4)
check()
for how in ("exit", "_exit"):
    pid = os.fork()
    if pid == 0:
        check()
        if how == "_exit":
            os._exit(0)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (how, status)
check()
""",
    "regrow-while-busy": """
stochdepth.set_num_threads(2)
check(1)
stop = []
def other():
    while not stop:
        check(1)
t = threading.Thread(target=other)
t.start()
for n in (3, 5, 8, 2, 16):
    stochdepth.set_num_threads(n)
    check(1)
stop.append(1)
t.join()
""",
}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", list(NO_HANG))
def test_pool_never_hangs(shim, name):
    # With the shim armed to refuse after a few threads, so that the pool is also partial.
    code = PRELUDE + "shim.sd_shim_arm(ctypes.c_long(6))\n" + NO_HANG[name] + "\nprint('OK')\n"
    r = run_python(code, env={"LD_PRELOAD": shim, "SD_SHIM": shim, "OPENBLAS_NUM_THREADS": "1",
                              "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    assert r.stdout.strip().endswith("OK"), r.stdout + r.stderr


# ---- environment settings: one strict parser, a bad value fails the import (ValueError)

BAD_ENV = [
    ("STOCHDEPTH_NUM_THREADS", "99999999999"),
    ("STOCHDEPTH_NUM_THREADS", "4294967297"),
    ("STOCHDEPTH_NUM_THREADS", "257"),
    ("STOCHDEPTH_NUM_THREADS", "0"),
    ("STOCHDEPTH_NUM_THREADS", "-1"),
    ("STOCHDEPTH_NUM_THREADS", "+4"),
    ("STOCHDEPTH_NUM_THREADS", " 4"),
    ("STOCHDEPTH_NUM_THREADS", "4x"),
    ("STOCHDEPTH_NUM_THREADS", "1e3"),
    ("STOCHDEPTH_CACHE_MB", "abc"),
    ("STOCHDEPTH_CACHE_MB", "-1"),
    ("STOCHDEPTH_CACHE_MB", "12MB"),
    ("STOCHDEPTH_CACHE_MB", "99999999999999999999"),
    ("STOCHDEPTH_CACHE_MB", str(2**30 + 1)),
]


def test_bad_environment_settings_fail_the_import():
    # One interpreter per value would be ~1 s each: one driver runs them all, each in a child.
    code = f"""
import os, subprocess, sys
bad = {BAD_ENV!r}
for name, value in bad:
    env = dict(os.environ, **{{name: value}})
    r = subprocess.run([sys.executable, "-c", "import stochdepth"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0, (name, value, "accepted")
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: " + name + " must be an integer in ["), (name, value, last)
    assert repr(value) in last or "'" + value + "'" in last, (name, value, last)
print("OK")
"""
    r = run_python(code, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "OK"


def test_good_environment_settings_are_used():
    code = """
import stochdepth
info = stochdepth.build_info()
print(info["num_threads"], info["cache_limit_bytes"], info["max_threads"])
"""
    r = run_python(code, env={"STOCHDEPTH_NUM_THREADS": "3", "STOCHDEPTH_CACHE_MB": "0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "0", "256"]
    r = run_python(code, env={"STOCHDEPTH_NUM_THREADS": "256", "STOCHDEPTH_CACHE_MB": "16"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["256", str(16 << 20), "256"]


def test_default_thread_count_is_capped():
    # Without STOCHDEPTH_NUM_THREADS: all cores, at most the documented bound.
    import os

    import stochdepth
    r = run_python("import stochdepth; print(stochdepth.get_num_threads())",
                   env={"STOCHDEPTH_NUM_THREADS": ""})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == min(os.cpu_count(), stochdepth.build_info()["max_threads"])


def test_set_num_threads_is_bounded_and_strict():
    import stochdepth
    old = stochdepth.get_num_threads()
    try:
        for bad, exc in [(True, TypeError), (False, TypeError), (2.0, TypeError), ("4", TypeError),
                         (None, TypeError), (0, ValueError), (-1, ValueError), (257, ValueError),
                         (100000, ValueError), (2**40, ValueError), (2**64, ValueError)]:
            with pytest.raises(exc, match="num_threads must be an integer in \\[1, 256\\]"):
                stochdepth.set_num_threads(bad)
            assert stochdepth.get_num_threads() == old
        stochdepth.set_num_threads(256)
        assert stochdepth.get_num_threads() == 256
        import numpy as np
        stochdepth.set_num_threads(np.int64(2))
        assert stochdepth.get_num_threads() == 2
    finally:
        stochdepth.set_num_threads(old)
