"""Run the Keras suite (tests/keras) once per Keras backend, each in a fresh process.

Keras fixes its backend when it is first imported, so the three backends cannot share a process.
Each run gets KERAS_BACKEND and STOCHDEPTH_KERAS_SUITE=1 (without it tests/keras collects
nothing) and writes a JUnit report. A run fails here when it fails, when it passes no test, or
when it skips a test for a reason that ALLOWED_SKIPS does not list for that backend; its counts
and skips appear in the outer run's summary (tests/conftest.py prints them).

A backend whose packages are not installed is skipped, unless STOCHDEPTH_REQUIRE_KERAS=1 (CI
sets it): then a missing package is a failure, so that CI cannot go green with no Keras test run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sd_testutil import HAS_CUDA_DEVICE, junit_outcomes, run_python

HERE = Path(__file__).resolve().parent
BACKEND_MODULES = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
TIMEOUT_S = 900


def _installed(module):
    return importlib.util.find_spec(module) is not None


# The skips an inner run may report: (backends, test name pattern, reason pattern, condition,
# why). Any other skip fails the backend's run, so that a test cannot quietly stop running.
ALLOWED_SKIPS = [
    ({"jax"}, r"test_dtypes\[float64\]", r"JAX has no float64 without jax_enable_x64", True,
     "the suite runs JAX in its default 32-bit mode"),
    ({"jax"}, r"test_norm_float64", r"JAX has no float64 without jax_enable_x64", True,
     "the suite runs JAX in its default 32-bit mode (StochasticDepthNorm)"),
    ({"torch"}, r"test_jit_(un)?seeded_fresh_mask_each_step", r"no jit of a layer call", True,
     "no jit of a Keras layer call on torch; model.fit covers compiled steps there"),
    ({"jax", "tensorflow"}, r"test_torch_", r"torch backend", True,
     "torch-backend specifics"),
    ({"torch", "tensorflow"}, r"test_jax_", r"JAX backend", True, "JAX-backend specifics"),
    ({"torch", "jax"}, r"test_tf_", r"TensorFlow backend", True, "TensorFlow-backend specifics"),
    ({"tensorflow"}, r"test_tf_", r"no TensorFlow ops in this build",
     os.environ.get("STOCHDEPTH_REQUIRE_TF") != "1",
     "a build without the TensorFlow ops, where they are not required"),
    ({"jax", "tensorflow"}, r"test_keras_adapter_rows_tiny", r"taken on the torch backend", True,
     "the Keras bench rows are taken on the torch backend only"),
    ({"torch"}, r"test_torch_cuda_", r"CUDA", not HAS_CUDA_DEVICE,
     "CUDA tests where there is no CUDA device"),
    ({"jax", "tensorflow", "torch"}, r"kerasfactory", r"could not import 'kerasfactory",
     not _installed("kerasfactory"), "the kerasfactory comparisons where it is not installed"),
    ({"jax", "tensorflow"}, r"test_remat_training_equals_plain_training",
     r"RematScope with a seeded layer fails", True,
     "Keras's rematerialisation fails there for any seeded layer, its own Dropout included"),
]


def _allowed(backend, name, message):
    return any(backend in backends and re.search(test, name) and re.search(reason, message)
               and condition for backends, test, reason, condition, _ in ALLOWED_SKIPS)


def _missing(backend):
    return [m for m in ("keras", BACKEND_MODULES[backend]) if not _installed(m)]


def _keras_env(backend, tmp_path):
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        STOCHDEPTH_KERAS_SUITE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_HOME=str(tmp_path / "keras_home"),  # no keras.json of the user's leaks in
    )
    return env


def _require(backend):
    missing = _missing(backend)
    if missing:
        message = f"KERAS_BACKEND={backend}: {', '.join(missing)} not installed"
        if os.environ.get("STOCHDEPTH_REQUIRE_KERAS") == "1":
            pytest.fail(message + " (STOCHDEPTH_REQUIRE_KERAS=1)")
        pytest.skip(message)


@pytest.mark.keras
@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_keras_suite(backend, tmp_path, request):
    _require(backend)
    xml = tmp_path / "junit.xml"
    cmd = [
        sys.executable, "-m", "pytest", str(HERE / "keras"), "-q", "-rs",
        "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'basetemp'}", f"--junitxml={xml}",
    ]
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, env=_keras_env(backend, tmp_path),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"KERAS_BACKEND={backend}: the Keras suite ran over {TIMEOUT_S} s\n{out}")
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"KERAS_BACKEND={backend}: the Keras suite failed (exit {proc.returncode})\n"
                    f"{output}", pytrace=False)
    results = [(f"{module}::{name}", outcome, message)
               for module, cases in junit_outcomes(xml).items()
               for name, outcome, message in cases]
    counts = Counter(outcome for _, outcome, _ in results)
    skips = [(name, message) for name, outcome, message in results if outcome == "skipped"]
    summary = f"{backend}: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))
    summary += "".join(f"\n    skipped {name}: {message}" for name, message in skips)
    # For the summary (tests/conftest.py); record_property would warn under --junitxml.
    request.node.user_properties.append(("keras_inner_run", summary))
    # Exit 0 with nothing run would be a silent pass: insist that tests ran and passed.
    assert counts["passed"] > 0, f"KERAS_BACKEND={backend}: no test passed\n{output}"
    unexpected = [(name, message) for name, message in skips
                  if not _allowed(backend, name.partition("::")[2], message)]
    assert not unexpected, (f"KERAS_BACKEND={backend}: skips outside ALLOWED_SKIPS: "
                            f"{unexpected}\n{output}")


@pytest.mark.keras
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_keras_adapter_does_not_import_torch(backend, tmp_path):
    """`import stochdepth.keras`, and training calls of the layer, on a backend other than torch
    leave torch unimported (the torch path imports it on first use)."""
    _require(backend)
    code = (
        "import sys, numpy as np, stochdepth.keras as sk\n"
        "x = np.ones((8, 3), np.float32)\n"
        "y = np.asarray(sk.StochasticDepth(0.5, seed=1)([x, x], training=True))\n"
        "assert y.shape == (8, 3)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    r = run_python(code, env=_keras_env(backend, tmp_path))
    assert r.returncode == 0, r.stderr[-4000:]
    assert "torch imported: False" in r.stdout, r.stdout
