"""The Keras layer on the JAX backend runs stochdepth.jax: its traced step holds the library's
FFI custom calls (no integer-op Philox), jitted outputs and gradients equal
`stochdepth.reference` bit for bit (no FMA contraction), training call n uses
`stochdepth.mask(batch, p, seed=S, offset=n)`, and a jitted step draws a new mask each call
without recompiling.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_keras import BACKEND, assert_same, pair
from stochdepth.keras import StochasticDepth

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="JAX backend specifics")


def test_jax_layer_step_is_the_ffi_custom_call(rng):
    import jax

    a, b = pair(rng, (6, 4))
    layer = StochasticDepth(0.5, seed=3)
    text = str(jax.make_jaxpr(lambda a, b: layer([a, b], training=True))(a, b))
    assert "stochdepth_residual" in text
    assert "shift_right_logical" not in text  # no Philox in integer ops


@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("seed", [0, 2**40 + 7])
def test_jax_jitted_training_steps_match_reference(rng, scaling, seed):
    import jax

    a, b = pair(rng, (40, 3, 2))
    b = (b * np.float32(3.3)).astype(np.float32)  # products that an FMA would round differently
    layer = StochasticDepth(0.6, seed=seed, scaling=scaling, axis=0)

    @jax.jit
    def step(nt, a, b):
        return layer.stateless_call([], nt, [a, b], training=True)

    nt = [v.value for v in layer.non_trainable_variables]
    for n in range(3):
        got, nt = step(nt, a, b)
        got = np.asarray(got)
        want = reference.forward(a, b, 0.6, seed=seed, offset=n, scaling=scaling)
        assert_same(got, want)
        keep = np.any(got != a, axis=(1, 2))
        assert (keep <= stochdepth.mask(40, 0.6, seed=seed, offset=n)).all()
    assert step._cache_size() == 1
    inference = jax.jit(lambda a, b: layer([a, b], training=False))(a, b)
    assert_same(np.asarray(inference),
                reference.forward(a, b, 0.6, training=False, scaling=scaling))


def test_jax_layer_gradient_is_the_backward_kernel(rng):
    import jax
    import jax.numpy as jnp

    a, b = pair(rng, (8, 5))
    w = rng.standard_normal((8, 5)).astype(np.float32)
    layer = StochasticDepth(0.5, seed=9, scaling="training")
    _, vjp = jax.vjp(lambda a, b: layer([a, b], training=True), jnp.asarray(a), jnp.asarray(b))
    g_a, g_b = vjp(jnp.asarray(w))
    assert_same(np.asarray(g_a), w)
    assert_same(np.asarray(g_b), reference.backward(w, 0.5, seed=9, scaling="training")[1])
