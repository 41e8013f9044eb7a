"""stochdepth.keras.StochasticDepth under Keras rematerialisation (docs/design.md, "Activation
checkpointing"), on the backend named by KERAS_BACKEND (see conftest.py): a seeded model trained
inside `keras.RematScope(mode="full")` ends with the weights and the mask offsets of the same
model trained without it, exactly."""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
from sd_keras import BACKEND, to_np
from stochdepth.keras import StochasticDepth

if BACKEND != "torch":
    # Keras's own seeded layers cannot run in a RematScope there (keras.layers.Dropout fails the
    # same way): on JAX the seed state's update leaks a tracer out of jax.checkpoint, and on
    # TensorFlow tf.recompute_grad refuses the layers' keyword arguments inside tf.function.
    pytestmark = pytest.mark.skip(reason=f"Keras {keras.__version__} RematScope with a seeded "
                                         f"layer fails on {BACKEND} (keras.layers.Dropout too)")


def _train(remat, steps=3):
    keras.utils.set_random_seed(0)
    scope = keras.RematScope(mode="full") if remat else contextlib.nullcontext()
    inp = keras.Input((8,))
    with scope:
        h = keras.layers.Dense(8)(inp)
        for i in range(3):
            r = keras.layers.Dense(8, activation="tanh")(h)
            h = StochasticDepth(0.5, seed=3 + i)([h, r])
        out = keras.layers.Dense(1)(keras.layers.Dense(8, activation="tanh")(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse", jit_compile=False)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x = rng.standard_normal((32, 8)).astype(np.float32)
        y = rng.standard_normal((32, 1)).astype(np.float32)
        model.train_on_batch(x, y)
    states = [to_np(lay.seed_generator.state).tolist() for lay in model.layers
              if isinstance(lay, StochasticDepth)]
    return [to_np(w) for w in model.trainable_weights], states


def test_remat_training_equals_plain_training():
    weights, states = _train(False)
    weights_remat, states_remat = _train(True)
    assert states == states_remat == [[3, 3], [4, 3], [5, 3]]
    for a, b in zip(weights, weights_remat):
        np.testing.assert_array_equal(a, b)
