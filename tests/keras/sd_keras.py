"""Helpers of the Keras suite (tests/keras): the backend, exact comparisons, inputs."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

BACKEND = keras.backend.backend()


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def pair(rng, shape, dtype=np.float32):
    a = rng.standard_normal(shape).astype(dtype)
    b = rng.standard_normal(shape).astype(dtype)
    return a, b


def assert_same(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[actual.dtype.itemsize]
    bad = actual.view(width) != expected.view(width)
    assert not bad.any(), f"{int(bad.sum())} of {bad.size} elements differ"
