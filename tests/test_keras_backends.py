"""Run the Keras suite (tests/keras) once per Keras backend, each in a fresh process.

Keras fixes its backend when it is first imported, so the three backends cannot share a process.
Each run gets KERAS_BACKEND and STOCHDEPTH_KERAS_SUITE=1 (without it tests/keras collects
nothing); a failing run fails here with the subprocess's output.

A backend whose packages are not installed is skipped, unless STOCHDEPTH_REQUIRE_KERAS=1 (CI
sets it): then a missing package is a failure, so that CI cannot go green with no Keras test run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BACKEND_MODULES = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
TIMEOUT_S = 900


def _missing(backend):
    return [m for m in ("keras", BACKEND_MODULES[backend]) if importlib.util.find_spec(m) is None]


@pytest.mark.keras
@pytest.mark.parametrize("backend", list(BACKEND_MODULES))
def test_keras_suite(backend, tmp_path):
    missing = _missing(backend)
    if missing:
        message = f"KERAS_BACKEND={backend}: {', '.join(missing)} not installed"
        if os.environ.get("STOCHDEPTH_REQUIRE_KERAS") == "1":
            pytest.fail(message + " (STOCHDEPTH_REQUIRE_KERAS=1)")
        pytest.skip(message)
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        STOCHDEPTH_KERAS_SUITE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_HOME=str(tmp_path / "keras_home"),  # no keras.json of the user's leaks in
    )
    cmd = [
        sys.executable, "-m", "pytest", str(HERE / "keras"), "-q", "-rs",
        "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'basetemp'}",
    ]
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"KERAS_BACKEND={backend}: the Keras suite ran over {TIMEOUT_S} s\n{out}")
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"KERAS_BACKEND={backend}: the Keras suite failed (exit {proc.returncode})\n"
                    f"{output}", pytrace=False)
    # Exit 0 with nothing collected would be a silent pass: insist that tests ran.
    assert " passed" in output, output
