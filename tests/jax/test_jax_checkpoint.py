"""stochdepth.jax under jax.checkpoint (docs/design.md, "Activation checkpointing"): seed and
offset are operands, so a rematerialised forward draws the mask of the forward it replays (run by
tests/test_jax.py). XLA fuses a rematerialised matmul and tanh differently, so the gradients
agree to rounding, and the samples whose branch was dropped (zero input gradient) exactly."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import stochdepth.jax as sdj  # noqa: E402


def _block(params, x, offset):
    w1, w2 = params
    h = jnp.tanh(x @ w1)
    h = sdj.stochastic_depth(x, h, 0.5, seed=7, offset=offset)
    h = sdj.drop_path(jnp.tanh(h @ w2), 0.6, seed=8, offset=offset)
    return jnp.tanh(h @ w2)


def _loss(block):
    def loss(params, x, offset):
        for i in range(3):
            x = block(params, x, offset * 3 + i)
        return jnp.sum(x * x)
    return loss


def _branch(w, x, offset):
    return sdj.drop_path(jnp.tanh(x @ w), 0.5, seed=3, offset=offset)


def _dropped_rows(grad_x):
    return np.flatnonzero(~np.asarray(grad_x).any(axis=1))


@pytest.mark.parametrize("policy", [None, "nothing_saveable", "dots_saveable"])
@pytest.mark.parametrize("jit", [False, True])
def test_checkpointed_gradients_equal_plain_ones(policy, jit):
    rng = np.random.default_rng(0)
    params = (jnp.asarray(rng.standard_normal((8, 8)), jnp.float32),
              jnp.asarray(rng.standard_normal((8, 8)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    remat = jax.checkpoint(_block, policy=None if policy is None
                           else getattr(jax.checkpoint_policies, policy))
    plain, checkpointed = jax.grad(_loss(_block)), jax.grad(_loss(remat))
    if jit:
        plain, checkpointed = jax.jit(plain), jax.jit(checkpointed)
    for offset in range(3):
        for a, b in zip(plain(params, x, offset), checkpointed(params, x, offset)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)

    # The drop pattern, exactly: a dropped sample's input gets no gradient through the branch.
    def loss(block):
        return lambda w, x, offset: jnp.sum(block(w, x, offset) * 1.5)

    grad_x = jax.grad(loss(_branch), argnums=1)
    grad_x_remat = jax.grad(loss(jax.checkpoint(_branch)), argnums=1)
    patterns = set()
    for offset in range(4):
        dropped = _dropped_rows(grad_x(params[0], x, offset))
        assert 0 < len(dropped) < x.shape[0]
        np.testing.assert_array_equal(dropped,
                                      _dropped_rows(grad_x_remat(params[0], x, offset)))
        patterns.add(tuple(dropped))
    assert len(patterns) > 1  # each offset its own mask: the comparison can fail
