"""stochdepth.keras.StochasticResidual on the backend named by KERAS_BACKEND (see conftest.py):
the wrapped layer runs on the kept samples only, training call n uses the mask of
(seed, offset=n) and gives `reference.forward_kept` of the layer's rows; inference is
x + c * layer(x); compiled steps (a fresh mask per step; on JAX one compilation over many
steps, the layer traced once per bucket); gradients against the dense formulation; a stateful
wrapped layer; models, fit and `.keras` files; errors (docs/design.md, "Skipping dropped
samples").
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, to_np
from stochdepth._buckets import bucket_sizes
from stochdepth.keras import StochasticDepth, StochasticResidual

import stochdepth
from stochdepth import reference


@keras.saving.register_keras_serializable(package="stochdepth_tests")
class RowScale(keras.layers.Layer):
    """z * w with w of shape (channels,): one multiply per element (no FMA to contract, the
    same bits at any batch size), so the expected rows are x[keep] * w in NumPy. Records the
    batch sizes it is called (or traced) with."""

    def __init__(self, init=1.5, **kwargs):
        super().__init__(**kwargs)
        self.init = init
        self.calls = []

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],),
                                 initializer=keras.initializers.Constant(self.init))

    def call(self, z):
        self.calls.append(z.shape[0])
        return z * self.w

    def get_config(self):
        return {**super().get_config(), "init": self.init}


def _x(rng, shape=(32, 4)):
    return rng.standard_normal(shape).astype(np.float32)


def _want(x, p, seed, offset, w=1.5, **kw):
    keep = stochdepth.mask(x.shape[0], p, seed=seed, offset=offset, mode=kw.get("mode", "row"))
    return reference.forward_kept(x, x[keep] * np.float32(w), p, seed=seed, offset=offset, **kw)


# ---- eager calls


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_training_calls_match_forward_kept(rng, mode, scaling):
    x = _x(rng)
    inner = RowScale()
    layer = StochasticResidual(inner, 0.6, seed=17, mode=mode, scaling=scaling)
    for step in range(4):
        out = to_np(layer(x, training=True))
        assert_same(out, _want(x, 0.6, 17, step, mode=mode, scaling=scaling))
        count = int(stochdepth.mask(32, 0.6, seed=17, offset=step, mode=mode).sum())
        if count:  # eagerly the layer runs on exactly the kept samples; nothing kept: not at all
            assert inner.calls[-1] == count
    assert int(to_np(layer.seed_generator.state)[1]) == 4


def test_large_seed_and_seed_zero(rng):
    x = _x(rng)
    for seed in (0, 2**40 + 2**31 + 5):
        layer = StochasticResidual(RowScale(), 0.5, seed=seed)
        assert_same(to_np(layer(x, training=True)), _want(x, 0.5, seed, 0))
        assert_same(to_np(layer(x, training=True)), _want(x, 0.5, seed, 1))


@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_inference_is_x_plus_c_layer(rng, scaling):
    x = _x(rng)
    layer = StochasticResidual(RowScale(), 0.3, seed=1, scaling=scaling)
    want = reference.forward(x, x * np.float32(1.5), 0.3, training=False, scaling=scaling)
    assert_same(to_np(layer(x)), want)
    assert_same(to_np(layer(x, training=False)), want)
    assert int(to_np(layer.seed_generator.state)[1]) == 0  # inference does not advance


def test_dropped_samples_are_x_even_with_inf(rng):
    x = _x(rng)
    keep = stochdepth.mask(32, 0.5, seed=4, offset=0)
    x[~keep] = np.inf  # the layer never sees them: inf * w is not computed
    out = to_np(StochasticResidual(RowScale(), 0.5, seed=4)(x, training=True))
    assert_same(out, _want(x, 0.5, 4, 0))


def test_unseeded_layers_draw_fresh_masks(rng):
    x = np.zeros((64, 2), np.float32) + 1
    layer = StochasticResidual(RowScale(), 0.5)
    masks = {tuple(to_np(layer(x, training=True))[:, 0] != 1) for _ in range(4)}
    assert len(masks) == 4


# ---- compiled steps


def _compiled_steps(layer, x, steps):
    """Outputs of `steps` training calls inside the backend's compiler (torch: eager calls;
    Keras compiles nothing there, and model.fit is tested below)."""
    if BACKEND == "jax":
        import jax

        @jax.jit
        def step(tv, nt, x):
            return layer.stateless_call(tv, nt, x, training=True)

        tv = [v.value for v in layer.trainable_variables]
        nt = [v.value for v in layer.non_trainable_variables]
        outs = []
        for _ in range(steps):
            out, nt = step(tv, nt, x)
            outs.append(to_np(out))
        assert step._cache_size() == 1  # one compilation for every step
        return outs
    if BACKEND == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None,) + x.shape[1:], tf.float32)  # a dynamic batch size
        step = tf.function(lambda x: layer(x, training=True), input_signature=[spec])
        return [to_np(step(x)) for _ in range(steps)]
    return [to_np(layer(x, training=True)) for _ in range(steps)]


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_compiled_steps_fresh_mask_each_step(rng, mode, scaling):
    x = _x(rng, (48, 3))
    inner = RowScale()
    layer = StochasticResidual(inner, 0.7, seed=23, mode=mode, scaling=scaling)
    layer.build(x.shape)
    steps = 12
    for step, out in enumerate(_compiled_steps(layer, x, steps)):
        want = _want(x, 0.7, 23, step, mode=mode, scaling=scaling)
        keep = stochdepth.mask(48, 0.7, seed=23, offset=step, mode=mode)
        assert_same(out[~keep], x[~keep])  # dropped samples: x, exactly
        if scaling == "inference" or BACKEND != "tensorflow":  # the kernels: exact
            assert_same(out, want)
        else:  # TensorFlow's graph may contract x + s * (z * w) into FMAs: the last bits
            # only (docs/design.md, "Arithmetic"); the dropped rows above stay exact
            np.testing.assert_allclose(out, want, rtol=2**-22, atol=0)
    if BACKEND == "jax":
        # Traced once per bucket size (plus one abstract trace for the output type).
        sizes = bucket_sizes(48, 0.7, mode=mode)
        assert set(inner.calls) == set(sizes)
        assert len(inner.calls) <= len(sizes) + 1


# ---- gradients


def _grads(layer, x, g):
    """(d sum(out * g) / d x, d ... / d the wrapped layer's weight) for one training call."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        nt = [v.value for v in layer.non_trainable_variables]

        def loss(tv, x):
            out, _ = layer.stateless_call(tv, nt, x, training=True)
            return jnp.sum(out * g)

        tv = [v.value for v in layer.trainable_variables]
        gtv, gx = jax.grad(loss, argnums=(0, 1))(tv, jnp.asarray(x))
        return gx, gtv[0]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        a = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(a)
            loss = tf.reduce_sum(layer(a, training=True) * g)
        return tape.gradient(loss, [a, layer.trainable_variables[0]])
    import torch

    a = torch.tensor(x, requires_grad=True)
    (layer(a, training=True) * torch.tensor(g)).sum().backward()
    return a.grad, layer.trainable_variables[0].value.grad


class _Dense(keras.layers.Layer):
    """StochasticDepth([x, layer(x)]): the dense formulation, for the gradients."""

    def __init__(self, inner, p, seed, scaling):
        super().__init__()
        self.inner = inner
        self.sd = StochasticDepth(p, seed=seed, scaling=scaling)

    def call(self, x, training=False):
        return self.sd([x, self.inner(x)], training=training)


@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_gradients_match_the_dense_formulation(rng, scaling):
    x = _x(rng, (40, 3))
    g = rng.standard_normal(x.shape).astype(np.float32)
    skip = StochasticResidual(RowScale(0.75), 0.6, seed=31, scaling=scaling)
    dense = _Dense(RowScale(0.75), 0.6, 31, scaling)
    skip(x), dense(x)  # built by an inference call (which does not advance the step)
    gx, gw = _grads(skip, x, g)
    dx, dw = _grads(dense, x, g)
    # The input gradient row by row: g + w * (s * g) on kept rows, g on dropped ones.
    assert_same(to_np(gx), to_np(dx))
    keep = stochdepth.mask(40, 0.6, seed=31, offset=0)
    gy = reference.backward(g, 0.6, seed=31, offset=0, scaling=scaling)[1]
    want_w = (x[keep].astype(np.float64) * gy[keep]).sum(0)
    np.testing.assert_allclose(to_np(gw), want_w, rtol=1e-5)  # a sum over fewer rows
    np.testing.assert_allclose(to_np(gw), to_np(dw), rtol=1e-5)


# ---- a stateful wrapped layer, models, fit


def _block(width, p, seed):
    branch = keras.Sequential([keras.layers.Dense(width, activation="relu"),
                               keras.layers.Dropout(0.1, seed=seed),
                               keras.layers.Dense(width)])
    return StochasticResidual(branch, p, seed=seed)


def _model(width=8, depth=3, seed=10):
    inputs = keras.Input((width,))
    x = inputs
    for i in range(depth):
        x = _block(width, 1.0 - 0.5 * (i + 1) / depth, seed + i)(x)
    return keras.Model(inputs, keras.layers.Dense(1)(x))


def test_functional_model_and_fit(rng):
    """Dense + Dropout branches (Dropout's seed is state the wrapped layer advances: on JAX it
    leaves the bucket switch as a value)."""
    model = _model()
    blocks = [lay for lay in model.layers if isinstance(lay, StochasticResidual)]
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = rng.standard_normal((32, 1)).astype(np.float32)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    for lay in blocks:  # 2 epochs of 4 batches: 8 masks each
        assert int(to_np(lay.seed_generator.state)[1]) == 8
    pred = model.predict(x, verbose=0)
    assert pred.shape == (32, 1) and np.isfinite(pred).all()


def test_keras_file_round_trip_continues_the_mask_sequence(rng, tmp_path):
    inputs = keras.Input((4,))
    layer = StochasticResidual(RowScale(), 0.5, seed=7, scaling="training", buckets=(8, 16))
    model = keras.Model(inputs, layer(inputs))
    x = _x(rng)
    for _ in range(3):
        layer(x, training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    copy = loaded.layers[-1]
    assert isinstance(copy, StochasticResidual) and isinstance(copy.layer, RowScale)
    def own(config):
        return {k: v for k, v in config.items() if k != "layer"}

    assert own(copy.get_config()) == own(layer.get_config())
    assert copy.get_config()["buckets"] == [8, 16]
    assert copy.layer.get_config() == layer.layer.get_config()
    assert_same(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert_same(to_np(copy(x, training=True)), _want(x, 0.5, 7, 3, scaling="training"))
    assert_same(to_np(layer(x, training=True)), _want(x, 0.5, 7, 3, scaling="training"))


def test_get_config_and_from_config():
    layer = StochasticResidual(RowScale(2.0), 0.25, seed=3, mode="batch", scaling="training",
                               buckets=6, name="block")
    config = layer.get_config()
    assert {k: config[k] for k in ("survival_prob", "seed", "mode", "scaling", "buckets")} == {
        "survival_prob": 0.25, "seed": 3, "mode": "batch", "scaling": "training", "buckets": 6}
    copy = StochasticResidual.from_config(dict(config))  # Wrapper.from_config pops "layer"
    assert copy.get_config() == config
    assert isinstance(copy.layer, RowScale) and copy.layer.init == 2.0


def test_compute_output_shape():
    assert StochasticResidual(RowScale(), 0.5).compute_output_shape((None, 7)) == (None, 7)


# ---- errors


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(survival_prob=1.5), ValueError, r"survival_prob must be in \[0, 1\], got 1.5"),
    (dict(survival_prob="0.5"), TypeError, "survival_prob must be a real number"),
    (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\)"),
    (dict(seed=1.5), TypeError, "seed must be an integer"),
    (dict(mode="sample"), ValueError, "mode must be 'row' or 'batch'"),
    (dict(scaling="x"), ValueError, "scaling must be 'inference' or 'training'"),
    (dict(buckets=0), ValueError, "buckets must be at least 1, got 0"),
    (dict(buckets=(4, 0)), ValueError, "buckets sizes must be >= 1, got 0"),
])
def test_constructor_errors(kwargs, exc, match):
    kw = dict(survival_prob=0.5)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        StochasticResidual(RowScale(), **kw)


def test_layer_must_be_a_layer():
    with pytest.raises(ValueError, match="isn't a supported layer type"):
        StochasticResidual(lambda z: z, 0.5)


def test_layer_must_keep_the_shape(rng):
    layer = StochasticResidual(keras.layers.Dense(2), 0.5, seed=1)
    x = _x(rng, (8, 4))
    n = int(stochdepth.mask(8, 0.5, seed=1, offset=0).sum())
    with pytest.raises(ValueError, match=rf"layer must keep the shape of its input, got "
                                         rf"\({n}, 2\) for an input of shape \({n}, 4\)"):
        layer(x, training=True)


def test_bad_inputs(rng):
    layer = StochasticResidual(RowScale(), 0.5, seed=1)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
        layer(np.ones((4, 2), np.int32), training=True)
