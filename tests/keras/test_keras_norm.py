"""stochdepth.keras.StochasticDepthNorm on the backend named by KERAS_BACKEND (see conftest.py):
the fused residual + norm gives `stochdepth.reference.forward_norm` bit for bit on every backend
(the kernels on torch and JAX, the pinned keras.ops formulation elsewhere), training call n uses
the mask of (seed, offset=n), gradients are the backward kernel's on torch and JAX (the
backend's autodiff elsewhere), the layer's weights train, its config and saved files round-trip,
and bad arguments are clear errors.
"""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, to_np
from stochdepth.keras import StochasticDepthNorm

from stochdepth import reference

SHAPE = (8, 3, 37)  # an awkward width: a partial last group of 16 lanes
KERNELS = BACKEND in ("torch", "jax")  # the backends that run the library's kernels


def _np_dtype(dtype):
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def _inputs(rng, dtype="float32", shape=SHAPE):
    d = _np_dtype(dtype)
    return (rng.standard_normal(shape).astype(d), rng.standard_normal(shape).astype(d))


def _params(layer, dtype):
    """The layer's weight, bias, gamma as NumPy arrays of `dtype` (None when absent)."""
    return tuple(None if v is None else to_np(v).astype(_np_dtype(dtype))
                 for v in (layer.weight, layer.bias, layer.gamma))


def _set_random_params(layer, rng):
    for v in (layer.weight, layer.bias, layer.gamma):
        if v is not None:
            v.assign((1 + 0.3 * rng.standard_normal(v.shape)).astype(v.dtype))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("layer_scale", [None, 0.5], ids=["nogamma", "gamma"])
def test_matches_reference(rng, dtype, norm, layer_scale):
    sc, res = _inputs(rng, dtype)
    layer = StochasticDepthNorm(0.5, seed=9, norm=norm, eps=1e-5, layer_scale=layer_scale,
                                scaling="training", dtype=dtype)
    layer.build([sc.shape, res.shape])
    _set_random_params(layer, rng)
    w, b, g = _params(layer, dtype)
    kw = dict(norm=norm, eps=1e-5, gamma=g, seed=9, scaling="training")
    for offset in range(2):  # training call n uses offset n
        y, n = layer([sc, res], training=True)
        ey, en = reference.forward_norm(sc, res, 0.5, w, b, offset=offset, **kw)
        assert_same(to_np(y), ey)
        assert_same(to_np(n), en)
    y, n = layer([sc, res])  # inference
    ey, en = reference.forward_norm(sc, res, 0.5, w, b, training=False, **kw)
    assert_same(to_np(y), ey)
    assert_same(to_np(n), en)


def test_norm_float64(rng):
    if BACKEND == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX has no float64 without jax_enable_x64")
    sc, res = _inputs(rng, "float64")
    layer = StochasticDepthNorm(0.8, seed=2**40 + 3, layer_scale=0.1, dtype="float64")
    y, n = layer([sc, res], training=True)
    w, b, g = _params(layer, "float64")
    ey, en = reference.forward_norm(sc, res, 0.8, w, b, gamma=g, seed=2**40 + 3)
    assert_same(to_np(y), ey)
    assert_same(to_np(n), en)


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_mask_and_defaults(rng, mode):
    """Defaults: LayerNorm with weight ones and bias zeros, eps 1e-6, scaling "inference"; a
    dropped sample's y is its shortcut exactly."""
    sc, res = _inputs(rng, shape=(32, 2, 16))
    layer = StochasticDepthNorm(0.5, seed=2**33 + 1, mode=mode)
    y, n = layer([sc, res], training=True)
    ey, en = reference.forward_norm(sc, res, 0.5, np.ones(16, np.float32),
                                    np.zeros(16, np.float32), seed=2**33 + 1, mode=mode)
    assert_same(to_np(y), ey)
    assert_same(to_np(n), en)
    assert layer.gamma is None and len(layer.trainable_weights) == 2


def test_without_affine():
    sc = np.arange(2 * 20, dtype=np.float32).reshape(2, 20)
    layer = StochasticDepthNorm(1.0, norm="rms", elementwise_affine=False)
    y, n = layer([sc, sc], training=True)
    assert layer.weight is None and layer.bias is None and not layer.trainable_weights
    ey, en = reference.forward_norm(sc, sc, 1.0, None, norm="rms", seed=0)
    assert_same(to_np(y), ey)
    assert_same(to_np(n), en)


def _grads(layer, sc, res, wy, wn):
    """d (sum(y * wy) + sum(n * wn)) / d (shortcut, residual, weight, bias, gamma) for one
    training call; None for a parameter the layer does not have."""
    names = [v.path.split("/")[-1] for v in layer.trainable_variables]

    def by_name(grads):
        got = dict(zip(names, grads))
        return [got.get(k) for k in ("weight", "bias", "gamma")]

    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in layer.trainable_variables]
        nt = [v.value for v in layer.non_trainable_variables]

        def loss(a, b, tv):
            (y, n), _ = layer.stateless_call(tv, nt, [a, b], training=True)
            return jnp.sum(y * wy) + jnp.sum(n * wn)

        g_a, g_b, g_tv = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(sc), jnp.asarray(res), tv)
        return [g_a, g_b, *by_name(g_tv)]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        a, b = tf.constant(sc), tf.constant(res)
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y, n = layer([a, b], training=True)
            loss = tf.reduce_sum(y * wy) + tf.reduce_sum(n * wn)
        grads = tape.gradient(loss, [a, b, *layer.trainable_variables])
        return [grads[0], grads[1], *by_name(grads[2:])]
    if BACKEND == "torch":
        import torch

        a = torch.tensor(sc, requires_grad=True)
        b = torch.tensor(res, requires_grad=True)
        y, n = layer([a, b], training=True)
        ((y * torch.tensor(wy)).sum() + (n * torch.tensor(wn)).sum()).backward()
        return [a.grad, b.grad, *by_name([v.value.grad for v in layer.trainable_variables])]
    pytest.skip(f"no gradient helper for backend {BACKEND}")


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gradients(rng, norm):
    sc, res = _inputs(rng)
    wy, wn = _inputs(rng)
    layer = StochasticDepthNorm(0.5, seed=21, norm=norm, layer_scale=0.7, scaling="training")
    layer.build([sc.shape, res.shape])
    _set_random_params(layer, rng)
    w, b, g = _params(layer, "float32")
    got = _grads(layer, sc, res, wy, wn)
    kw = dict(norm=norm, gamma=g, seed=21, scaling="training")
    ey, _ = reference.forward_norm(sc, res, 0.5, w, b, **kw)
    want = reference.backward_norm(wy, wn, ey, res, 0.5, w, b, **kw)
    # want: grad_shortcut, grad_residual, grad_gamma, grad_weight, grad_bias
    for name, a, e in zip(["shortcut", "residual", "weight", "bias", "gamma"], got,
                          [want[0], want[1], want[3], want[4], want[2]]):
        assert (a is None) == (e is None), name
        if e is None:
            continue
        if KERNELS:  # the backward kernel: the pinned backward pass
            assert_same(to_np(a), e)
        else:  # the backend's autodiff of the keras.ops forward pass
            np.testing.assert_allclose(to_np(a), e, rtol=2e-4, atol=2e-4, err_msg=name)


def test_fit_trains_the_parameters(rng):
    inp_a, inp_b = keras.Input((4, 16)), keras.Input((4, 16))
    y, n = StochasticDepthNorm(0.8, seed=1, layer_scale=0.5)([inp_a, inp_b])
    out = keras.layers.Add()([y, n])
    model = keras.Model([inp_a, inp_b], out)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sc, res = _inputs(rng, shape=(16, 4, 16))
    layer = model.layers[2]
    before = [to_np(v) for v in layer.trainable_variables]
    history = model.fit([sc, res], sc, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = [to_np(v) for v in layer.trainable_variables]
    assert len(before) == 3
    assert all(not np.array_equal(x, z) for x, z in zip(before, after))


def test_config_round_trip():
    layer = StochasticDepthNorm(0.7, seed=5, norm="rms", eps=1e-5, layer_scale=0.1,
                                mode="batch", scaling="training", name="sdn")
    config = layer.get_config()
    for key, value in dict(survival_prob=0.7, seed=5, norm="rms", eps=1e-5,
                           elementwise_affine=True, layer_scale=0.1, mode="batch",
                           scaling="training").items():
        assert config[key] == value, key
    again = StochasticDepthNorm.from_config(config)
    assert again.get_config() == config
    assert keras.layers.deserialize(keras.layers.serialize(layer)).get_config() == config


def test_saved_model_keeps_weights_and_mask_sequence(rng, tmp_path):
    inp_a, inp_b = keras.Input((3, 37)), keras.Input((3, 37))
    y, n = StochasticDepthNorm(0.5, seed=2**40 + 7, layer_scale=0.3)([inp_a, inp_b])
    model = keras.Model([inp_a, inp_b], [y, n])
    layer = model.layers[-1]
    _set_random_params(layer, rng)
    sc, res = _inputs(rng)
    for _ in range(2):  # steps 0, 1
        layer([sc, res], training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).layers[-1]
    assert isinstance(loaded, StochasticDepthNorm)
    for a, b in zip(loaded.trainable_variables, layer.trainable_variables):
        assert_same(to_np(a), to_np(b))
    w, bias, g = _params(layer, "float32")
    ey, en = reference.forward_norm(sc, res, 0.5, w, bias, gamma=g, seed=2**40 + 7, offset=2)
    y2, n2 = loaded([sc, res], training=True)  # step 2, as the saved layer would draw next
    assert_same(to_np(y2), ey)
    assert_same(to_np(n2), en)


# ---- errors ----------------------------------------------------------------------------------


def test_width_mismatch_after_build(rng):
    layer = StochasticDepthNorm(0.5, seed=1)
    sc, res = _inputs(rng, shape=(4, 8))
    layer([sc, res], training=True)
    sc, res = _inputs(rng, shape=(4, 7))
    with pytest.raises(ValueError, match=r"weight must have shape \(7,\) \(the last axis of "
                                         r"shortcut\), got \(8,\)"):
        layer([sc, res], training=True)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_eps_not_positive_finite(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        StochasticDepthNorm(0.5, eps=eps)


def test_constructor_errors():
    with pytest.raises(TypeError, match="eps must be a positive real number, got str"):
        StochasticDepthNorm(0.5, eps="1e-5")
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms', got 'batch'"):
        StochasticDepthNorm(0.5, norm="batch")
    with pytest.raises(TypeError, match="layer_scale must be a real number or None, got str"):
        StochasticDepthNorm(0.5, layer_scale="0.1")
    with pytest.raises(ValueError, match="layer_scale must be finite"):
        StochasticDepthNorm(0.5, layer_scale=float("nan"))
    with pytest.raises(TypeError, match="elementwise_affine must be a bool"):
        StochasticDepthNorm(0.5, elementwise_affine=1)
    with pytest.raises(ValueError, match=r"survival_prob must be in \[0, 1\]"):
        StochasticDepthNorm(1.5)


def test_call_errors(rng):
    sc, res = _inputs(rng, shape=(4, 8))
    with pytest.raises(ValueError, match=r"inputs must be a list of \[shortcut, residual\]"):
        StochasticDepthNorm(0.5)(sc)
    with pytest.raises(ValueError, match="shortcut must have rank >= 2"):
        StochasticDepthNorm(0.5, seed=1)([sc[0], res[0]], training=True)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 8\) like shortcut"):
        StochasticDepthNorm(0.5, seed=1)([sc, res[:2]], training=True)
    with pytest.raises(ValueError, match=r"the last axis \(the channels\) of the inputs must be "
                                         r"known, got shape \(None, None\)"):
        StochasticDepthNorm(0.5).build([(None, None), (None, None)])
