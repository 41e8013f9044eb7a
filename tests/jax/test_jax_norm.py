"""stochdepth.jax.stochastic_depth_norm (run in its own process by tests/test_jax.py): the fused
residual + norm as XLA FFI custom calls gives `stochdepth.reference.forward_norm` /
`backward_norm` bit for bit, eager and under jit and grad, for every dtype, both norms, with and
without gamma, weight and bias; the key is an operand (a new mask without recompiling) and the
mask is the op's; bad arguments are clear errors, in Python and in the handlers.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import DTYPE_IDS, DTYPES, F64, assert_bits_equal, random_array

from stochdepth import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import stochdepth.jax as sdj  # noqa: E402
from stochdepth.jax import norm as sdn  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SHAPE = (6, 3, 37)  # 18 rows of an awkward width: a partial last group of 16 lanes
NAMES = ["grad_shortcut", "grad_residual", "grad_gamma", "grad_weight", "grad_bias"]


def _x64(dtype):
    return jax.enable_x64(True) if np.dtype(dtype) == F64 else jax.enable_x64(False)


def _case(dtype, norm, with_gamma, with_weight=True, *, shape=SHAPE, seed=0):
    rng = np.random.default_rng([shape[-1], seed])
    c = shape[-1]
    sc = random_array(rng, shape, dtype, special=False)
    res = random_array(rng, shape, dtype, special=False)
    w = (1 + 0.2 * rng.standard_normal(c)).astype(dtype) if with_weight else None
    b = (0.1 * rng.standard_normal(c)).astype(dtype) if with_weight and norm == "layer" else None
    g = (0.5 + rng.random(c)).astype(dtype) if with_gamma else None
    gy = random_array(rng, shape, dtype, special=False)
    gn = random_array(rng, shape, dtype, special=False)
    return sc, res, w, b, g, gy, gn


def _j(a):
    return None if a is None else jnp.asarray(a)


def _run(sc, res, p, w, b, g, gy, gn, jit, **kw):
    """(y, n) and the five gradients (None for an absent parameter) through jax.vjp."""
    def f(sc, res, g, w, b):
        return sdj.stochastic_depth_norm(sc, res, p, w, b, gamma=g, **kw)

    if jit:
        f = jax.jit(f)
    (y, n), vjp = jax.vjp(f, _j(sc), _j(res), _j(g), _j(w), _j(b))
    g_sc, g_res, g_g, g_w, g_b = vjp((_j(gy), _j(gn)))
    return (y, n), (g_sc, g_res, g_g, g_w, g_b)


def _check(dtype, norm, with_gamma, with_weight=True, *, p=0.5, jit=False, **kw):
    sc, res, w, b, g, gy, gn = _case(dtype, norm, with_gamma, with_weight)
    kw = dict(dict(norm=norm, eps=1e-5, seed=77, offset=5, training=True, mode="row",
                   scaling="training"), **kw)
    with _x64(dtype):
        (y, n), grads = _run(sc, res, p, w, b, g, gy, gn, jit, **kw)
    ey, en = reference.forward_norm(sc, res, p, w, b, gamma=g, **kw)
    assert_bits_equal(np.asarray(y), ey, "y")
    assert_bits_equal(np.asarray(n), en, "n")
    want = reference.backward_norm(gy, gn, ey, res, p, w, b, gamma=g, **kw)
    for name, a, e in zip(NAMES, grads, want):
        assert (a is None) == (e is None), name
        if e is not None:
            assert_bits_equal(np.asarray(a), e, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_gamma", [False, True], ids=["nogamma", "gamma"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_reference(dtype, norm, with_gamma, jit):
    _check(dtype, norm, with_gamma, jit=jit)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("training", [True, False])
def test_probabilities_modes_scalings(p, mode, scaling, training):
    _check(np.float32, "layer", True, p=p, mode=mode, scaling=scaling, training=training,
           jit=True)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_without_weight(norm):
    _check(np.float32, norm, False, with_weight=False, jit=True)
    _check(np.float32, norm, True, with_weight=False)


def test_rank_two_and_four():
    for shape in [(5, 20), (2, 3, 2, 17)]:
        sc, res, w, b, g, gy, gn = _case(np.float32, "layer", True, shape=shape)
        (y, n), _ = _run(sc, res, 0.5, w, b, g, gy, gn, True, seed=3)
        ey, en = reference.forward_norm(sc, res, 0.5, w, b, gamma=g, seed=3)
        assert_bits_equal(np.asarray(y), ey)
        assert_bits_equal(np.asarray(n), en)


def test_mask_is_the_ops():
    """A dropped sample's y is its shortcut bit for bit, and the samples dropped are those of
    `stochastic_depth` for the same (seed, offset)."""
    sc, res, w, b, g, _, _ = _case(np.float32, "layer", False, shape=(64, 2, 16))
    y, _ = sdj.stochastic_depth_norm(sc, res, 0.5, w, b, seed=11, offset=2)
    plain = sdj.stochastic_depth(sc, res, 0.5, seed=11, offset=2)
    dropped = np.all(np.asarray(plain) == sc, axis=(1, 2))
    assert 0 < dropped.sum() < 64
    assert_bits_equal(np.asarray(y), np.asarray(plain))  # no gamma: the same y as the op


def test_new_key_under_jit_does_not_recompile():
    sc, res, w, b, _, _, _ = _case(np.float32, "rms", False)
    traces = []

    @jax.jit
    def f(sc, res, w, seed, offset):
        traces.append(1)
        return sdj.stochastic_depth_norm(sc, res, 0.5, w, norm="rms", seed=seed, offset=offset)

    for seed, offset in [(1, 0), (2, 7), (3, 2**33)]:
        y, n = f(sc, res, w, jnp.uint32(seed), jnp.uint32(offset & 0xFFFFFFFF))
        ey, en = reference.forward_norm(sc, res, 0.5, w, norm="rms", seed=seed,
                                        offset=offset & 0xFFFFFFFF)
        assert_bits_equal(np.asarray(y), ey)
        assert_bits_equal(np.asarray(n), en)
    assert len(traces) == 1


def test_jit_of_grad():
    sc, res, w, b, g, _, _ = _case(np.float32, "layer", True)

    def loss(res, g, w, b):
        y, n = sdj.stochastic_depth_norm(sc, res, 0.8, w, b, gamma=g, seed=4)
        return jnp.sum(n * n) + jnp.sum(y)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(res, g, w, b)
    ey, en = reference.forward_norm(sc, res, 0.8, w, b, gamma=g, seed=4)
    gn = (en + en).astype(np.float32)  # d/dn sum(n * n), exactly as JAX computes it
    want = reference.backward_norm(np.ones_like(ey), gn, ey, res, 0.8, w, b, gamma=g, seed=4)
    for got, name, e in zip(grads, ["grad_residual", "grad_gamma", "grad_weight", "grad_bias"],
                            want[1:]):
        assert_bits_equal(np.asarray(got), e, name)


def test_vmap_runs_each_element_with_its_key():
    sc, res, w, b, _, _, _ = _case(np.float32, "layer", False, shape=(3, 8, 16))
    seeds = jnp.asarray([1, 2, 3], jnp.uint32)
    y, n = jax.vmap(lambda s, r, seed: sdj.stochastic_depth_norm(s, r, 0.5, w, b, seed=seed))(
        sc, res, seeds)
    for i in range(3):
        ey, en = reference.forward_norm(sc[i], res[i], 0.5, w, b, seed=i + 1)
        assert_bits_equal(np.asarray(y[i]), ey)
        assert_bits_equal(np.asarray(n[i]), en)


def test_empty_inputs():
    sc = np.zeros((0, 4), np.float32)
    w = np.ones(4, np.float32)

    def loss(sc, w):
        y, n = sdj.stochastic_depth_norm(sc, sc, 0.5, w, seed=1)
        return jnp.sum(n)

    gw = jax.grad(loss, argnums=1)(sc, w)
    assert_bits_equal(np.asarray(gw), np.zeros(4, np.float32))  # +0: no rows


# ---- errors ----------------------------------------------------------------------------------


def _args(shape=(4, 3, 8), dtype=np.float32):
    x = jnp.ones(shape, dtype)
    return x, x, jnp.ones(shape[-1], dtype)


def test_weight_width_mismatch():
    sc, res, w = _args()
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\) \(the last axis of "
                                         r"shortcut\), got \(7,\)"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w[:7], seed=1)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, jnp.zeros(9), seed=1)


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_eps_not_positive_finite(eps):
    sc, res, w = _args()
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, eps=eps, seed=1)


@pytest.mark.parametrize("eps", ["1e-5", True, None, jnp.float32(1e-5)])
def test_eps_not_a_number(eps):
    sc, res, w = _args()
    with pytest.raises(TypeError, match="eps must be a positive real number"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, eps=eps, seed=1)


def test_gamma_shape_and_dtype():
    sc, res, w = _args()
    with pytest.raises(ValueError, match=r"gamma must have shape \(8,\) \(the last axis of "
                                         r"shortcut\), got \(8, 1\)"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, gamma=jnp.ones((8, 1)), seed=1)
    with pytest.raises(TypeError, match="gamma must have dtype float32 like shortcut, got "
                                        "bfloat16"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, gamma=jnp.ones(8, jnp.bfloat16), seed=1)


def test_other_argument_errors():
    sc, res, w = _args()
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms', got 'batch'"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, norm="batch", seed=1)
    with pytest.raises(ValueError, match=r"bias must be None for norm='rms'"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w, w, norm="rms", seed=1)
    with pytest.raises(ValueError, match="shortcut must have rank >= 2"):
        sdj.stochastic_depth_norm(sc[0, 0], res[0, 0], 0.5, w, seed=1)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 3, 8\) like shortcut"):
        sdj.stochastic_depth_norm(sc, res[:2], 0.5, w, seed=1)
    with pytest.raises(TypeError, match="shortcut and residual must have the same dtype"):
        sdj.stochastic_depth_norm(sc, res.astype(jnp.bfloat16), 0.5, w, seed=1)
    with pytest.raises(TypeError, match="shortcut must be float16, bfloat16, float32 or float64"):
        sdj.stochastic_depth_norm(sc.astype(jnp.int32), res.astype(jnp.int32), 0.5, w, seed=1)
    with pytest.raises(ValueError, match="seed is required when training=True"):
        sdj.stochastic_depth_norm(sc, res, 0.5, w)
    with pytest.raises(ValueError, match=r"survival_prob must be in \[0, 1\]"):
        sdj.stochastic_depth_norm(sc, res, 1.5, w, seed=1)


def test_grads_of_the_wrong_shape():
    sc, res, w = _args()
    _, vjp = jax.vjp(lambda s, r: sdj.stochastic_depth_norm(s, r, 0.5, w, seed=1), sc, res)
    with pytest.raises(ValueError, match=r"got float32\[4,3,7\], but expected float32\[4,3,8\]"):
        vjp((jnp.ones((4, 3, 7)), jnp.ones((4, 3, 8))))
    with pytest.raises(ValueError, match=r"got bfloat16\[4,3,8\], but expected float32\[4,3,8\]"):
        vjp((jnp.ones((4, 3, 8)), jnp.ones((4, 3, 8), jnp.bfloat16)))


def _ffi(target, outs, *operands, **attrs):
    base = dict(survival_prob=np.float64(0.5), norm=np.int64(0), eps=np.float64(1e-5),
                training=np.int64(1), batch_mode=np.int64(0), scaling=np.int64(0),
                has_gamma=np.int64(0), has_weight=np.int64(1), has_bias=np.int64(0))
    base.update({k: (np.float64(v) if isinstance(v, float) else np.int64(v))
                 for k, v in attrs.items()})
    return jax.ffi.ffi_call(target, outs)(*operands, **base)


def test_handlers_refuse_bad_operands():
    """A direct ffi_call with bad operands or attributes is an error status, never a crash."""
    x = jnp.ones((4, 3, 8))
    key = jnp.zeros(4, jnp.uint32)
    e, w = jnp.zeros(0), jnp.ones(8)
    full = jax.ShapeDtypeStruct(x.shape, x.dtype)
    vec = jax.ShapeDtypeStruct((8,), x.dtype)
    none = jax.ShapeDtypeStruct((0,), x.dtype)
    ok = _ffi("stochdepth_norm_fwd", (full, full), x, x, e, w, e, key)
    assert np.isfinite(np.asarray(ok[1])).all()
    cases = [
        (("stochdepth_norm_fwd", (full, full), x, x, e, w[:7], e, key), {}, "shape \\(C,\\)"),
        (("stochdepth_norm_fwd", (full, full), x, x, e, w, e, key), {"eps": 0.0}, "eps"),
        (("stochdepth_norm_fwd", (full, full), x, x, e, w, e, key), {"eps": float("nan")},
         "eps"),
        (("stochdepth_norm_fwd", (full, full), x, x, e, w, e, key[:3]), {}, "uint32\\[4\\]"),
        (("stochdepth_norm_fwd", (full, full), x, x[:2], e, w, e, key), {}, "shape and dtype"),
        (("stochdepth_norm_fwd", (full, full), x, x, e, w, e, key), {"has_gamma": 1}, "(C,)"),
        (("stochdepth_norm_bwd", (full, full, none, vec, none), x[:, :, :7], x, x, e, e, w, key),
         {}, "shape and dtype of y"),
        (("stochdepth_norm_bwd", (full, full, none, vec, none), x, x, x, e, e, w, key),
         {"survival_prob": 2.0}, "survival_prob"),
        (("stochdepth_norm_bwd", (full, full, none, none, none), x, x, x, e, e, w, key), {},
         "parameter gradients"),
    ]
    for args, attrs, message in cases:
        with pytest.raises(Exception, match=message):
            np.asarray(_ffi(*args, **attrs)[0])


def test_targets_registered():
    """The norm's handlers exist for every platform the op has ("CUDA" exactly in a CUDA
    build); a CUDA target is registered without the command-buffer trait (the CUDA backward
    pass takes scratch from the library's pool)."""
    from jaxlib import xla_client

    module = sdj._ffi.MODULE
    assert sdn.TARGETS == ("stochdepth_norm_fwd", "stochdepth_norm_bwd")
    assert tuple(module.norm_platforms) == tuple(module.platforms)
    for platform in module.norm_platforms:
        assert tuple(module.norm_handlers(platform)) == sdn.TARGETS
    with pytest.raises(ValueError, match="no norm handlers for platform 'ROCM'"):
        module.norm_handlers("ROCM")
    assert "stochastic_depth_norm" in sdj.__all__
    jax.devices()  # starts the backends: a CUDA plugin would take the pending registrations
    if "CUDA" in module.norm_platforms and not [d for d in jax.devices() if d.platform == "gpu"]:
        pending = {name: (api, traits) for name, _, api, traits
                   in xla_client._custom_callback.get("CUDA", []) if name in sdn.TARGETS}
        default = xla_client.CustomCallTargetTraits.DEFAULT
        assert pending == {name: (1, default) for name in sdn.TARGETS}
