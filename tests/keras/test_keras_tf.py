"""The Keras layer on the TensorFlow backend runs stochdepth.tensorflow: its traced step holds the
library's custom op (no integer-op Philox), outputs and gradients equal `stochdepth.reference`
bit for bit, and the Keras-ops path it falls back to (no TensorFlow ops in the build, or inside
an XLA-compiled function) gives the same outputs. The op has no XLA kernel: Keras leaves XLA off
for a model with the layer, and an explicit jit_compile=True is turned off with Keras's warning.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, pair, to_np
from stochdepth.keras import StochasticDepth

from stochdepth import reference

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow backend specifics")

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _tf():
    import tensorflow as tf

    return tf


def test_tf_layer_uses_the_ops_where_built():
    """The layer takes the ops wherever the build has them (CI: STOCHDEPTH_REQUIRE_TF=1)."""
    layer = StochasticDepth(0.5, seed=1)
    if os.environ.get("STOCHDEPTH_REQUIRE_TF") == "1":
        assert layer._use_tf_ops
    assert layer.supports_jit is not layer._use_tf_ops


def test_tf_layer_step_is_the_custom_op(rng):
    tf = _tf()
    a, b = pair(rng, (6, 4))
    layer = StochasticDepth(0.5, seed=3)
    if not layer._use_tf_ops:
        pytest.skip("no TensorFlow ops in this build")  # fails the outer run: not allowed
    fn = tf.function(lambda a, b: layer([a, b], training=True))
    ops = {op.type for op in fn.get_concrete_function(a, b).graph.get_operations()}
    assert "StochdepthResidual" in ops
    assert "BitwiseXor" not in ops  # no Philox in integer ops


def test_tf_layer_calls_the_public_apply(rng, monkeypatch):
    """The hook calls stochdepth.tensorflow.apply with the layer's OpConfig and the words of
    its (seed, step), and nothing private of the TensorFlow adapter."""
    layer = StochasticDepth(0.25, seed=2**35 + 3, mode="batch", scaling="training", axis=-1)
    if not layer._use_tf_ops:
        pytest.skip("no TensorFlow ops in this build")  # fails the outer run: not allowed
    import stochdepth.tensorflow as sdt
    from stochdepth._op import OpConfig

    calls = []
    real = sdt.apply

    def spy(shortcut, residual, words, config):
        calls.append((to_np(words).tolist(), config))
        return real(shortcut, residual, words, config)

    monkeypatch.setattr(sdt, "apply", spy)
    sc, res = pair(rng, (4, 6))
    for n in range(2):
        out = to_np(layer([sc, res], training=True))
        assert_same(out, reference.forward(sc, res, 0.25, seed=2**35 + 3, offset=n, mode="batch",
                                           scaling="training", axis=-1))
    layer([sc, res], training=False)
    config = OpConfig(0.25, "batch", -1, "training", True)
    assert calls[0] == ([3, 8, 0, 0], config)
    assert calls[1] == ([3, 8, 1, 0], config)
    assert calls[2][1] == OpConfig(0.25, "batch", -1, "training", False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_tf_ops_and_fallback_paths_are_bit_identical(rng, dtype, scaling, mode):
    tf = _tf()
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    sc, res = pair(rng, (16, 3, 2))
    sc, res = sc.astype(np_dtype), res.astype(np_dtype)
    outs = {}
    for use_ops in (True, False):
        layer = StochasticDepth(0.5, seed=2**40 + 7, scaling=scaling, mode=mode, axis=1,
                                dtype=dtype)
        layer._use_tf_ops = layer._use_tf_ops and use_ops
        step = tf.function(lambda a, b, layer=layer: layer([a, b], training=True))
        a, b = tf.constant(sc), tf.constant(res)
        outs[use_ops] = [to_np(layer([a, b], training=True)), to_np(step(a, b)),
                         to_np(layer([a, b], training=False))]
    for n in range(2):
        want = reference.forward(sc, res, 0.5, seed=2**40 + 7, offset=n, scaling=scaling,
                                 mode=mode, axis=1)
        assert_same(outs[True][n], want)
        assert_same(outs[False][n], want)
    want = reference.forward(sc, res, 0.5, training=False, scaling=scaling, axis=1)
    assert_same(outs[True][2], want)
    assert_same(outs[False][2], want)


@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_tf_gradients_are_the_backward_kernel(rng, scaling):
    tf = _tf()
    sc, res = pair(rng, (16, 5))
    w = rng.standard_normal(sc.shape).astype(np.float32)
    layer = StochasticDepth(0.5, seed=8, scaling=scaling)
    a, b = tf.constant(sc), tf.constant(res)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        out = layer([a, b], training=True)
    g_sc, g_res = tape.gradient(out, [a, b], output_gradients=tf.constant(w))
    assert_same(to_np(g_sc), w)
    assert_same(to_np(g_res), reference.backward(w, 0.5, seed=8, offset=0, scaling=scaling)[1])


def test_tf_xla_function_takes_the_fallback_path(rng):
    """Inside tf.function(jit_compile=True) the op has no kernel: the layer uses Keras ops."""
    tf = _tf()
    sc, res = pair(rng, (32, 4))
    layer = StochasticDepth(0.5, seed=99)
    step = tf.function(lambda a, b: layer([a, b], training=True), jit_compile=True)
    for n in range(3):
        out = to_np(step(tf.constant(sc), tf.constant(res)))
        assert_same(out, reference.forward(sc, res, 0.5, seed=99, offset=n))


def _model(seed):
    import keras

    inputs = keras.Input((8,))
    branch = keras.layers.Dense(8)(inputs)
    x = StochasticDepth(0.5, seed=seed)([inputs, branch])
    return keras.Model(inputs, keras.layers.Dense(1)(x))


def test_tf_fit_with_default_jit_compile_leaves_xla_off(rng):
    model = _model(4)
    model.compile(optimizer="sgd", loss="mse")  # jit_compile="auto"
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = rng.standard_normal((32, 1)).astype(np.float32)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    if model.layers[2]._use_tf_ops:
        assert model.jit_compile is False
    assert int(to_np(model.layers[2].seed_generator.state)[1]) == 4


def test_tf_fit_with_explicit_jit_compile(rng):
    model = _model(5)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    y = rng.standard_normal((16, 1)).astype(np.float32)
    if model.layers[2]._use_tf_ops:
        with pytest.warns(UserWarning, match="Model doesn't support `jit_compile=True`"):
            model.compile(optimizer="sgd", loss="mse", jit_compile=True)
        assert model.jit_compile is False
    else:  # the Keras-ops path compiles with XLA
        model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert np.isfinite(model.predict(x, verbose=0)).all()



def test_tf_bench_rows_tiny():
    """The Keras-on-TensorFlow bench rows (stochdepth.bench.tf_rows) run on a tiny case, in
    this process's TensorFlow backend, and say which path the layer took. Not timed here."""
    import importlib.util

    from stochdepth.bench.tf_rows import keras_tf_rows

    rows = keras_tf_rows((4, 2, 2, 8), "float32", 0.8, 2)
    assert [(r["impl"], r["op"]) for r in rows] == [
        ("stochdepth.keras", "forward"),
        ("stochdepth.keras", "forward+backward"),
        ("kerasfactory", "forward"),
        ("kerasfactory", "forward+backward"),
    ]
    has_kerasfactory = importlib.util.find_spec("kerasfactory") is not None
    uses_ops = StochasticDepth(0.8)._use_tf_ops
    for row in rows:
        assert row["shape"] == (4, 2, 2, 8) and row["dtype"] == "float32"
        assert row["backend"] == "tensorflow" and row["bytes"] > 0
        if row["impl"] == "stochdepth.keras":
            assert row["path"] == ("tf ops" if uses_ops else "keras ops")
        if row["impl"] == "kerasfactory" and not has_kerasfactory:
            assert "error" in row
            continue
        assert "error" not in row, row
        assert 0 < row["min_ms"] <= row["median_ms"]
