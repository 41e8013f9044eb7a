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

ROWS: the two layers as Row objects (stochdepth.bench.rows), a builder per op taking the
tensors and settings (a namespace, see keras_adapter_rows); SECTION: this part of
`python -m stochdepth.bench` (--no-keras).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import types

from stochdepth.bench._util import short_error
from stochdepth.bench.rows import Row, Section

__all__ = ["ROWS", "SECTION", "keras_adapter_rows", "report"]

KERASFACTORY_SHAPE = (32, 64, 64, 128)  # the example in kerasfactory's docstring


def _time(fn, setup, reps, sync):
    """(median, min) ms of `reps` calls of fn(*setup()) after 2 warm-up calls; setup (or None)
    is not timed."""
    def args():
        return setup() if setup is not None else ()

    for _ in range(2):  # warm-up
        fn(*args())
    sync()
    times = []
    for _ in range(reps):
        a = args()
        t0 = time.perf_counter_ns()
        fn(*a)
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

    import stochdepth.keras  # noqa: F401 - missing, the section fails: kerasfactory alone is no row

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tdtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gen = torch.Generator(device="cpu").manual_seed(0)
    # What the builders read (as cpu_rows.CpuTensors for the CPU rows).
    d = types.SimpleNamespace(
        torch=torch, p=p, seed=seed, dtype_name=str(tdtype).replace("torch.", ""),
        shortcut=torch.randn(shape, generator=gen).to(device=dev, dtype=tdtype),
        residual=torch.randn(shape, generator=gen).to(device=dev, dtype=tdtype),
        grad=torch.randn(shape, generator=gen).to(device=dev, dtype=tdtype))
    n_bytes = d.shortcut.numel() * d.shortcut.element_size()
    fwd_bytes = n_bytes * (2.0 + p)
    bwd_bytes = n_bytes * (1.0 + p)

    rows = []
    with keras.device(str(dev)):
        for layer_row in ROWS:
            for op in ("forward", "forward+backward"):
                row = {"impl": layer_row.name, "op": op, "shape": tuple(shape),
                       "dtype": d.dtype_name, "p": float(p), "device": str(dev),
                       "backend": "torch", "reps": int(reps),
                       "bytes": fwd_bytes if op == "forward" else fwd_bytes + bwd_bytes}
                try:
                    fn, setup = layer_row.build(op, d)
                    row["median_ms"], row["min_ms"] = _time(fn, setup, reps, sync)
                except Exception as exc:  # noqa: BLE001 - report and carry on (kerasfactory)
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                rows.append(row)
    return rows


def _layer_ops(make_layer):
    """The ops of a layer `make_layer(d)`: [shortcut, residual] -> output, training=True."""

    def forward(d):
        layer, torch, sc, r = make_layer(d), d.torch, d.shortcut, d.residual

        def call():
            with torch.no_grad():
                layer([sc, r], training=True)

        return call, None

    def forward_backward(d):
        layer = make_layer(d)
        sc = d.shortcut.detach().requires_grad_()
        res = d.residual.detach().requires_grad_()
        grad = d.grad

        def call():
            sc.grad = res.grad = None
            layer([sc, res], training=True).backward(grad)

        return call, None

    return {"forward": forward, "forward+backward": forward_backward}


def _ours(d):
    import stochdepth.keras as sdk

    return sdk.StochasticDepth(d.p, seed=d.seed, dtype=d.dtype_name)


def _kerasfactory(d):
    from kerasfactory.layers import StochasticDepth

    return StochasticDepth(d.p, dtype=d.dtype_name)


ROWS = [
    Row("stochdepth.keras", "stochdepth.keras", framework="keras", ours=True,
        ops=_layer_ops(_ours)),
    Row("kerasfactory", "kerasfactory", framework="keras", anchor="kerasfactory",
        ops=_layer_ops(_kerasfactory)),
]


def report(p, reps):
    """Takes, prints and returns the rows: stochdepth.keras vs kerasfactory's layer on Keras's
    torch backend."""
    try:
        rows = keras_adapter_rows(KERASFACTORY_SHAPE, "float32", p, reps)
    except Exception as exc:  # noqa: BLE001 - keras or a backend missing: say so, carry on
        print(f"\nKeras rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    print(f"\nKeras layer on the torch backend, {KERASFACTORY_SHAPE} float32, p={p} "
          f"(median of {reps}, ms; not interleaved with a ceiling)")
    base = {(r["op"]): r.get("median_ms") for r in rows if r["impl"] == "kerasfactory"}
    for r in rows:
        if "error" in r:
            print(f"  {r['impl']:18s} {r['op']:17s} FAILED: {r['error']}")
            continue
        ref = base.get(r["op"])
        vs = ""
        if ref and r["impl"] != "kerasfactory":
            vs = f"  {ref / r['median_ms']:5.1f}x vs kerasfactory"
        print(f"  {r['impl']:18s} {r['op']:17s} {r['median_ms']:9.2f}{vs}")
    return {"shape": list(KERASFACTORY_SHAPE), "rows": rows}


def _skipped(args):
    if args.no_keras:
        return "disabled by --no-keras"
    if args.no_torch:
        return "needs torch, disabled by --no-torch"
    return None


SECTION = Section(key="keras", title="Keras rows (torch backend)", devices=("cpu",),
                  skipped=_skipped, run=lambda args: report(args.p, 3 if args.quick else 10))


if __name__ == "__main__":
    for r in keras_adapter_rows(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 10):
        timing = r.get("error") or f"{r['median_ms']:9.2f} ms (min {r['min_ms']:.2f})"
        print(f"{r['impl']:18s} {r['op']:17s} {timing}")
