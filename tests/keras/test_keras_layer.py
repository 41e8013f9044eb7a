"""stochdepth.keras.StochasticDepth on the backend named by KERAS_BACKEND (see conftest.py): the
mask in keras.ops, the kerasfactory drop-in surface, semantics and gradients. Compiled steps,
models and saving: test_keras_models.py.

`rng` is tests/conftest.py's fixture (seeded from the test id). Every mask is checked against
the library: training call n of a layer seeded with S must use
`stochdepth.mask(batch, p, seed=S, offset=n)`, and its output must equal
`stochdepth.reference.forward` bit for bit, so the three backends agree with each other too.
"""

from __future__ import annotations

import math

import keras
import ml_dtypes
import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, pair, to_np
from stochdepth.keras import StochasticDepth, keep_mask

import stochdepth
from stochdepth import reference

# ---- the mask stream in keras.ops


@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_keep_mask_matches_stochdepth_mask(batch, mode):
    cases = [(0, 0), (1, 5), (2**64 - 1, 2**32 + 7), (0xDEADBEEF12345678, 2**63 + 3)]
    for seed, offset in cases:
        for p in (0.0, 0.3, 0.999, 1.0):
            got = to_np(keep_mask(batch, p, seed & 0xFFFFFFFF, seed >> 32, offset & 0xFFFFFFFF,
                                  offset >> 32, mode))
            want = stochdepth.mask(batch, p, seed=seed, offset=offset, mode=mode)
            np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} offset={offset} p={p}")


def test_keep_rate():
    p = 0.3
    keep = to_np(keep_mask(20000, p, 77, 0, 0, 0))
    sigma = math.sqrt(p * (1 - p) / keep.size)
    assert abs(keep.mean() - p) < 5 * sigma


# ---- drop-in for kerasfactory: constructor, errors, config, shapes


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan")])
def test_survival_prob_out_of_range(bad):
    with pytest.raises(ValueError, match=r"survival_prob must be in \[0, 1\]"):
        StochasticDepth(survival_prob=bad)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"survival_prob": "0.5"}, TypeError),
        ({"survival_prob": True}, TypeError),
        ({"seed": -1}, ValueError),
        ({"seed": 2**64}, ValueError),
        ({"seed": 1.5}, TypeError),
        ({"mode": "sample"}, ValueError),
        ({"scaling": "none"}, ValueError),
        ({"axis": 0.0}, TypeError),
    ],
)
def test_constructor_errors(kwargs, exc):
    with pytest.raises(exc):
        StochasticDepth(**kwargs)


def test_defaults_and_positional_args():
    layer = StochasticDepth()
    assert (layer.survival_prob, layer.seed) == (0.5, None)
    assert (layer.mode, layer.scaling, layer.axis) == ("row", "inference", 0)
    layer = StochasticDepth(0.8, 42, name="sd")
    assert (layer.survival_prob, layer.seed, layer.name) == (0.8, 42, "sd")


@pytest.mark.parametrize("inputs", ["one", "three", "tensor"])
def test_inputs_must_be_a_pair(inputs):
    x = np.ones((2, 3), np.float32)
    arg = {"one": [x], "three": [x, x, x], "tensor": x}[inputs]
    with pytest.raises(ValueError, match="inputs must be a list of"):
        StochasticDepth(0.5)(arg)


def test_mismatched_inputs():
    layer = StochasticDepth(0.5, seed=1)
    with pytest.raises(ValueError, match="same shape"):
        layer([np.ones((2, 3), np.float32), np.ones((2, 4), np.float32)], training=True)
    with pytest.raises(ValueError, match="axis"):
        StochasticDepth(0.5, axis=2)([np.ones((2, 3), np.float32)] * 2, training=True)


def test_get_config_and_from_config():
    layer = StochasticDepth(0.7, seed=0, mode="batch", scaling="training", axis=1, name="x")
    config = layer.get_config()
    assert {"survival_prob", "seed", "name", "trainable", "dtype"} <= set(config)
    assert (config["survival_prob"], config["seed"]) == (0.7, 0)
    assert (config["mode"], config["scaling"], config["axis"]) == ("batch", "training", 1)
    clone = StochasticDepth.from_config(config)
    assert clone.get_config() == config
    assert keras.saving.get_registered_name(StochasticDepth) == "stochdepth>StochasticDepth"


def test_config_keys_cover_kerasfactory():
    kf = pytest.importorskip("kerasfactory.layers")
    ours = StochasticDepth(0.7, seed=3, name="sd").get_config()
    theirs = kf.StochasticDepth(0.7, seed=3, name="sd").get_config()
    assert set(theirs) <= set(ours)
    assert {k: ours[k] for k in theirs} == theirs


def test_compute_output_shape():
    layer = StochasticDepth(0.5)
    assert layer.compute_output_shape([(None, 8, 4), (None, 8, 4)]) == (None, 8, 4)
    sc = keras.Input((8, 4))
    out = layer([sc, keras.layers.Dense(4)(sc)])
    assert tuple(out.shape) == (None, 8, 4)


# ---- semantics


def test_inference_formula(rng):
    sc, res = pair(rng, (4, 6, 3))
    layer = StochasticDepth(0.7, seed=1)
    expected = sc + np.float32(0.7) * res
    assert_same(to_np(layer([sc, res])), expected)
    assert_same(to_np(layer([sc, res], training=False)), expected)
    timm_like = StochasticDepth(0.7, scaling="training")
    assert_same(to_np(timm_like([sc, res])), sc + res)


def test_inference_matches_kerasfactory(rng):
    kf = pytest.importorskip("kerasfactory.layers")
    sc, res = pair(rng, (4, 6, 3))
    assert_same(to_np(StochasticDepth(0.7)([sc, res])), to_np(kf.StochasticDepth(0.7)([sc, res])))


@pytest.mark.parametrize("shape", [(8, 3), (4, 6, 3), (6, 4, 3), (3, 2, 2, 2, 2)],
                         ids=["rank2", "rank3", "rank3_B>N", "rank5"])
def test_training_masks_per_sample(rng, shape):
    """One draw per sample at any rank (kerasfactory: rank 3 with B != N raises, B == N gives a
    per-token mask, rank 5 raises), equal to stochdepth's mask for (seed, step)."""
    sc, res = pair(rng, shape)
    layer = StochasticDepth(0.5, seed=1234)
    for step in range(3):
        out = to_np(layer([sc, res], training=True))
        assert_same(out, reference.forward(sc, res, 0.5, seed=1234, offset=step))
        keep = stochdepth.mask(shape[0], 0.5, seed=1234, offset=step)
        assert_same(out[~keep], sc[~keep])


def test_seed_zero_is_a_seed(rng):
    sc, res = pair(rng, (64, 4))
    a = to_np(StochasticDepth(0.5, seed=0)([sc, res], training=True))
    b = to_np(StochasticDepth(0.5, seed=0)([sc, res], training=True))
    assert_same(a, b)
    assert_same(a, reference.forward(sc, res, 0.5, seed=0, offset=0))


def test_large_seed(rng):
    sc, res = pair(rng, (64, 4))
    seed = 0xFEDCBA9876543210  # both words >= 2**31: the int32 seed state of torch included
    layer = StochasticDepth(0.5, seed=seed)
    for step in range(2):
        out = to_np(layer([sc, res], training=True))
        assert_same(out, reference.forward(sc, res, 0.5, seed=seed, offset=step))


def test_fresh_masks_without_seed(rng):
    sc, res = pair(rng, (64, 2))
    layer = StochasticDepth(0.5)
    masks = {tuple(to_np(layer([sc, res], training=True))[:, 0] == sc[:, 0]) for _ in range(4)}
    assert len(masks) == 4


def test_unseeded_layers_reproducible_with_set_random_seed(rng):
    sc, res = pair(rng, (64, 2))
    keras.utils.set_random_seed(7)
    a = to_np(StochasticDepth(0.5)([sc, res], training=True))
    keras.utils.set_random_seed(7)
    b = to_np(StochasticDepth(0.5)([sc, res], training=True))
    assert_same(a, b)


def test_inference_does_not_advance_the_step(rng):
    sc, res = pair(rng, (16, 3))
    layer = StochasticDepth(0.5, seed=9)
    layer([sc, res])
    layer([sc, res], training=False)
    assert_same(to_np(layer([sc, res], training=True)),
                reference.forward(sc, res, 0.5, seed=9, offset=0))


def test_dropped_sample_is_the_shortcut_even_with_inf(rng):
    sc, res = pair(rng, (32, 5))
    res[:] = np.inf
    res[1::2] = np.nan
    out = to_np(StochasticDepth(0.5, seed=3)([sc, res], training=True))
    keep = stochdepth.mask(32, 0.5, seed=3, offset=0)
    assert 0 < keep.sum() < 32
    assert_same(out[~keep], sc[~keep])
    out = to_np(StochasticDepth(0.0, seed=3)([sc, res], training=True))
    assert_same(out, sc)


def test_survival_prob_one_and_zero(rng):
    sc, res = pair(rng, (16, 3))
    assert_same(to_np(StochasticDepth(1.0, seed=1)([sc, res], training=True)), sc + res)
    assert_same(to_np(StochasticDepth(1, seed=1)([sc, res], training=True)), sc + res)
    assert_same(to_np(StochasticDepth(0.0, seed=1)([sc, res], training=True)), sc)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_options_match_reference(rng, mode, scaling, axis):
    sc, res = pair(rng, (5, 7, 3))
    layer = StochasticDepth(0.6, seed=11, mode=mode, scaling=scaling, axis=axis)
    for step in range(2):
        out = to_np(layer([sc, res], training=True))
        want = reference.forward(sc, res, 0.6, seed=11, offset=step, mode=mode, scaling=scaling,
                                 axis=axis)
        assert_same(out, want)  # eager: no compiler that could contract s * r + sc into an FMA
    want = reference.forward(sc, res, 0.6, training=False, scaling=scaling, axis=axis)
    assert_same(to_np(layer([sc, res])), want)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_dtypes(rng, dtype):
    if dtype == "float64" and BACKEND == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            pytest.skip("JAX has no float64 without jax_enable_x64")
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    sc, res = (a.astype(np_dtype) for a in pair(rng, (8, 4)))
    layer = StochasticDepth(0.5, seed=5, dtype=dtype)
    out = to_np(layer([sc, res], training=True))
    assert_same(out, reference.forward(sc, res, 0.5, seed=5, offset=0))
    assert_same(to_np(layer([sc, res])), reference.forward(sc, res, 0.5, training=False))


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)], ids=["no_samples", "empty_samples"])
def test_empty(shape):
    sc = np.zeros(shape, np.float32)
    out = to_np(StochasticDepth(0.5, seed=1)([sc, sc], training=True))
    assert out.shape == shape and out.dtype == np.float32


def test_direct_call_on_arrays():
    out = StochasticDepth(0.5)([np.ones((2, 3), np.float32), np.ones((2, 3), np.float32)])
    np.testing.assert_array_equal(to_np(out), np.full((2, 3), 1.5, np.float32))


# ---- gradients


def _grads(layer, sc, res, w):
    """(d sum(out * w) / d shortcut, ... / d residual) for one training call."""
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        nt = [v.value for v in layer.non_trainable_variables]

        def loss(a, b):
            out, _ = layer.stateless_call([], nt, [a, b], training=True)
            return jnp.sum(out * w)

        return jax.grad(loss, argnums=(0, 1))(jnp.asarray(sc), jnp.asarray(res))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        a, b = tf.constant(sc), tf.constant(res)
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            loss = tf.reduce_sum(layer([a, b], training=True) * w)
        return tape.gradient(loss, [a, b])
    if BACKEND == "torch":
        import torch

        a = torch.tensor(sc, requires_grad=True)
        b = torch.tensor(res, requires_grad=True)
        (layer([a, b], training=True) * torch.tensor(w)).sum().backward()
        return a.grad, b.grad
    pytest.skip(f"no gradient helper for backend {BACKEND}")


@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_gradients(rng, scaling):
    sc, res = pair(rng, (16, 3, 2))
    w = rng.standard_normal(sc.shape).astype(np.float32)
    layer = StochasticDepth(0.5, seed=21, scaling=scaling)
    g_sc, g_res = _grads(layer, sc, res, w)
    want_sc, want_res = reference.backward(w, 0.5, seed=21, offset=0, scaling=scaling)
    assert_same(to_np(g_sc), want_sc)
    assert_same(to_np(g_res), want_res)
