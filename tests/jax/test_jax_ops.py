"""stochdepth.jax (run in its own process by tests/test_jax.py): the kernels as XLA FFI custom
calls give `stochdepth.reference` bit for bit, eager and under jit, for every dtype, mode,
scaling, axis and training flag; the gradient is the backward kernel's, with no mask saved; seed
and offset are operands (a new mask without recompiling); PRNG keys map to (seed, offset) as
documented; vmap, errors and the version check.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16, DTYPES, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
# Not importorskip: with jax installed, a build without stochdepth._jax_ffi must fail here.
import stochdepth.jax as sdj  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SHAPE = (6, 5, 3)


def _x64(dtype):
    # float64 arrays exist in JAX only with x64 enabled; the others run in the default mode.
    return jax.enable_x64(True) if np.dtype(dtype) == F64 else jax.enable_x64(False)


def _pair(rng, dtype, shape=SHAPE):
    return random_array(rng, shape, dtype), random_array(rng, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_forward_matches_reference_eager_and_jit(rng, dtype, training, mode, scaling, axis):
    a, b = _pair(rng, dtype)
    kw = dict(training=training, mode=mode, axis=axis, scaling=scaling)
    want = reference.forward(a, b, 0.6, seed=11, offset=4, **kw)
    want_single = reference.forward(None, b, 0.6, seed=11, offset=4, **kw)
    with _x64(dtype):
        got = sdj.stochastic_depth(a, b, 0.6, seed=11, offset=4, **kw)
        jitted = jax.jit(lambda a, b: sdj.stochastic_depth(a, b, 0.6, seed=11, offset=4, **kw))
        single = jax.jit(lambda b: sdj.drop_path(b, 0.6, seed=11, offset=4, **kw))(b)
        assert_bits_equal(got, want)
        assert_bits_equal(jitted(a, b), want)
        assert_bits_equal(single, want_single)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_vjp_is_the_backward_kernel(rng, dtype, training, scaling):
    a, b = _pair(rng, dtype)
    w = random_array(rng, SHAPE, dtype)
    kw = dict(training=training, scaling=scaling, mode="row", axis=1)
    want = reference.backward(w, 0.3, seed=5, offset=9, **kw)[1]
    with _x64(dtype):
        _, vjp = jax.vjp(lambda a, b: sdj.stochastic_depth(a, b, 0.3, seed=5, offset=9, **kw),
                         a, b)
        g_short, g_res = jax.jit(vjp)(jnp.asarray(w))
        assert_bits_equal(g_short, w)
        assert_bits_equal(g_res, want)
        _, vjp1 = jax.vjp(lambda b: sdj.drop_path(b, 0.3, seed=5, offset=9, **kw), b)
        assert_bits_equal(vjp1(jnp.asarray(w))[0], want)


def test_grad_and_value_and_grad_under_jit():
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.ones((4, 3), np.float32)

    def loss(a, b, seed):
        return sdj.stochastic_depth(a, b, 0.5, seed=seed, scaling="training").sum()

    value, (ga, gb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(a, b, jnp.uint32(7))
    out = stochdepth.forward(a, b, 0.5, seed=7, scaling="training")
    assert float(value) == float(out.sum(dtype=np.float32))
    assert_bits_equal(ga, np.ones_like(a))
    assert_bits_equal(gb, stochdepth.backward(np.ones_like(b), 0.5, seed=7,
                                              scaling="training")[1])
    assert_bits_equal(jax.grad(loss, argnums=1)(a, b, 7), gb)


def test_backward_saves_no_mask_and_runs_the_backward_target():
    a = np.ones(SHAPE, np.float32)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda a, b: sdj.stochastic_depth(a, b, 0.5, seed=1).sum(), argnums=1))(a, a)
    text = str(jaxpr)
    assert "stochdepth_residual" in text and "stochdepth_scale" in text
    assert "bool" not in text  # no mask array anywhere: only the uint32[4] key travels


def test_traced_seed_and_offset_draw_new_masks_without_recompiling():
    a = np.zeros((64, 2), np.float32)
    b = np.ones((64, 2), np.float32)
    f = jax.jit(lambda seed, offset: sdj.stochastic_depth(a, b, 0.5, seed=seed, offset=offset))
    masks = set()
    for seed, offset in [(0, 0), (1, 0), (1, 1), (2**32 - 1, 7)]:
        got = f(jnp.uint32(seed), jnp.uint32(offset))
        assert_bits_equal(got, stochdepth.forward(a, b, 0.5, seed=seed, offset=offset))
        masks.add(np.asarray(got)[:, 0].tobytes())
    assert len(masks) == 4
    assert f._cache_size() == 1


def test_64_bit_seed_offset_and_signed_32_bit_patterns():
    b = np.ones((40, 3), np.float32)
    seed, offset = 2**40 + 12345, 2**33 + 3
    assert_bits_equal(sdj.drop_path(b, 0.5, seed=seed, offset=offset),
                      stochdepth.forward(None, b, 0.5, seed=seed, offset=offset))
    # A 32-bit signed value is its bit pattern.
    assert_bits_equal(jax.jit(lambda s: sdj.drop_path(b, 0.5, seed=s))(jnp.int32(-1)),
                      stochdepth.forward(None, b, 0.5, seed=2**32 - 1))
    with jax.enable_x64(True):
        f = jax.jit(lambda s, o: sdj.drop_path(b, 0.5, seed=s, offset=o))
        assert_bits_equal(f(jnp.uint64(seed), jnp.int64(offset)),
                          stochdepth.forward(None, b, 0.5, seed=seed, offset=offset))


@pytest.mark.parametrize("make", ["typed", "raw"])
def test_prng_key_maps_to_seed_as_documented(make):
    b = np.ones((50, 2), np.float32)
    for s in (0, 42, 2**31 + 5):
        key = jax.random.key(s) if make == "typed" else jax.random.PRNGKey(s)
        for k in (key, jax.random.split(key)[1]):
            data = np.asarray(jax.random.key_data(k) if make == "typed" else k)
            seed = int(data[0]) << 32 | int(data[1])
            got = jax.jit(lambda k: sdj.drop_path(b, 0.5, seed=k, offset=3))(k)
            keep = np.asarray(got)[:, 0] != 0
            np.testing.assert_array_equal(keep, stochdepth.mask(50, 0.5, seed=seed, offset=3))
    # PRNGKey(s) for s < 2**32 is the seed s itself.
    assert_bits_equal(sdj.drop_path(b, 0.5, seed=jax.random.PRNGKey(42)),
                      stochdepth.forward(None, b, 0.5, seed=42))


def test_vmap_runs_each_element_with_its_own_key():
    x = np.arange(3 * 20 * 2, dtype=np.float32).reshape(3, 20, 2) + 1
    seeds = jnp.arange(3, dtype=jnp.uint32)
    out = jax.jit(jax.vmap(lambda x, s: sdj.drop_path(x, 0.5, seed=s, scaling="training")))(
        x, seeds)
    for i in range(3):
        assert_bits_equal(out[i], stochdepth.forward(None, x[i], 0.5, seed=i,
                                                     scaling="training"))
    grads = jax.vmap(jax.grad(lambda x, s: sdj.drop_path(x, 0.5, seed=s).sum()))(x, seeds)
    for i in range(3):
        assert_bits_equal(grads[i], stochdepth.backward(np.ones_like(x[i]), 0.5, seed=i)[1])


def test_dropped_residual_is_not_read():
    a = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    keep = stochdepth.mask(8, 0.5, seed=3)
    assert keep.any() and not keep.all()
    b = np.where(keep[:, None], np.ones_like(a), np.nan).astype(np.float32)
    out = np.asarray(jax.jit(lambda a, b: sdj.stochastic_depth(a, b, 0.5, seed=3))(a, b))
    assert_bits_equal(out[~keep], a[~keep])
    assert_bits_equal(out[keep], a[keep] + 1)


def test_empty_and_rank_one():
    assert sdj.drop_path(np.zeros((0, 4), np.float32), 0.5, seed=1).shape == (0, 4)
    v = np.ones(30, BF16)
    assert_bits_equal(sdj.drop_path(v, 0.5, seed=2), reference.forward(None, v, 0.5, seed=2))


def test_errors():
    a = np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        sdj.drop_path(np.ones((4, 2), np.int32), 0.5, seed=1)
    with pytest.raises(TypeError, match="same dtype"):
        sdj.stochastic_depth(a, a.astype(np.float16), 0.5, seed=1)
    with pytest.raises(ValueError, match="same shape"):
        sdj.stochastic_depth(a, a[:2], 0.5, seed=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sdj.drop_path(a, 1.5, seed=1)
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda p: sdj.drop_path(a, p, seed=1))(0.5)
    with pytest.raises(ValueError, match="seed is required"):
        sdj.drop_path(a, 0.5)
    assert_bits_equal(sdj.drop_path(a, 0.5, training=False), a * np.float32(0.5))
    with pytest.raises(ValueError, match="mode"):
        sdj.drop_path(a, 0.5, seed=1, mode="col")
    with pytest.raises(ValueError, match="scaling"):
        sdj.drop_path(a, 0.5, seed=1, scaling="x")
    with pytest.raises(ValueError, match="out of range"):
        sdj.drop_path(a, 0.5, seed=1, axis=2)
    with pytest.raises(ValueError, match=r"2\*\*64"):
        sdj.drop_path(a, 0.5, seed=-1)
    with pytest.raises(TypeError, match="integer"):
        sdj.drop_path(a, 0.5, seed=1.5)
    with pytest.raises(ValueError, match="2 uint32 words"):
        sdj.drop_path(a, 0.5, seed=jax.random.key(0, impl="rbg"))


def test_direct_ffi_call_with_bad_attributes_is_an_error_not_a_crash():
    call = jax.ffi.ffi_call("stochdepth_scale", jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(Exception, match=r"survival_prob must be in \[0, 1\]"):
        np.asarray(call(jnp.ones(4), jnp.zeros(4, jnp.uint32), survival_prob=np.float64(2.0),
                        axis=np.int64(0), training=np.int64(1), batch_mode=np.int64(0),
                        scaling=np.int64(0)))
    with pytest.raises(Exception, match="key operand must be uint32"):
        np.asarray(call(jnp.ones(4), jnp.zeros(3, jnp.uint32), survival_prob=np.float64(0.5),
                        axis=np.int64(0), training=np.int64(1), batch_mode=np.int64(0),
                        scaling=np.int64(0)))


def test_jaxlib_version_check_names_the_minimum():
    from stochdepth.jax import _ffi

    _ffi.check_jaxlib()  # the running jaxlib passes
    with pytest.raises(ImportError, match=r"jaxlib >= 0\.5\.0.*0\.4\.30"):
        _ffi.check_jaxlib("0.4.30")
    major, minor = _ffi.MODULE.ffi_api_version
    assert (major, minor) >= (0, 1)
    assert _ffi.MODULE.jaxlib_build_version
