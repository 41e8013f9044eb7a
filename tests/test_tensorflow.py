"""Runs the TensorFlow ops suite (tests/tensorflow: stochdepth.tensorflow against the reference)
in a fresh process and fails when it fails, passes nothing, or skips anything. Separate because
TensorFlow and torch in one process can conflict (tests/tensorflow/conftest.py).

Where TensorFlow is not installed, or the build has no TensorFlow ops, this is a skip, unless
STOCHDEPTH_REQUIRE_TF=1 (CI sets it): then a failure, so that a build that silently left the
ops out cannot pass.
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

import stochdepth

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900
LIBRARY = Path(stochdepth.__file__).resolve().parent / "_tf_ops.so"


def _require_or_skip(message):
    if os.environ.get("STOCHDEPTH_REQUIRE_TF") == "1":
        pytest.fail(message + " (STOCHDEPTH_REQUIRE_TF=1)")
    pytest.skip(message)


def test_tf_ops_are_built_where_required():
    """The op library is part of the installed package wherever CI expects it."""
    if not LIBRARY.exists():
        _require_or_skip(f"this build has no TensorFlow ops ({LIBRARY} is missing)")


@pytest.mark.timeout(TIMEOUT_S + 60)  # the suite in a process of its own
def test_tensorflow_suite(tmp_path):
    if importlib.util.find_spec("tensorflow") is None:
        _require_or_skip("tensorflow is not installed")
    if not LIBRARY.exists():
        _require_or_skip(f"this build has no TensorFlow ops ({LIBRARY} is missing)")
    xml = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(HERE / "tensorflow"), "-q", "-rs", "-p",
           "no:cacheprovider", f"--basetemp={tmp_path / 'basetemp'}", f"--junitxml={xml}"]
    env = dict(os.environ, STOCHDEPTH_TF_SUITE="1", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the TensorFlow suite failed (exit {proc.returncode})\n{output}"
    results = [(name, outcome, message) for cases in junit_outcomes(xml).values()
               for name, outcome, message in cases]
    counts = Counter(outcome for _, outcome, _ in results)
    assert counts["passed"] > 100, output
    unexpected = [r for r in results if r[1] != "passed"]
    assert not unexpected, unexpected
