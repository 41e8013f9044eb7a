"""Runs the JAX suite (tests/jax: stochdepth.jax against the reference, its bench rows) in a
fresh process and fails when it fails, passes nothing, or skips anything. Separate because a
started JAX backend makes every later os.fork() in this process warn (an error here).

Where jax is not installed this is a skip, unless STOCHDEPTH_REQUIRE_JAX=1 (then a failure).
The one skip accepted inside the suite is a GPU test's where jax has no GPU backend
(tests/jax/test_jax_gpu.py, GPU_SKIP).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sd_testutil import junit_outcomes

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900
GPU_SKIP = "no JAX GPU backend"  # the start of tests/jax/test_jax_gpu.py's GPU_SKIP


@pytest.mark.timeout(TIMEOUT_S + 60)  # the suite in a process of its own
def test_jax_suite(tmp_path):
    if importlib.util.find_spec("jax") is None:
        if os.environ.get("STOCHDEPTH_REQUIRE_JAX") == "1":
            pytest.fail("jax is not installed (STOCHDEPTH_REQUIRE_JAX=1)")
        pytest.skip("jax is not installed")
    xml = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(HERE / "jax"), "-q", "-rs", "-p",
           "no:cacheprovider", f"--basetemp={tmp_path / 'basetemp'}", f"--junitxml={xml}"]
    env = dict(os.environ, STOCHDEPTH_JAX_SUITE="1", KERAS_HOME=str(tmp_path / "keras_home"))
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the JAX suite failed (exit {proc.returncode})\n{output}"
    results = [(name, outcome, message) for cases in junit_outcomes(xml).values()
               for name, outcome, message in cases]
    counts = Counter(outcome for _, outcome, _ in results)
    assert counts["passed"] > 100, output
    unexpected = [r for r in results
                  if r[1] != "passed" and not (r[1] == "skipped" and r[2].startswith(GPU_SKIP))]
    assert not unexpected, unexpected
