"""`python -m stochdepth.bench --quick` takes the JAX rows and writes them to its JSON (in a
subprocess, like every CLI test). The rows themselves: tests/jax/test_jax_bench_rows.py.
Functional only: no timing is judged (docs/design.md, "Measuring speed")."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax")


def _ok(row):
    assert "error" not in row, row
    assert math.isfinite(row["median_ms"]) and 0 < row["min_ms"] <= row["median_ms"], row
    assert row["bytes"] > 0 and row["backend"] == "jax" and row["device"] == "cpu"


def test_cli_quick_writes_the_jax_rows(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "stochdepth.bench", "--quick", "--cases", "small", "--no-torch",
           "--no-keras", "--no-progress", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "JAX on the CPU" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["jax"]["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"} and len(rows) == 24
    for row in rows:
        _ok(row)
    assert "keras_rows" not in data["jax"]  # --no-keras skips the Keras-on-JAX rows
