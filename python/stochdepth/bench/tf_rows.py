"""Keras-on-TensorFlow rows for `python -m stochdepth.bench` (CPU): the layer on Keras's
TensorFlow backend against kerasfactory's, on the same tensors, beside the torch and JAX rows.

`keras_tf_rows(shape, dtype, p, reps)` times, each for "forward" and "forward+backward" (a
`tf.GradientTape` gradient with a given upstream gradient), both in a `tf.function` as a
training step runs them (no XLA: the layer says `supports_jit = False` where it runs the
TensorFlow ops),

- "stochdepth.keras"  stochdepth.keras.StochasticDepth(p, seed=...): the TensorFlow custom ops
                      where the build has them (the row's "path": "tf ops"), else the Keras-ops
                      path ("keras ops")
- "kerasfactory"      kerasfactory.layers.StochasticDepth(p, seed=...) (0.1.1; an "error" row
                      when kerasfactory is not installed)

in a subprocess with KERAS_BACKEND=tensorflow unless this process's Keras already is on
TensorFlow. Rank 4, as in keras_rows: the one rank where kerasfactory draws per sample.

Rows: impl, op, shape, dtype, p, device ("cpu"), backend ("tensorflow"), reps, median_ms,
min_ms, bytes (the traffic stochdepth's kernels need, as in keras_rows), or "error".

KERAS_ROWS: the two layers as Row objects (stochdepth.bench.rows), a builder per op taking the
tensors (a namespace: see _keras_rows_here); SECTION: this part of `python -m stochdepth.bench`
(--no-keras, --no-tf).
"""

from __future__ import annotations

import sys
import types

from stochdepth.bench._util import short_error
from stochdepth.bench.jax_rows import QUICK_KERAS_CASE, _print
from stochdepth.bench.keras_rows import KERASFACTORY_SHAPE, _time, rows_in_subprocess
from stochdepth.bench.rows import Row, Section

__all__ = ["KERAS_ROWS", "SECTION", "keras_tf_rows", "report"]

OPS = ("forward", "forward+backward")


def _layer_ops(make_layer):
    """The ops of a Keras layer on the TensorFlow backend: its training call in a tf.function
    (forward) and the gradients of both inputs for a given upstream gradient
    (forward+backward). TensorFlow runs a function on the CPU synchronously: the call returns
    when the step is done."""

    def build(d, op):
        tf = d.tf
        layer = make_layer(d)
        a, b, g = d.a, d.b, d.g
        if op == "forward":
            fn = tf.function(lambda a, b: layer([a, b], training=True))
            return (lambda: fn(a, b)), None

        @tf.function
        def fn(a, b, g):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                out = layer([a, b], training=True)
            return tape.gradient(out, [a, b], output_gradients=g)

        return (lambda: fn(a, b, g)), None

    return {op: (lambda d, op=op: build(d, op)) for op in OPS}


def _keras_ours(d):
    import stochdepth.keras as sdk

    return sdk.StochasticDepth(d.p, seed=d.seed, dtype=d.dtype)


def _kerasfactory(d):
    from kerasfactory.layers import StochasticDepth

    return StochasticDepth(d.p, seed=d.seed, dtype=d.dtype)


KERAS_ROWS = [
    Row("stochdepth.keras", "stochdepth.keras", framework="keras", ours=True,
        ops=_layer_ops(_keras_ours)),
    Row("kerasfactory", "kerasfactory", framework="keras", anchor="kerasfactory",
        ops=_layer_ops(_kerasfactory)),
]


def _row(impl, op, shape, dtype, p, reps, n_bytes):
    fwd = n_bytes * (2.0 + p)
    return {"impl": impl, "op": op, "shape": tuple(shape), "dtype": dtype, "p": float(p),
            "device": "cpu", "backend": "tensorflow", "reps": int(reps),
            "bytes": fwd if op == "forward" else fwd + n_bytes * (1.0 + p)}


def _keras_rows_here(shape, dtype, p, reps, seed):
    import numpy as np
    import tensorflow as tf

    import stochdepth.keras as sdk  # missing, the rows fail: kerasfactory alone is no row

    rng = np.random.default_rng(0)
    a, b, g = (tf.constant(rng.standard_normal(shape).astype(dtype)) for _ in range(3))
    n_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    d = types.SimpleNamespace(tf=tf, p=p, seed=seed, dtype=dtype, a=a, b=b, g=g)
    path = "tf ops" if sdk.StochasticDepth(p)._use_tf_ops else "keras ops"
    rows = []
    with tf.device("/CPU:0"):
        for row in KERAS_ROWS:
            for op in OPS:
                r = _row(row.name, op, shape, dtype, p, reps, n_bytes)
                if row.ours:
                    r["path"] = path
                try:
                    fn, setup = row.ops[op](d)
                    r["median_ms"], r["min_ms"] = _time(fn, setup, reps, lambda: None)
                except Exception as exc:  # noqa: BLE001 - report and carry on (kerasfactory)
                    r["error"] = short_error(exc)
                rows.append(r)
    return rows


def keras_tf_rows(shape=KERASFACTORY_SHAPE, dtype="float32", p=0.8, reps=10, *, seed=1234):
    """The rows (dicts) of the two layers on Keras's TensorFlow backend (module docstring)."""
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() == "tensorflow":
            return _keras_rows_here(shape, dtype, p, reps, seed)
    return rows_in_subprocess(
        "tensorflow", "stochdepth.bench.tf_rows",
        f"_keras_rows_here({tuple(shape)!r}, {dtype!r}, {float(p)!r}, {int(reps)!r}, "
        f"{int(seed)!r})")


def report(p, reps, *, quick=False):
    """Takes, prints and returns the rows: stochdepth.keras vs kerasfactory's layer on Keras's
    TensorFlow backend."""
    shape = QUICK_KERAS_CASE if quick else KERASFACTORY_SHAPE
    try:
        rows = keras_tf_rows(shape, "float32", p, reps)
    except Exception as exc:  # noqa: BLE001 - keras or TensorFlow missing: say so, carry on
        print(f"\nKeras (TensorFlow backend) rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    path = next((r["path"] for r in rows if "path" in r), "?")
    _print(f"\nKeras layer on the TensorFlow backend ({path}), {shape} float32, p={p} (median "
           f"of {reps}, ms; not interleaved with a ceiling)", rows, "kerasfactory")
    return {"shape": list(shape), "rows": rows}


def _skipped(args):
    if args.no_keras:
        return "disabled by --no-keras"
    if args.no_tf:
        return "disabled by --no-tf"
    return None


SECTION = Section(key="keras_tf", title="Keras rows (TensorFlow backend)", devices=("cpu",),
                  skipped=_skipped,
                  run=lambda args: report(args.p, 3 if args.quick else 10, quick=args.quick))
