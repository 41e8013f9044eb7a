"""The JAX bench rows (stochdepth.bench.jax_rows) on tiny cases: every row runs and reports a
positive time, and the Keras-on-JAX rows come from a KERAS_BACKEND=jax subprocess. Functional
only: no timing is judged here (docs/design.md, "Measuring speed")."""

from __future__ import annotations

import importlib.util
import math

import pytest
from stochdepth.bench.jax_rows import jax_rows, keras_jax_rows

HAS_KERAS = importlib.util.find_spec("keras") is not None
HAS_KERASFACTORY = importlib.util.find_spec("kerasfactory") is not None


def _ok(row):
    assert "error" not in row, row
    assert math.isfinite(row["median_ms"]) and 0 < row["min_ms"] <= row["median_ms"], row
    assert row["bytes"] > 0 and row["backend"] == "jax" and row["device"] == "cpu"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_rows_tiny(dtype):
    rows = jax_rows((8, 4, 16), dtype, 0.8, 2)
    ours, formula, numpy = "stochdepth.jax", "jax.jit formula", "stochdepth (NumPy)"
    donated, formula_donated = "stochdepth.jax (donated)", "jax.jit formula (donated)"
    assert [(r["impl"], r["op"]) for r in rows] == (
        [(impl, "forward") for impl in (ours, donated, formula, formula_donated, numpy)]
        + [(impl, "forward+backward") for impl in (ours, formula, numpy)]
        + [(impl, "block forward") for impl in (ours, donated, formula, formula_donated)])
    for row in rows:
        _ok(row)
        assert row["dtype"] == dtype


@pytest.mark.skipif(not HAS_KERAS, reason="needs keras")
def test_keras_jax_rows_tiny():
    rows = keras_jax_rows((4, 2, 2, 8), "float32", 0.8, 2)
    assert [(r["impl"], r["op"]) for r in rows] == [
        (impl, op) for impl in ("stochdepth.keras", "kerasfactory")
        for op in ("forward", "forward+backward", "forward+backward, g donated")
    ]
    for row in rows:
        if row["impl"] == "kerasfactory" and not HAS_KERASFACTORY:
            assert "kerasfactory" in row["error"]
        else:
            _ok(row)
