"""stochdepth.keras.StochasticDepth(layer_scale=) on the backend named by KERAS_BACKEND: the layer
owns a trainable gamma of the last axis's width, its output is `stochdepth.reference.forward(...,
gamma=)` bit for bit on every backend (the fused op on JAX, keras.ops elsewhere), its gradients
are the pinned backward pass on JAX (the backend's autodiff elsewhere, within a stated tolerance),
gamma trains under `fit`, is saved and loaded, and bad arguments are clear errors.
"""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, to_np
from stochdepth.keras import StochasticDepth

from stochdepth import reference

SHAPE = (8, 3, 37)
# The pinned backward pass (the kernel's grad_gamma order): JAX, and torch once the layer hands
# gamma to the torch adapter.
KERNEL_GRADS = BACKEND in ("jax", "torch")


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def _inputs(rng, dtype="float32", shape=SHAPE):
    d = _np_dtype(dtype)
    return tuple(rng.standard_normal(shape).astype(d) for _ in range(2))


def _layer(rng, shape=SHAPE, dtype="float32", **kw):
    kw.setdefault("scaling", "training")
    layer = StochasticDepth(0.5, seed=9, layer_scale=0.5, dtype=dtype, **kw)
    layer.build([shape, shape])
    layer.gamma.assign((1 + 0.3 * rng.standard_normal(shape[-1])).astype(layer.gamma.dtype))
    return layer, to_np(layer.gamma).astype(_np_dtype(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_matches_reference(rng, dtype, scaling, mode):
    sc, res = _inputs(rng, dtype)
    layer, g = _layer(rng, dtype=dtype, scaling=scaling, mode=mode)
    kw = dict(gamma=g, seed=9, scaling=scaling, mode=mode)
    for offset in range(2):  # training call n uses offset n
        got = layer([sc, res], training=True)
        assert_same(to_np(got), reference.forward(sc, res, 0.5, offset=offset, **kw))
    assert_same(to_np(layer([sc, res])), reference.forward(sc, res, 0.5, training=False, **kw))


def test_a_dropped_sample_is_the_shortcut_and_its_residual_is_not_read(rng):
    sc, res = _inputs(rng)
    res[:] = np.inf
    layer, g = _layer(rng)
    got = to_np(layer([sc, res], training=True))
    keep = reference.mask(SHAPE[0], 0.5, seed=9)
    assert not keep.all() and keep.any()
    assert_same(got[~keep], sc[~keep])
    assert_same(got, reference.forward(sc, res, 0.5, seed=9, scaling="training", gamma=g))


def test_weight_is_the_last_axis_width_initialised_to_layer_scale():
    layer = StochasticDepth(0.8, layer_scale=1e-5)
    assert not layer.built
    out = layer([np.ones((2, 3, 5), np.float32), np.ones((2, 3, 5), np.float32)])
    assert layer.built and tuple(layer.gamma.shape) == (5,)
    assert layer.gamma.trainable and [v.name for v in layer.trainable_variables] == ["gamma"]
    np.testing.assert_array_equal(to_np(layer.gamma), np.full(5, 1e-5, np.float32))
    assert_same(to_np(out), reference.forward(np.ones((2, 3, 5), np.float32),
                                              np.ones((2, 3, 5), np.float32), 0.8,
                                              training=False, gamma=np.full(5, 1e-5, np.float32)))
    # Without a layer scale: built at once, no weights, as before.
    plain = StochasticDepth(0.8)
    assert plain.built and plain.gamma is None and not plain.weights


def _grads(layer, sc, res, w):
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        nt = [v.value for v in layer.non_trainable_variables]

        def loss(a, b, tv):
            out, _ = layer.stateless_call(tv, nt, [a, b], training=True)
            return jnp.sum(out * w)

        tv = [v.value for v in layer.trainable_variables]
        g_a, g_b, (g_g,) = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(sc), jnp.asarray(res),
                                                             tv)
        return g_a, g_b, g_g
    if BACKEND == "tensorflow":
        import tensorflow as tf

        a, b = tf.constant(sc), tf.constant(res)
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = tf.reduce_sum(layer([a, b], training=True) * w)
        return tape.gradient(loss, [a, b, layer.gamma])
    import torch

    a = torch.tensor(sc, requires_grad=True)
    b = torch.tensor(res, requires_grad=True)
    (layer([a, b], training=True) * torch.tensor(w)).sum().backward()
    return a.grad, b.grad, layer.gamma.value.grad


def test_gradients(rng):
    sc, res = _inputs(rng)
    (w,) = _inputs(rng)[:1]
    layer, g = _layer(rng)
    got = _grads(layer, sc, res, w)
    want = reference.backward(w, 0.5, seed=9, scaling="training", gamma=g, residual=res)
    for name, a, e in zip(["shortcut", "residual", "gamma"], got, want):
        if KERNEL_GRADS or name != "gamma":  # grad_shortcut, grad_residual: one rounding each
            assert_same(to_np(a), e)
        else:  # grad_gamma: the backend's own sum order
            np.testing.assert_allclose(to_np(a), e, rtol=1e-5, atol=1e-5, err_msg=name)


def test_fit_trains_gamma(rng):
    inp_a, inp_b = keras.Input((4, 16)), keras.Input((4, 16))
    out = StochasticDepth(0.8, seed=1, layer_scale=0.5)([inp_a, inp_b])
    model = keras.Model([inp_a, inp_b], out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sc, res = _inputs(rng, shape=(16, 4, 16))
    layer = model.layers[-1]
    before = to_np(layer.gamma)
    history = model.fit([sc, res], sc + res, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.array_equal(to_np(layer.gamma), before)


def test_config_round_trip():
    layer = StochasticDepth(0.7, seed=5, layer_scale=0.1, mode="batch", name="sd")
    config = layer.get_config()
    assert config["layer_scale"] == 0.1
    assert StochasticDepth.from_config(config).get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config
    assert StochasticDepth(0.7).get_config()["layer_scale"] is None


def test_saved_model_keeps_gamma_and_mask_sequence(rng, tmp_path):
    inp_a, inp_b = keras.Input((3, 37)), keras.Input((3, 37))
    out = StochasticDepth(0.5, seed=2**40 + 7, layer_scale=0.3)([inp_a, inp_b])
    model = keras.Model([inp_a, inp_b], out)
    layer = model.layers[-1]
    layer.gamma.assign((1 + 0.3 * rng.standard_normal(37)).astype(np.float32))
    sc, res = _inputs(rng)
    for _ in range(2):  # steps 0, 1
        layer([sc, res], training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).layers[-1]
    assert isinstance(loaded, StochasticDepth)
    g = to_np(layer.gamma)
    assert_same(to_np(loaded.gamma), g)
    want = reference.forward(sc, res, 0.5, gamma=g, seed=2**40 + 7, offset=2)
    assert_same(to_np(loaded([sc, res], training=True)), want)  # step 2, as the saved one


# ---- errors


@pytest.mark.parametrize("bad, exc", [("0.5", TypeError), (True, TypeError),
                                      (float("inf"), ValueError), (float("nan"), ValueError)])
def test_layer_scale_not_a_finite_number(bad, exc):
    with pytest.raises(exc, match="layer_scale must be"):
        StochasticDepth(0.5, layer_scale=bad)


def test_call_errors(rng):
    layer = StochasticDepth(0.5, seed=1, layer_scale=0.5)
    with pytest.raises(ValueError, match=r"layer_scale needs the last axis \(the channels\)"):
        layer.build([(None, 3, None), (None, 3, None)])
    with pytest.raises(ValueError, match="inputs must be a list of"):
        StochasticDepth(0.5, layer_scale=0.5).build((4, 6))
    sc, res = _inputs(rng, shape=(4, 6))
    last = StochasticDepth(0.5, seed=1, layer_scale=0.5, axis=-1)
    with pytest.raises(ValueError, match=r"gamma scales the channels \(the last axis of "
                                         r"residual\), which must not be the sample axis"):
        last([sc, res], training=True)
    built = StochasticDepth(0.5, seed=1, layer_scale=0.5)
    built([sc, res])
    other = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match=r"gamma must have shape \(5,\) \(the last axis of "
                                         r"residual\), got \(6,\)"):
        built([other, other], training=True)
