"""stochdepth.keras.StochasticDepth in compiled steps, models and saved files, on the backend
named by KERAS_BACKEND (see conftest.py): a fresh mask per jitted step and per `fit` step,
mixed precision, `.keras` round trips, models saved with kerasfactory's layer, and the torch
backend's specifics.
"""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, pair, to_np
from stochdepth.keras import (
    KERASFACTORY_CUSTOM_OBJECTS,
    StochasticDepth,
    kerasfactory_compat,
    load_kerasfactory_model,
)

import stochdepth
from stochdepth import reference


@pytest.fixture
def policy():
    """Set a dtype policy for one test and restore the previous one."""
    old = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(old)


# ---- compiled steps: a fresh mask each step


def _jit_steps(layer, sc, res, steps):
    """Outputs of `steps` training calls of `layer` inside the backend's compiler."""
    if BACKEND == "jax":
        import jax

        @jax.jit
        def step(nt, a, b):
            return layer.stateless_call([], nt, [a, b], training=True)

        nt = [v.value for v in layer.non_trainable_variables]
        outs = []
        for _ in range(steps):
            out, nt = step(nt, sc, res)
            outs.append(to_np(out))
        return outs
    if BACKEND == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None,) + sc.shape[1:], tf.float32)  # a dynamic batch size

        @tf.function(input_signature=[spec, spec])
        def step(a, b):
            return layer([a, b], training=True)

        return [to_np(step(sc, res)) for _ in range(steps)]
    pytest.skip(f"{BACKEND}: no jit of a layer call (model.fit is tested below)")


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_jit_seeded_fresh_mask_each_step(rng, mode, scaling):
    sc, res = pair(rng, (32, 4))
    layer = StochasticDepth(0.5, seed=99, mode=mode, scaling=scaling)
    outs = _jit_steps(layer, sc, res, 4)
    for step, out in enumerate(outs):
        want = reference.forward(sc, res, 0.5, seed=99, offset=step, mode=mode, scaling=scaling)
        keep = stochdepth.mask(32, 0.5, seed=99, offset=step, mode=mode)
        assert_same(out[~keep], sc[~keep])  # dropped samples: the shortcut, exactly
        # JAX, and TensorFlow with its ops, run the kernels: exact.
        if scaling == "inference" or BACKEND == "jax" or layer._use_tf_ops:
            assert_same(out, want)
        else:  # the Keras-ops path may contract sc + 2 * r into an FMA on TensorFlow: last bit
            # only (docs/design.md, "Arithmetic")
            np.testing.assert_allclose(out, want, rtol=2**-23, atol=0)


def test_jit_unseeded_fresh_mask_each_step(rng):
    sc, res = pair(rng, (64, 2))
    outs = _jit_steps(StochasticDepth(0.5), sc, res, 4)
    assert len({tuple(o[:, 0] == sc[:, 0]) for o in outs}) == 4


# ---- models


def _residual_model(depth=3, width=8, survival=(1.0, 0.5), seed=None, layer=StochasticDepth):
    """Residual blocks built in a loop with a linearly decreasing survival_prob (the paper's
    linear decay rule), as users write them with kerasfactory's layer."""
    inputs = keras.Input((width,))
    x = inputs
    for i in range(depth):
        p = survival[0] - (survival[0] - survival[1]) * (i + 1) / depth
        branch = keras.layers.Dense(width, activation="relu")(x)
        branch = keras.layers.Dense(width)(branch)
        kwargs = {} if seed is None else {"seed": seed + i}
        x = layer(survival_prob=p, **kwargs)([x, branch])
    outputs = keras.layers.Dense(1)(x)
    return keras.Model(inputs, outputs)


def test_functional_model_and_fit(rng):
    model = _residual_model(seed=10)
    sds = [lay for lay in model.layers if isinstance(lay, StochasticDepth)]
    assert [round(lay.survival_prob, 4) for lay in sds] == [0.8333, 0.6667, 0.5]
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = rng.standard_normal((32, 1)).astype(np.float32)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    # 2 epochs of 4 batches: every layer has drawn 8 masks (the step counter is the offset).
    for lay in sds:
        assert int(to_np(lay.seed_generator.state)[1]) == 8
    pred = model.predict(x, verbose=0)
    assert pred.shape == (32, 1) and np.isfinite(pred).all()
    np.testing.assert_allclose(to_np(model(x)), pred, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The model does not have any trainable weights")
def test_training_masks_differ_per_step_in_fit(rng):
    """A model that is only the layer: its outputs in training expose the mask of each step."""
    sc_in = keras.Input((4,))
    res_in = keras.Input((4,))
    model = keras.Model([sc_in, res_in], StochasticDepth(0.5, seed=5)([sc_in, res_in]))
    sc = np.zeros((16, 4), np.float32)
    res = np.ones((16, 4), np.float32)
    model.compile(optimizer="sgd", loss="mse")
    model.fit([sc, res], np.zeros((16, 4), np.float32), batch_size=16, epochs=3, verbose=0)
    layer = model.layers[-1]
    assert int(to_np(layer.seed_generator.state)[1]) == 3
    out = to_np(model([sc, res], training=True))
    assert_same(out[:, 0], stochdepth.mask(16, 0.5, seed=5, offset=3).astype(np.float32))


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(rng, policy, name):
    policy(name)
    layer = StochasticDepth(0.5, seed=2)
    assert layer.compute_dtype == name.split("_")[1]
    sc, res = pair(rng, (8, 4))
    out = layer([sc, res], training=True)
    half = np.dtype(ml_dtypes.bfloat16) if name == "mixed_bfloat16" else np.dtype(np.float16)
    assert_same(to_np(out), reference.forward(sc.astype(half), res.astype(half), 0.5, seed=2,
                                              offset=0))
    model = _residual_model(depth=2, seed=1)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, x[:, :1], batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


# ---- saving


def test_keras_file_round_trip(rng, tmp_path):
    model = _residual_model(seed=0)
    model.layers[-2].scaling = "training"  # a non-default option must survive too
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    sds = [lay for lay in loaded.layers if isinstance(lay, StochasticDepth)]
    assert len(sds) == 3
    assert [lay.get_config() for lay in sds] == [
        lay.get_config() for lay in model.layers if isinstance(lay, StochasticDepth)
    ]
    x = rng.standard_normal((4, 8)).astype(np.float32)
    assert_same(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize("how", ["custom_objects", "load_kerasfactory_model", "compat_block"])
def test_load_kerasfactory_model(rng, tmp_path, monkeypatch, how):
    """A `.keras` file saved with kerasfactory's layer loads as ours.

    `load_model(path, custom_objects=KERASFACTORY_CUSTOM_OBJECTS)` where kerasfactory is not
    imported (the usual case after switching); `load_kerasfactory_model` or the
    `kerasfactory_compat()` block where it is (its global registration beats custom_objects)."""
    kf = pytest.importorskip("kerasfactory.layers")
    model = _residual_model(seed=4, layer=kf.StochasticDepth)
    path = tmp_path / "kerasfactory.keras"
    model.save(path)
    if how == "custom_objects":
        # As in a process where kerasfactory is not installed or not imported.
        registry = keras.saving.get_custom_objects()
        monkeypatch.delitem(registry, "kerasfactory.layers>StochasticDepth")
        loaded = keras.saving.load_model(path, custom_objects=KERASFACTORY_CUSTOM_OBJECTS)
    elif how == "load_kerasfactory_model":
        loaded = load_kerasfactory_model(path)
    else:
        with kerasfactory_compat():
            loaded = keras.saving.load_model(path)
        # The block restores kerasfactory's registration.
        assert keras.saving.get_custom_objects()[
            "kerasfactory.layers>StochasticDepth"] is kf.StochasticDepth
    sds = [lay for lay in loaded.layers if isinstance(lay, StochasticDepth)]
    theirs = [lay for lay in model.layers if isinstance(lay, kf.StochasticDepth)]
    assert len(sds) == len(theirs) == 3
    for ours, their in zip(sds, theirs):
        assert (ours.survival_prob, ours.seed) == (their.survival_prob, their.seed)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    if BACKEND == "jax":
        # Compiled, kerasfactory's `shortcut + p * residual` may become an FMA under XLA; ours is
        # the kernels' separately rounded result in both modes: compare eager calls (op by op,
        # no contraction), and ours compiled against ours eager.
        ours = np.asarray(loaded(x, training=False))
        assert_same(ours, np.asarray(model(x, training=False)))
        assert_same(loaded.predict(x, verbose=0), ours)
    else:
        assert_same(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


# ---- torch backend specifics


@pytest.mark.skipif(BACKEND != "torch", reason="the torch backend's seed state placement")
def test_torch_seed_state_on_cpu():
    layer = StochasticDepth(0.5, seed=2**40 + 5)
    assert layer.seed_generator.state.value.device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(BACKEND != "torch", reason="CUDA tensors through Keras's torch backend")
def test_torch_cuda_matches_reference(rng):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sc, res = pair(rng, (16, 5, 3))
    layer = StochasticDepth(0.5, seed=8)
    with keras.device("cuda"):
        a = torch.tensor(sc, device="cuda", requires_grad=True)
        b = torch.tensor(res, device="cuda", requires_grad=True)
        out = layer([a, b], training=True)
        assert out.device.type == "cuda"
        out.backward(torch.ones_like(out))
    assert layer.seed_generator.state.value.device.type == "cpu"
    assert_same(out.detach().cpu().numpy(), reference.forward(sc, res, 0.5, seed=8, offset=0))
    want = reference.backward(np.ones_like(sc), 0.5, seed=8, offset=0)[1]
    assert_same(b.grad.cpu().numpy(), want)


@pytest.mark.parametrize("seed", [7, 2**40 + 2**31 + 5, None])
def test_saved_model_continues_its_mask_sequence(rng, tmp_path, seed):
    """Issue 10, item 16: after model.save + load_model a seeded layer draws the masks the saved
    one would have drawn next (as the PyTorch modules do from their state_dict), not offset 0."""
    inp_a, inp_b = keras.Input((8,)), keras.Input((8,))
    out = StochasticDepth(0.5, seed=seed)([inp_a, inp_b])
    model = keras.Model([inp_a, inp_b], out)
    sc, res = pair(rng, (32, 8))
    layer = model.layers[-1]
    for _ in range(3):  # steps 0, 1, 2
        layer([sc, res], training=True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path).layers[-1]
    resumed = to_np(loaded([sc, res], training=True))
    continued = to_np(layer([sc, res], training=True))
    assert_same(resumed, continued)
    if seed is not None:
        assert_same(resumed, reference.forward(sc, res, 0.5, seed=seed, offset=3))
        # and a second resumed call is step 4
        assert_same(to_np(loaded([sc, res], training=True)),
                    reference.forward(sc, res, 0.5, seed=seed, offset=4))
    # The weights file alone carries the state too.
    wpath = tmp_path / "w.weights.h5"
    model.save_weights(wpath)
    fresh = StochasticDepth(0.5, seed=seed)
    fresh_model = keras.Model([inp_a, inp_b], fresh([inp_a, inp_b]))
    fresh_model.load_weights(wpath)
    assert_same(to_np(fresh([sc, res], training=True)), to_np(layer([sc, res], training=True)))
