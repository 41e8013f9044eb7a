"""stochdepth.jax with the layer scale `gamma` (docs/design.md, "Layer scale"): the forward
custom call and the one-pass backward call give `stochdepth.reference` bit for bit (the output,
grad_residual and grad_gamma), eager, under jit and grad, for every dtype, form, mode, scaling and
training flag; donate_shortcut keeps working; bad gamma is refused with the raw API's messages.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from sd_testutil import DTYPES, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import stochdepth.jax as sdj  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

# 130 rows of 24 channels: more than one block of 64 rows in grad_gamma's column sums.
SHAPES = [(6, 5, 3), (3, 130, 24), (8, 2)]


def _x64(dtype):
    return jax.enable_x64(True) if np.dtype(dtype) == F64 else jax.enable_x64(False)


def _case(rng, dtype, shape):
    sc, res, g = (random_array(rng, shape, dtype) for _ in range(3))
    return sc, res, random_array(rng, shape[-1:], dtype), g


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_forward_and_gradients_match_reference(rng, dtype, shape, training, mode, scaling):
    sc, res, gamma, g = _case(rng, dtype, shape)
    kw = dict(training=training, mode=mode, scaling=scaling, seed=11, offset=4)
    want = reference.forward(sc, res, 0.6, gamma=gamma, **kw)
    want_single = reference.forward(None, res, 0.6, gamma=gamma, **kw)
    _, want_gres, want_ggamma = reference.backward(g, 0.6, gamma=gamma, residual=res, **kw)
    with _x64(dtype):
        f = jax.jit(lambda a, b, c: sdj.stochastic_depth(a, b, 0.6, gamma=c, **kw))
        assert_bits_equal(sdj.stochastic_depth(sc, res, 0.6, gamma=gamma, **kw), want)
        assert_bits_equal(f(sc, res, gamma), want)
        single = jax.jit(lambda b, c: sdj.drop_path(b, 0.6, gamma=c, **kw))
        assert_bits_equal(single(res, gamma), want_single)
        _, vjp = jax.vjp(f, sc, res, gamma)
        g_sc, g_res, g_gamma = jax.jit(vjp)(jnp.asarray(g))
        assert_bits_equal(g_sc, g)
        assert_bits_equal(g_res, want_gres)
        assert_bits_equal(g_gamma, want_ggamma)
        _, vjp1 = jax.vjp(single, res, gamma)
        g1_res, g1_gamma = vjp1(jnp.asarray(g))
        assert_bits_equal(g1_res, want_gres)
        assert_bits_equal(g1_gamma, want_ggamma)


def test_grad_of_a_loss_under_jit_with_a_traced_seed():
    rng = np.random.default_rng(3)
    sc, res, gamma, _ = _case(rng, np.float32, (8, 4, 16))

    def loss(sc, res, gamma, seed):
        return sdj.stochastic_depth(sc, res, 0.5, seed=seed, gamma=gamma,
                                    scaling="training").sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(sc, res, gamma, jnp.uint32(7))
    ones = np.ones_like(sc)
    want = stochdepth.backward(ones, 0.5, seed=7, scaling="training", gamma=gamma, residual=res)
    for got, w in zip(grads, want):
        assert_bits_equal(got, w)
    # A new seed under the same jitted function: a new mask, the reference's.
    grads9 = jax.jit(jax.grad(loss, argnums=2))(sc, res, gamma, jnp.uint32(9))
    assert_bits_equal(grads9, reference.backward(ones, 0.5, seed=9, scaling="training",
                                                 gamma=gamma, residual=res)[2])


def test_the_backward_pass_is_one_call_of_the_backward_target():
    x = np.ones((4, 3), np.float32)
    gamma = np.full((3,), 0.5, np.float32)
    f = lambda a, b, c: sdj.stochastic_depth(a, b, 0.5, seed=1, gamma=c).sum()  # noqa: E731
    text = jax.jit(jax.value_and_grad(f, argnums=(1, 2))).lower(x, x, gamma).as_text()
    assert text.count("stochdepth_backward_gamma") == 1
    assert "stochdepth_residual_gamma" in text
    assert "stochdepth_scale" not in text  # no separate call for grad_residual


@pytest.mark.parametrize("training", [True, False])
def test_donate_shortcut_with_gamma(rng, training):
    sc, res, gamma, g = _case(rng, np.float32, (6, 5, 8))
    kw = dict(training=training, seed=2, offset=1)
    want = reference.forward(sc, res, 0.6, gamma=gamma, **kw)
    f = jax.jit(lambda a, b, c: sdj.stochastic_depth(a, b, 0.6, gamma=c, donate_shortcut=True,
                                                     **kw), donate_argnums=0)
    assert_bits_equal(f(jnp.array(sc), res, gamma), want)
    assert_bits_equal(sdj.stochastic_depth(sc, res, 0.6, gamma=gamma, donate_shortcut=True, **kw),
                      want)
    _, vjp = jax.vjp(lambda a, b, c: sdj.stochastic_depth(a, b, 0.6, gamma=c,
                                                         donate_shortcut=True, **kw),
                     sc, res, gamma)
    got = vjp(jnp.asarray(g))
    for a, b in zip(got, reference.backward(g, 0.6, gamma=gamma, residual=res, **kw)):
        assert_bits_equal(a, b)


def test_apply_takes_gamma():
    from stochdepth._op import OpConfig

    rng = np.random.default_rng(5)
    sc, res, gamma, _ = _case(rng, np.float32, (4, 6))
    got = sdj.apply(sc, res, sdj.key_words(3, 2), OpConfig(0.5, "row", 0, "inference", True),
                    gamma=gamma)
    assert_bits_equal(got, reference.forward(sc, res, 0.5, seed=3, offset=2, gamma=gamma))


def test_bad_gamma_is_refused_with_the_raw_api_messages():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(TypeError, match="gamma must have dtype float32 like residual, got "
                                        "float16"):
        sdj.stochastic_depth(x, x, 0.5, seed=1, gamma=np.ones(6, np.float16))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\) \(the last axis of "
                                         r"residual\), got \(5,\)"):
        sdj.stochastic_depth(x, x, 0.5, seed=1, gamma=np.ones(5, np.float32))
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\).*got \(1, 6\)"):
        sdj.stochastic_depth(x, x, 0.5, seed=1, gamma=np.ones((1, 6), np.float32))
    with pytest.raises(ValueError, match=r"gamma scales the channels \(the last axis of x\), "
                                         r"which must not be the sample axis; got axis 1"):
        sdj.drop_path(x, 0.5, seed=1, axis=-1, gamma=np.ones(6, np.float32))
    with pytest.raises(TypeError, match="gamma must be an array"):
        sdj.stochastic_depth(x, x, 0.5, seed=1, gamma="scale")
    # The same messages as the raw API's for the same mistake.
    for bad in (np.ones(6, np.float16), np.ones(5, np.float32)):
        with pytest.raises((TypeError, ValueError)) as raw:
            stochdepth.forward(x, x, 0.5, seed=1, gamma=bad)
        with pytest.raises(raw.type, match=re.escape(str(raw.value))):
            sdj.stochastic_depth(x, x, 0.5, seed=1, gamma=bad)


def test_the_ffi_target_refuses_a_bad_gamma_itself():
    # A direct ffi_call with a gamma of the wrong shape gets an error, never a crash.
    from stochdepth.jax import _ops

    x = jnp.ones((4, 6), jnp.float32)
    with pytest.raises(Exception, match="gamma must have the inputs' dtype and shape"):
        _ops._call("stochdepth_residual_gamma", x, (x, x, jnp.ones(5, jnp.float32),
                                                    sdj.key_words(1)),
                   (0.5, 0, 1, 0, 0)).block_until_ready()
