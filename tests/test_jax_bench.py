"""The JAX bench rows (stochdepth.bench.jax_rows) on tiny cases: every row runs and reports a
positive time, the Keras-on-JAX rows come from a KERAS_BACKEND=jax subprocess, and
`python -m stochdepth.bench --quick` writes them to its JSON. Functional only: no timing is
judged here (docs/design.md, "Measuring speed")."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("jax")
from stochdepth.bench.jax_rows import jax_rows, keras_jax_rows  # noqa: E402

HAS_KERAS = importlib.util.find_spec("keras") is not None
HAS_KERASFACTORY = importlib.util.find_spec("kerasfactory") is not None


def _ok(row):
    assert "error" not in row, row
    assert math.isfinite(row["median_ms"]) and 0 < row["min_ms"] <= row["median_ms"], row
    assert row["bytes"] > 0 and row["backend"] == "jax" and row["device"] == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_rows_tiny(dtype):
    rows = jax_rows((8, 4, 16), dtype, 0.8, 2)
    assert [(r["impl"], r["op"]) for r in rows] == [
        (impl, op) for op in ("forward", "forward+backward")
        for impl in ("stochdepth.jax", "jax.jit formula", "stochdepth (NumPy)")
    ]
    for row in rows:
        _ok(row)
        assert row["dtype"] == dtype


@pytest.mark.skipif(not HAS_KERAS, reason="needs keras")
def test_keras_jax_rows_tiny():
    rows = keras_jax_rows((4, 2, 2, 8), "float32", 0.8, 2)
    assert [(r["impl"], r["op"]) for r in rows] == [
        (impl, op) for impl in ("stochdepth.keras", "kerasfactory")
        for op in ("forward", "forward+backward")
    ]
    for row in rows:
        if row["impl"] == "kerasfactory" and not HAS_KERASFACTORY:
            assert "kerasfactory" in row["error"]
        else:
            _ok(row)


def test_cli_quick_writes_the_jax_rows(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "stochdepth.bench", "--quick", "--cases", "small", "--no-torch",
           "--no-keras", "--no-progress", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "JAX on the CPU" in proc.stdout
    data = json.loads(out.read_text())
    rows = data["jax"]["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"} and len(rows) == 12
    for row in rows:
        _ok(row)
    assert "keras_rows" not in data["jax"]  # --no-keras skips the Keras-on-JAX rows
