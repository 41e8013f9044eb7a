"""Fixtures and hooks for the stochdepth test suite; the shared helpers are tests/sd_testutil.py.

The suite tests the *installed* package. If `import stochdepth` fails here, every test fails:
a missing extension must never turn into a green run with zero kernels executed.

What lives here:
- STOCHDEPTH_TEST_BLOCK_IMPORTS=torch[,other]: makes `import torch` fail for the whole run, to
  prove which tests need it (tests/test_bindings_without_torch.py). Installed before anything
  imports stochdepth or sd_testutil.
- fixtures `isa` (every ISA this CPU supports), `threads` (1 thread; 2 threads with the
  parallel threshold at 0 so that tiny tensors take the multi-threaded path), `dtype`, `rng`,
  `ieee_overflow_ok`.
- the CUDA marker's skip where no device is present; the report header (the build tested);
  the summary of tests/test_keras_backends.py: the inner runs' skips, per backend.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import zlib

import numpy as np
import pytest


class _BlockImports(importlib.abc.MetaPathFinder):
    """Makes `import NAME` (and its submodules) fail as if NAME were not installed."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"import of {fullname} blocked by STOCHDEPTH_TEST_BLOCK_IMPORTS", name=fullname)
        return None


BLOCKED_IMPORTS = sorted(
    filter(None, os.environ.get("STOCHDEPTH_TEST_BLOCK_IMPORTS", "").split(",")))
if BLOCKED_IMPORTS:
    _already = [m for m in BLOCKED_IMPORTS if m in sys.modules]
    if _already:  # a finder cannot take back a module that is already imported
        raise RuntimeError(f"STOCHDEPTH_TEST_BLOCK_IMPORTS: {_already} imported before conftest")
    sys.meta_path.insert(0, _BlockImports(BLOCKED_IMPORTS))

from sd_testutil import (  # noqa: E402
    BUILD_INFO,
    COMPILED_ISAS,
    DTYPE_IDS,
    DTYPES,
    HAS_CUDA_DEVICE,
    SUPPORTED_ISAS,
    THREAD_MODES,
    use_isa,
    use_threads,
)


def pytest_report_header(config):
    return [
        f"stochdepth {BUILD_INFO.get('version')}: isa={BUILD_INFO.get('cpu_isa')} "
        f"compiled={COMPILED_ISAS} supported={SUPPORTED_ISAS} "
        f"cuda_compiled={BUILD_INFO.get('cuda_compiled')} "
        f"cuda_devices={BUILD_INFO.get('cuda_device_count')} "
        f"threads={BUILD_INFO.get('num_threads')}"
    ]


def pytest_terminal_summary(terminalreporter):
    """tests/test_keras_backends.py records each inner run's counts and skips: show them."""
    lines = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for name, value in getattr(rep, "user_properties", ()):
                if name == "keras_inner_run" and getattr(rep, "when", "call") == "call":
                    lines.append(value)
    if lines:
        terminalreporter.write_sep("-", "Keras suite per backend (inner runs)")
        for line in sorted(lines):
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA_DEVICE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA build and a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=SUPPORTED_ISAS)
def isa(request):
    with use_isa(request.param):
        yield request.param


@pytest.fixture(params=list(THREAD_MODES))
def threads(request):
    n, threshold = THREAD_MODES[request.param]
    with use_threads(n, threshold):
        yield request.param


@pytest.fixture(params=DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def dtype(request):
    return request.param


@pytest.fixture
def ieee_overflow_ok():
    """Overflow to inf and arithmetic on NaN are IEEE behaviour that the tests exercise on purpose
    (large inputs times 1/p, f32 -> f16 rounding, signaling NaNs in dropped rows that the
    reference computes and then discards). NumPy warns about them and pytest turns warnings
    into errors, so the modules that feed such values use this fixture (pytestmark)."""
    with np.errstate(over="ignore", invalid="ignore"):
        yield


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, and different per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
