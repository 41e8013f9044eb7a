"""Keras model train steps for `python -m stochdepth.bench` (CPU): the layer inside a small model,
on the torch, JAX and TensorFlow backends, against the same model with kerasfactory's layer.

The op rows (keras_rows, jax_rows, tf_rows) time the layer alone; a user trains a model. Here
each backend trains `depth` pre-norm residual blocks, `x = sd([x, Dense(LayerNorm(x))])`, on
(batch, side, side, channels) float32 (rank 4: the one rank where kerasfactory draws per sample),
with `model.compile(optimizer=SGD, loss="mse")` and Keras's default `jit_compile` ("auto": XLA
on JAX; on TensorFlow a `tf.function`, without XLA where the library's layer runs the TensorFlow
ops, which say `supports_jit = False`; eager on torch). A row is the median of `reps`
`model.train_on_batch` calls after warm-up, the two models' calls interleaved one by one.

- "stochdepth.keras"  stochdepth.keras.StochasticDepth(p, seed=...)
- "kerasfactory"      kerasfactory.layers.StochasticDepth(p, seed=...) (0.1.1)

Each backend runs in a subprocess with KERAS_BACKEND set (Keras picks its backend once per
process). Rows: impl, backend, shape, depth, p, reps, median_ms, min_ms, or "error".
SECTION: this part of the benchmark (--no-keras; --no-torch, --no-jax, --no-tf leave a backend
out).
"""

from __future__ import annotations

import time

from stochdepth.bench._util import median, short_error
from stochdepth.bench.keras_rows import rows_in_subprocess
from stochdepth.bench.rows import Section

__all__ = ["BACKENDS", "SECTION", "model_step_rows", "report"]

BACKENDS = ("torch", "jax", "tensorflow")
SHAPE = (16, 14, 14, 384)  # ViT-S/16 width, 196 tokens as a 14 x 14 grid
QUICK_SHAPE = (4, 4, 4, 16)
DEPTH = 2
IMPLS = ("stochdepth.keras", "kerasfactory")


def _layer(impl, p, seed):
    if impl == "stochdepth.keras":
        import stochdepth.keras as sdk

        return sdk.StochasticDepth(p, seed=seed)
    from kerasfactory.layers import StochasticDepth

    return StochasticDepth(p, seed=seed)


def _model(impl, shape, depth, p, seed):
    import keras

    inp = keras.Input(shape[1:])
    x = inp
    for i in range(depth):
        r = keras.layers.Dense(shape[-1])(keras.layers.LayerNormalization()(x))
        x = _layer(impl, p, seed + i)([x, r])
    model = keras.Model(inp, x)
    model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
    return model


def _rows_here(shape, depth, p, reps, seed):
    """The rows of this process's Keras backend (the subprocess's entry)."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    y = rng.standard_normal(shape).astype("float32")
    steps, rows = {}, {}
    for impl in IMPLS:
        rows[impl] = {"impl": impl, "backend": backend, "shape": list(shape), "depth": depth,
                      "p": p, "reps": reps}
        try:
            keras.utils.set_random_seed(0)
            model = _model(impl, shape, depth, p, seed)
            for _ in range(3):  # the first call traces and compiles
                model.train_on_batch(x, y)
            steps[impl] = model
        except Exception as exc:  # noqa: BLE001 - kerasfactory missing, a failing model: a row
            rows[impl]["error"] = short_error(exc)
    times = {impl: [] for impl in steps}
    for _ in range(reps):
        for impl, model in steps.items():
            t0 = time.perf_counter_ns()
            model.train_on_batch(x, y)  # returns host values: the step has finished
            times[impl].append((time.perf_counter_ns() - t0) / 1e6)
    for impl, ts in times.items():
        rows[impl].update(median_ms=median(ts), min_ms=min(ts))
    return list(rows.values())


def model_step_rows(backend, shape=SHAPE, depth=DEPTH, p=0.8, reps=10, *, seed=1234):
    return rows_in_subprocess(
        backend, "stochdepth.bench.keras_model_rows",
        f"_rows_here({tuple(shape)!r}, {int(depth)!r}, {float(p)!r}, {int(reps)!r}, "
        f"{int(seed)!r})")


def report(p, reps, *, quick=False, backends=BACKENDS):
    """Takes, prints and returns the rows of each backend (a backend that fails is reported)."""
    shape = QUICK_SHAPE if quick else SHAPE
    print(f"\nKeras model train step (SGD, {DEPTH} residual blocks Dense(LayerNorm(x)), {shape} "
          f"float32, p={p}; median of {reps} interleaved steps, ms)")
    out = {"shape": list(shape), "depth": DEPTH, "rows": [], "errors": {}}
    for backend in backends:
        try:
            rows = model_step_rows(backend, shape, DEPTH, p, reps)
        except Exception as exc:  # noqa: BLE001 - a backend missing: say so, carry on
            print(f"  {backend:10s} skipped: {short_error(exc)}")
            out["errors"][backend] = short_error(exc)
            continue
        base = next((r.get("median_ms") for r in rows if r["impl"] == "kerasfactory"), None)
        for r in rows:
            if "error" in r:
                print(f"  {backend:10s} {r['impl']:18s} FAILED: {r['error']}")
                continue
            vs = (f"  {base / r['median_ms']:5.2f}x vs kerasfactory"
                  if base and r["impl"] != "kerasfactory" else "")
            print(f"  {backend:10s} {r['impl']:18s} {r['median_ms']:9.2f}{vs}")
        out["rows"] += rows
    return out


def _backends(args):
    """The backends the options leave in (--no-torch, --no-jax, --no-tf)."""
    off = {"torch": args.no_torch, "jax": args.no_jax, "tensorflow": args.no_tf}
    return tuple(b for b in BACKENDS if not off[b])


def _skipped(args):
    if args.no_keras:
        return "disabled by --no-keras"
    return None if _backends(args) else "every backend disabled (--no-torch, --no-jax, --no-tf)"


SECTION = Section(
    key="keras_model", title="Keras model train steps", devices=("cpu",), skipped=_skipped,
    run=lambda args: report(args.p, 3 if args.quick else 10, quick=args.quick,
                            backends=_backends(args)))
