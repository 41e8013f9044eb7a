"""Benchmark stochdepth against what users run today, in one process and one run.

    python -m stochdepth.bench                          # CPU: cases past 2x the last-level cache
    python -m stochdepth.bench --device cuda            # GPU cases
    python -m stochdepth.bench --quick --cases small --json /tmp/b.json     # smoke test
    python -m stochdepth.bench --cases 64x197x768:float16 --ops fwd,bwd     # any shape/dtype
    python -m stochdepth.bench --plot bench.html        # % of ceiling per op, as a figure

Each op's rows are timed in rounds interleaved with the ceiling they are judged against (the
best of several copy / add / fill implementations, in the op's read/write mix), against the
real timm and torchvision where they import. What a row means: docs/design.md, "Measuring
speed". Modules: rows (Case, Row, Section; how to add a row or a section), cli (options, the
loop), env (what the run has), cases (shapes, ops, bytes), the rows: cpu_rows, cuda_rows,
anchors, ceiling, jax_rows, keras_rows; timing, machine, report (header, tables, JSON), plot.
"""

from __future__ import annotations

from stochdepth.bench.cases import CASES, DEFAULT_CASES, OPS, ceiling_models, op_bytes, parse_case
from stochdepth.bench.cli import main, parse_args, run

__all__ = ["CASES", "DEFAULT_CASES", "OPS", "ceiling_models", "main", "op_bytes", "parse_args",
           "parse_case", "run"]
