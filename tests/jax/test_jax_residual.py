"""stochdepth.jax.stochastic_residual (run in its own process by tests/test_jax.py): the branch
runs on the kept samples only; the output is `reference.forward_kept` of the branch's rows bit
for bit, with a concrete key (exact count) and with a traced one (static buckets under
jax.jit: one compilation, one trace of the branch per bucket); the gradient is the backward
kernel's, the branch's parameters learn from kept samples only; state threading; the bucket
sizes; errors (docs/design.md, "Skipping dropped samples").
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sd_testutil import BF16, DTYPES, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import stochdepth.jax as sdj  # noqa: E402
from stochdepth.jax.residual import bucket_sizes  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SHAPE = (24, 3, 2)


def _x64(dtype):
    return jax.enable_x64(True) if np.dtype(dtype) == F64 else jax.enable_x64(False)


def _neg(z):
    return -z  # exact in every dtype: the expected rows are -x[keep] bit for bit


def _want(x, p, seed, offset, mode="row", scaling="inference"):
    keep = stochdepth.mask(x.shape[0], p, seed=seed, offset=offset, mode=mode)
    return reference.forward_kept(x, -x[keep], p, seed=seed, offset=offset, mode=mode,
                                  scaling=scaling)


# ---- forward: exact, with a concrete key and with a traced one


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_matches_forward_kept_concrete_and_traced_key(rng, dtype, mode, scaling):
    x = random_array(rng, SHAPE, dtype)
    kw = dict(mode=mode, scaling=scaling)
    traced = jax.jit(lambda x, o: sdj.stochastic_residual(x, _neg, 0.6, seed=5, offset=o, **kw))
    with _x64(dtype):
        for offset in range(6):
            want = _want(x, 0.6, 5, offset, **kw)
            assert_bits_equal(sdj.stochastic_residual(x, _neg, 0.6, seed=5, offset=offset, **kw),
                              want)
            # A Python offset under jit is still concrete: the exact count, traced in.
            static = jax.jit(lambda x: sdj.stochastic_residual(x, _neg, 0.6, seed=5,
                                                               offset=offset, **kw))  # noqa: B023
            assert_bits_equal(static(x), want)
            assert_bits_equal(traced(x, jnp.uint32(offset)), want)


def test_same_kept_set_as_stochastic_depth(rng):
    """Same (seed, offset), PRNG key included: the mask of `stochastic_depth`, and the dense
    formulation's output for a sample-wise branch."""
    x = random_array(rng, (40, 4), np.float32, special=False)
    key = jax.random.PRNGKey(77)
    for seed in (9, key, jnp.uint32(9)):
        for offset in (0, 3):
            dense = sdj.stochastic_depth(x, -x, 0.5, seed=seed, offset=offset)
            got = sdj.stochastic_residual(x, _neg, 0.5, seed=seed, offset=offset)
            jitted = jax.jit(lambda x, s, o: sdj.stochastic_residual(x, _neg, 0.5, seed=s,
                                                                     offset=o))
            assert_bits_equal(got, dense)
            assert_bits_equal(jitted(x, seed, jnp.uint32(offset)), dense)


def test_branch_sees_the_kept_rows_only(rng):
    # No subnormals: XLA:CPU flushes them in the branch's own arithmetic (docs/design.md,
    # "Arithmetic"), which is not the library's.
    x = random_array(rng, (32, 3), np.float32, special=False)
    x[~stochdepth.mask(32, 0.5, seed=2, offset=1)] = np.nan  # dropped rows: never read
    seen = []

    def branch(z):
        seen.append(np.asarray(z))
        return z * 2

    out = sdj.stochastic_residual(x, branch, 0.5, seed=2, offset=1)
    keep = stochdepth.mask(32, 0.5, seed=2, offset=1)
    assert_bits_equal(seen[0], x[keep])
    assert_bits_equal(out, reference.forward_kept(x, x[keep] * 2, 0.5, seed=2, offset=1))
    # Traced: the bucket's padding is the first kept sample again, never a dropped one.
    jitted = jax.jit(lambda x, o: sdj.stochastic_residual(x, lambda z: z * 2, 0.5, seed=2,
                                                          offset=o))
    got = np.asarray(jitted(x, jnp.uint32(1)))
    assert_bits_equal(got, reference.forward_kept(x, x[keep] * 2, 0.5, seed=2, offset=1))
    assert not np.isnan(got[keep]).any()


def test_jit_compiles_once_and_traces_the_branch_once_per_bucket(rng):
    x = random_array(rng, (64, 2), np.float32)
    traced_sizes = []

    def branch(z):
        traced_sizes.append(z.shape[0])
        return -z

    step = jax.jit(lambda x, o: sdj.stochastic_residual(x, branch, 0.7, seed=4, offset=o))
    sizes = bucket_sizes(64, 0.7)
    assert len(sizes) == 4
    used = set()
    for offset in range(40):
        assert_bits_equal(step(x, jnp.uint32(offset)), _want(x, 0.7, 4, offset))
        count = int(stochdepth.mask(64, 0.7, seed=4, offset=offset).sum())
        used.add(min(s for s in sizes if s >= count))
    assert len(used) >= 3  # the steps took several buckets
    assert step._cache_size() == 1
    # One trace per bucket size, plus one abstract trace (jax.eval_shape) for the output type.
    assert sorted(set(traced_sizes)) == list(sizes)
    assert len(traced_sizes) <= len(sizes) + 1


def test_nothing_kept_runs_no_branch():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)

    def branch(z):
        raise AssertionError("the branch ran")

    assert_bits_equal(sdj.stochastic_residual(x, branch, 0.0, seed=1), x)
    assert_bits_equal(jax.jit(lambda o: sdj.stochastic_residual(x, branch, 0.0, seed=1,
                                                                offset=o))(jnp.uint32(3)), x)
    # "batch" mode: a dropped call (offset 0 of seed 3 drops at p = 0.5) runs nothing either.
    assert not stochdepth.mask(1, 0.5, seed=3, offset=0, mode="batch")[0]
    assert_bits_equal(sdj.stochastic_residual(x, branch, 0.5, seed=3, mode="batch"), x)


def test_batch_mode_and_p_one_trace_the_whole_batch_once(rng):
    x = random_array(rng, (16, 3), np.float32)
    for p, mode in ((0.5, "batch"), (1.0, "row")):
        shapes = []

        def branch(z, shapes=shapes):
            shapes.append(z.shape)
            return -z

        step = jax.jit(lambda x, o, p=p, mode=mode, branch=branch: sdj.stochastic_residual(
            x, branch, p, seed=8, offset=o, mode=mode))
        for offset in range(8):
            assert_bits_equal(step(x, jnp.uint32(offset)), _want(x, p, 8, offset, mode))
        assert set(shapes) == {(16, 3)}
        assert step._cache_size() == 1


def test_inference_is_x_plus_c_branch(rng):
    x = random_array(rng, SHAPE, np.float32)
    for scaling in ("inference", "training"):
        got = sdj.stochastic_residual(x, _neg, 0.3, training=False, scaling=scaling)
        assert_bits_equal(got, reference.forward(x, -x, 0.3, training=False, scaling=scaling))


def test_branch_dtype_is_promoted(rng):
    x = random_array(rng, (8, 2), BF16, special=False)
    w = jnp.float32(1.0)
    got = sdj.stochastic_residual(x, lambda z: z * w, 0.5, seed=3)  # bfloat16 * float32
    x32 = x.astype(np.float32)
    keep = stochdepth.mask(8, 0.5, seed=3, offset=0)
    assert_bits_equal(got, reference.forward_kept(x32, x32[keep], 0.5, seed=3))


# ---- gradients


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_input_gradient_is_the_backward_kernel(rng, traced, scaling):
    """d/dx of sum(out * g) with branch -z: g + (-(s * g)) on kept rows, g on dropped ones:
    the branch's output gets `backward_kept`'s cotangent exactly."""
    x = random_array(rng, (32, 3), np.float32, special=False)
    g = random_array(rng, (32, 3), np.float32, special=False)

    def loss(x, o):
        return jnp.sum(sdj.stochastic_residual(x, _neg, 0.6, seed=6, offset=o,
                                               scaling=scaling) * g)

    grad = jax.jit(jax.grad(loss))
    for offset in range(4):
        o = jnp.uint32(offset) if traced else offset
        got = grad(x, o) if traced else jax.grad(loss)(x, o)
        kept = reference.backward_kept(g, 0.6, seed=6, offset=offset, scaling=scaling)
        keep = stochdepth.mask(32, 0.6, seed=6, offset=offset)
        want = g.copy()
        want[keep] = g[keep] + -kept
        assert_bits_equal(got, want)


@pytest.mark.parametrize("traced", [False, True])
def test_gradients_match_the_dense_formulation(rng, traced):
    """A branch with parameters, against stochastic_depth(x, branch(x)) with the same mask:
    the input gradient exactly (the branch is sample-wise), the parameters' up to the order of
    their sum over rows."""
    x = random_array(rng, (48, 5), np.float32, special=False)
    g = random_array(rng, (48, 5), np.float32, special=False)
    params = (jnp.asarray(rng.standard_normal(5), jnp.float32),
              jnp.asarray(rng.standard_normal(5), jnp.float32))

    def branch(params, z):
        w, b = params
        return jnp.tanh(z * w) + b

    def skip(params, x, o):
        out = sdj.stochastic_residual(x, lambda z: branch(params, z), 0.7, seed=12, offset=o,
                                      scaling="training")
        return jnp.sum(out * g)

    def dense(params, x, o):
        out = sdj.stochastic_depth(x, branch(params, x), 0.7, seed=12, offset=o,
                                   scaling="training")
        return jnp.sum(out * g)

    for offset in range(3):
        o = jnp.uint32(offset) if traced else offset
        f = jax.jit(jax.grad(skip, argnums=(0, 1))) if traced else jax.grad(skip, (0, 1))
        (gw, gb), gx = f(params, x, o)
        (dw, db), dx = jax.jit(jax.grad(dense, argnums=(0, 1)))(params, x, o)
        np.testing.assert_allclose(gx, dx, rtol=1e-6, atol=1e-6)
        keep = stochdepth.mask(48, 0.7, seed=12, offset=offset)
        assert_bits_equal(np.asarray(gx)[~keep], g[~keep])  # dropped rows: g exactly
        np.testing.assert_allclose(gw, dw, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gb, db, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("traced", [False, True])
def test_parameters_learn_from_kept_rows_only(rng, traced):
    """Inf in the dropped rows: the dense formulation's weight gradient is NaN (inf * 0); the
    skip-compute one never reads those rows, padding included."""
    x = random_array(rng, (32, 4), np.float32, special=False)
    keep = stochdepth.mask(32, 0.5, seed=3, offset=2)
    x[~keep] = np.inf
    w = jnp.ones((4,), jnp.float32)

    def loss(w, o):
        return jnp.sum(sdj.stochastic_residual(x, lambda z: z * w, 0.5, seed=3, offset=o)[keep])

    o = jnp.uint32(2) if traced else 2
    gw = jax.jit(jax.grad(loss))(w, o) if traced else jax.grad(loss)(w, o)
    np.testing.assert_allclose(gw, x[keep].astype(np.float64).sum(0), rtol=1e-6)
    dense_w = jax.grad(lambda w: jnp.sum(sdj.stochastic_depth(x, x * w, 0.5, seed=3,
                                                              offset=2)[keep]))(w)
    assert np.isnan(np.asarray(dense_w)).all()


def test_traced_gradient_keeps_one_buckets_activations(rng):
    """Under grad a lax.switch saves the union of its branches' residuals: saved per bucket, the
    gradient's XLA temporaries were about 3x the dense branch's (every bucket's activations, the
    ones not taken as zeros). Rematerialised buckets keep them near the dense branch's."""
    x = jnp.asarray(random_array(rng, (8, 64, 128), np.float32, special=False))
    w1 = jnp.asarray(random_array(rng, (128, 1024), np.float32, special=False) * 0.05)
    w2 = jnp.asarray(random_array(rng, (1024, 128), np.float32, special=False) * 0.05)

    def branch(z, w1, w2):
        return jnp.tanh(jnp.tanh(z @ w1) @ w2)

    def dense(w1, w2, x, o):
        return jnp.sum(x + branch(x, w1, w2))

    def skip(w1, w2, x, o):
        return jnp.sum(sdj.stochastic_residual(x, lambda z: branch(z, w1, w2), 0.6, seed=5,
                                               offset=o))

    def temp_bytes(f):
        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(w1, w2, x, jnp.uint32(3)).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this jaxlib gives no memory analysis")
        return analysis.temp_size_in_bytes

    assert len(bucket_sizes(8, 0.6)) == 4
    assert temp_bytes(skip) < 1.5 * temp_bytes(dense)
    # And the gradient is still the kept rows' only.
    keep = stochdepth.mask(8, 0.6, seed=5, offset=3)
    gx = jax.jit(jax.grad(skip, argnums=2))(w1, w2, x, jnp.uint32(3))
    assert_bits_equal(np.asarray(gx)[~keep], np.ones_like(np.asarray(x)[~keep]))


# ---- state threaded through the branch


@pytest.mark.parametrize("traced", [False, True])
def test_state_is_threaded_and_unchanged_when_nothing_runs(traced):
    x = np.ones((16, 2), np.float32)

    def branch(z, state):
        return z * 2, {"calls": state["calls"] + 1, "rows": state["rows"] + z.shape[0]}

    def call(o, mode):
        return sdj.stochastic_residual(x, branch, 0.5, seed=3, offset=o, mode=mode,
                                       state={"calls": jnp.int32(0), "rows": jnp.int32(0)})

    f = jax.jit(call, static_argnums=1) if traced else call
    for offset in range(6):
        keep = stochdepth.mask(16, 0.5, seed=3, offset=offset, mode="batch")
        out, state = f(jnp.uint32(offset) if traced else offset, "batch")
        assert int(state["calls"]) == int(keep[0])
        assert_bits_equal(out, np.where(keep[:, None], np.float32(3), x))
    out, state = f(jnp.uint32(1) if traced else 1, "row")
    count = int(stochdepth.mask(16, 0.5, seed=3, offset=1).sum())
    assert int(state["calls"]) == 1
    rows = int(state["rows"])
    assert rows == count if not traced else rows == min(s for s in bucket_sizes(16, 0.5)
                                                          if s >= count)
    _, inference_state = sdj.stochastic_residual(
        x, branch, 0.5, training=False, state={"calls": 0, "rows": 0})
    assert inference_state == {"calls": 1, "rows": 16}


# ---- bucket sizes


def _quantile(n, p, q):
    """The smallest k with P(Binomial(n, p) <= k) >= q, in exact rational arithmetic."""
    from fractions import Fraction

    pf = Fraction(p)
    cdf = Fraction(0)
    for k in range(n + 1):
        cdf += math.comb(n, k) * pf**k * (1 - pf) ** (n - k)
        if cdf >= q:
            return k
    return n


@pytest.mark.parametrize("batch, p, count", [(16, 0.5, 4), (64, 0.9, 4), (30, 0.25, 3),
                                             (128, 0.8, 8)])
def test_bucket_sizes_are_binomial_quantiles(batch, p, count):
    want = sorted({_quantile(batch, p, i / count) for i in range(1, count)} - {0, batch})
    assert bucket_sizes(batch, p, count) == tuple(want) + (batch,)


def test_bucket_sizes_edges():
    assert bucket_sizes(8, 0.5, (3, 9, 3, 5)) == (3, 5, 8)  # sizes past the batch: dropped
    assert bucket_sizes(8, 0.5, 1) == (8,)
    assert bucket_sizes(8, 0.5, mode="batch") == (8,)
    assert bucket_sizes(8, 1.0) == (8,)
    assert bucket_sizes(8, 0.0) == ()
    assert bucket_sizes(0, 0.5) == ()


def test_explicit_buckets_under_jit(rng):
    x = random_array(rng, (20, 3), np.float32)
    sizes = []

    def branch(z):
        sizes.append(z.shape[0])
        return -z

    step = jax.jit(lambda x, o: sdj.stochastic_residual(x, branch, 0.5, seed=1, offset=o,
                                                        buckets=(5, 10, 15)))
    for offset in range(10):
        assert_bits_equal(step(x, jnp.uint32(offset)), _want(x, 0.5, 1, offset))
    assert set(sizes) == {5, 10, 15, 20}


# ---- errors


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(buckets=0), ValueError, "buckets must be at least 1, got 0"),
    (dict(buckets=True), TypeError, "buckets must be a positive integer"),
    (dict(buckets=2.5), TypeError, "buckets must be a positive integer .* got float"),
    (dict(buckets=()), ValueError, "buckets must name at least one size"),
    (dict(buckets=(4, 0)), ValueError, "buckets sizes must be >= 1, got 0"),
    (dict(buckets=(4, 2.0)), TypeError, "buckets sizes must be integers, got float"),
    (dict(seed=None), ValueError, "seed is required when training=True"),
    (dict(seed="a"), TypeError, "seed must be an integer"),
    (dict(mode="sample"), ValueError, "mode must be 'row' or 'batch'"),
    (dict(scaling="x"), ValueError, "scaling must be 'inference' or 'training'"),
])
def test_bad_arguments(kwargs, exc, match):
    x = np.ones((4, 2), np.float32)
    kw = dict(seed=1)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        sdj.stochastic_residual(x, _neg, 0.5, **kw)


def test_bad_inputs_and_branches():
    x = np.ones((8, 2), np.float32)
    with pytest.raises(ValueError, match=r"survival_prob must be in \[0, 1\], got 1.5"):
        sdj.stochastic_residual(x, _neg, 1.5, seed=1)
    with pytest.raises(TypeError, match="branch_fn must be callable, got int"):
        sdj.stochastic_residual(x, 3, 0.5, seed=1)
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, got "
                                        "int32"):
        sdj.stochastic_residual(np.ones((4, 2), np.int32), _neg, 0.5, seed=1)
    with pytest.raises(ValueError, match="x must have rank >= 1"):
        sdj.stochastic_residual(np.float32(1), _neg, 0.5, seed=1)
    keep = stochdepth.mask(8, 0.5, seed=1, offset=0)
    n = int(keep.sum())
    with pytest.raises(ValueError, match=rf"branch must keep the shape of its input, got "
                                         rf"\({n}, 1\) for an input of shape \({n}, 2\)"):
        sdj.stochastic_residual(x, lambda z: z[:, :1], 0.5, seed=1)
    with pytest.raises(ValueError, match="branch must keep the shape of its input"):
        jax.jit(lambda o: sdj.stochastic_residual(x, lambda z: z[:1], 0.5, seed=1,
                                                  offset=o))(jnp.uint32(0))
    with pytest.raises(TypeError, match=r"branch_fn with state must return \(output, "
                                        r"new_state\), got Array"):
        sdj.stochastic_residual(x, lambda z, s: z, 0.5, seed=1, state=())
