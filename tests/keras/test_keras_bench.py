"""The Keras bench rows (stochdepth.bench.keras_rows) on a tiny case: they run, say what they
timed.

Only in the torch-backend process: the rows are taken on Keras's torch backend (elsewhere the
function would start a torch-backend subprocess, which the torch run covers anyway).
"""

from __future__ import annotations

import importlib.util

import keras
import pytest
from stochdepth.bench.keras_rows import keras_adapter_rows

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="the Keras bench rows are taken on the torch backend")


def test_keras_adapter_rows_tiny():
    rows = keras_adapter_rows((4, 2, 2, 8), "float32", 0.8, 2)
    assert [(r["impl"], r["op"]) for r in rows] == [
        ("stochdepth.keras", "forward"),
        ("stochdepth.keras", "forward+backward"),
        ("kerasfactory", "forward"),
        ("kerasfactory", "forward+backward"),
    ]
    has_kerasfactory = importlib.util.find_spec("kerasfactory") is not None
    for row in rows:
        assert row["shape"] == (4, 2, 2, 8) and row["dtype"] == "float32"
        assert row["backend"] == "torch" and row["bytes"] > 0
        if row["impl"] == "kerasfactory" and not has_kerasfactory:
            assert "error" in row
            continue
        assert "error" not in row, row
        assert 0 < row["min_ms"] <= row["median_ms"]
