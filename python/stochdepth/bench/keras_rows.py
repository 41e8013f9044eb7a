"""Timing rows for the Keras adapter, for `python -m stochdepth.bench` (imports keras and torch).

`keras_adapter_rows(shape, dtype, p, reps)` times, on the same tensors and on Keras's torch
backend, the layer call `layer([shortcut, residual], training=True)` of

- "stochdepth.keras"       stochdepth.keras.StochasticDepth(p, seed=...)
- "kerasfactory"           kerasfactory.layers.StochasticDepth(p) (0.1.1; skipped with an
                           "error" row when kerasfactory is not installed)

each for "forward" (under torch.no_grad) and "forward+backward" (autograd, out.backward(grad)).
Both use the paper's convention (scaling="inference": kept samples get the residual unscaled),
which is kerasfactory's. Rank 4 is the one rank where kerasfactory draws per sample.

Keras picks its backend once per process: when this process already imported keras with
another backend, the rows are taken in a subprocess with KERAS_BACKEND=torch.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

__all__ = ["keras_adapter_rows"]

KERASFACTORY_SHAPE = (32, 64, 64, 128)  # the example in kerasfactory's docstring


def _time(fn, reps, sync):
    for _ in range(2):  # warm-up
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        sync()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times), min(times)


def _keras_is_torch_here():
    """Whether this process can use Keras's torch backend (importing keras if needed)."""
    if "keras" not in sys.modules:
        if os.environ.get("KERAS_BACKEND", "torch") != "torch":
            return False
        os.environ["KERAS_BACKEND"] = "torch"
    import keras

    return keras.backend.backend() == "torch"


def rows_in_subprocess(backend, module, call):
    """The rows of `<module>.<call>` computed in a fresh interpreter with KERAS_BACKEND=backend.

    Keras picks its backend once per process, so rows for another backend than this process's
    come from a child that prints them as one JSON line.
    """
    code = (
        "import json, sys\n"
        f"import {module} as rows_module\n"
        f"rows = rows_module.{call}\n"
        "sys.stdout.write('\\nROWS ' + json.dumps(rows))\n"
    )
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("ROWS "):
            rows = json.loads(line[5:])
            for row in rows:
                row["shape"] = tuple(row["shape"])
            return rows
    raise RuntimeError(f"keras ({backend}) bench subprocess failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")


def keras_adapter_rows(shape=KERASFACTORY_SHAPE, dtype="float32", p=0.8, reps=10, *,
                       device="cpu", seed=1234):
    """Rows (dicts) of forward and forward+backward timings of the two Keras layers.

    Each row: impl, op ("forward" | "forward+backward"), shape, dtype, p, device, backend
    ("torch"), reps, median_ms, min_ms, bytes (what stochdepth's kernels must move: forward
    shortcut + kept residual rows + output; backward kept rows of grad_out + grad_residual, p
    taken as the kept fraction; the same count for both impls so GB/s compare like for like),
    or "error" instead of the timings.
    """
    if not _keras_is_torch_here():
        return rows_in_subprocess(
            "torch", "stochdepth.bench.keras_rows",
            f"keras_adapter_rows({tuple(shape)!r}, {dtype!r}, {float(p)!r}, {int(reps)!r}, "
            f"device={device!r}, seed={int(seed)!r})")

    import keras
    import torch

    import stochdepth.keras as sdk

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tdtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    shortcut = torch.randn(shape, generator=gen).to(device=dev, dtype=tdtype)
    residual = torch.randn(shape, generator=gen).to(device=dev, dtype=tdtype)
    grad = torch.randn(shape, generator=gen).to(device=dev, dtype=tdtype)
    n_bytes = shortcut.numel() * shortcut.element_size()
    fwd_bytes = n_bytes * (2.0 + p)
    bwd_bytes = n_bytes * (1.0 + p)
    dtype_name = str(tdtype).replace("torch.", "")

    def ours():
        return sdk.StochasticDepth(p, seed=seed, dtype=dtype_name)

    def kerasfactory():
        from kerasfactory.layers import StochasticDepth

        return StochasticDepth(p, dtype=dtype_name)

    rows = []
    with keras.device(str(dev)):
        for name, make in (("stochdepth.keras", ours), ("kerasfactory", kerasfactory)):
            for op in ("forward", "forward+backward"):
                row = {"impl": name, "op": op, "shape": tuple(shape), "dtype": dtype_name,
                       "p": float(p), "device": str(dev), "backend": "torch", "reps": int(reps),
                       "bytes": fwd_bytes if op == "forward" else fwd_bytes + bwd_bytes}
                try:
                    layer = make()
                    if op == "forward":
                        def call(layer=layer):
                            with torch.no_grad():
                                layer([shortcut, residual], training=True)
                    else:
                        sc = shortcut.detach().requires_grad_()
                        res = residual.detach().requires_grad_()

                        def call(layer=layer, sc=sc, res=res):
                            sc.grad = res.grad = None
                            layer([sc, res], training=True).backward(grad)
                    row["median_ms"], row["min_ms"] = _time(call, reps, sync)
                except Exception as exc:  # noqa: BLE001 - report and carry on (kerasfactory)
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
    return rows


if __name__ == "__main__":
    for r in keras_adapter_rows(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 10):
        timing = r.get("error") or f"{r['median_ms']:9.2f} ms (min {r['min_ms']:.2f})"
        print(f"{r['impl']:18s} {r['op']:17s} {timing}")
