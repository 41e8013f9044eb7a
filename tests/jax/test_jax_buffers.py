"""stochdepth.jax where XLA:CPU owns the buffers (run in its own process by tests/test_jax.py):
`donate_shortcut=True` writes into the shortcut's buffer and gives `stochdepth.reference` bit for
bit, donated or not, jitted, with grad and vmap; a large fresh output takes huge pages, so a call
faults about once per 2 MiB rather than once per 4 KiB page (docs/design.md, "XLA:CPU buffers").
"""

from __future__ import annotations

import resource

import numpy as np
import pytest
from sd_testutil import DTYPES, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import stochdepth.jax as sdj  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SHAPE = (8, 5, 3)


def _x64(dtype):
    return jax.enable_x64(True) if np.dtype(dtype) == F64 else jax.enable_x64(False)


def _donating(**kw):
    return jax.jit(lambda a, b: sdj.stochastic_depth(a, b, 0.6, seed=11, offset=4,
                                                     donate_shortcut=True, **kw),
                   donate_argnums=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis", [0, -1])
def test_donate_shortcut_matches_reference(rng, dtype, training, axis):
    a, b = random_array(rng, SHAPE, dtype), random_array(rng, SHAPE, dtype)
    kw = dict(training=training, axis=axis, scaling="training")
    want = reference.forward(a, b, 0.6, seed=11, offset=4, **kw)
    with _x64(dtype):
        eager = sdj.stochastic_depth(a, b, 0.6, seed=11, offset=4, donate_shortcut=True, **kw)
        not_donated = jax.jit(lambda a, b: sdj.stochastic_depth(
            a, b, 0.6, seed=11, offset=4, donate_shortcut=True, **kw))
        ja = jnp.asarray(a)
        assert_bits_equal(eager, want)
        assert_bits_equal(not_donated(ja, b), want)
        assert_bits_equal(ja, a)  # not donated: XLA copied the shortcut, the caller's is intact
        assert_bits_equal(_donating(**kw)(jnp.asarray(a), b), want)


def test_donated_shortcut_buffer_becomes_the_result():
    a = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
    keep = stochdepth.mask(16, 0.5, seed=3)
    assert keep.any() and not keep.all()
    # A dropped sample's residual is NaN: in place, it is neither read nor written.
    b = np.where(keep[:, None], np.ones_like(a), np.nan).astype(np.float32)
    f = jax.jit(lambda a, b: sdj.stochastic_depth(a, b, 0.5, seed=3, donate_shortcut=True),
                donate_argnums=0)
    x = jnp.asarray(a)
    pointer = x.unsafe_buffer_pointer()
    out = f(x, b)
    assert out.unsafe_buffer_pointer() == pointer
    assert x.is_deleted()
    got = np.asarray(out)
    assert_bits_equal(got[~keep], a[~keep])
    assert_bits_equal(got[keep], a[keep] + 1)
    lowered = jax.jit(lambda a, b: sdj.stochastic_depth(a, b, 0.5, seed=3,
                                                        donate_shortcut=True)).lower(a, b)
    assert "output_operand_aliases" in lowered.as_text()
    default = jax.jit(lambda a, b: sdj.stochastic_depth(a, b, 0.5, seed=3)).lower(a, b)
    assert "output_operand_aliases" not in default.as_text()


def test_donate_shortcut_grad_and_vmap():
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2))

    def loss(a, b, seed, donate):
        out = sdj.stochastic_depth(a, b, 0.5, seed=seed, scaling="training",
                                   donate_shortcut=donate)
        return (out * out).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=3,
                   donate_argnums=0)
    v1, (ga1, gb1) = step(jnp.asarray(a), b, jnp.uint32(7), True)
    v0, (ga0, gb0) = step(jnp.asarray(a), b, jnp.uint32(7), False)
    assert float(v1) == float(v0)
    assert_bits_equal(ga1, ga0)
    assert_bits_equal(gb1, gb0)
    out = stochdepth.forward(a, b, 0.5, seed=7, scaling="training")
    assert_bits_equal(gb1, stochdepth.backward(2 * out, 0.5, seed=7, scaling="training")[1])

    x, y = a.reshape(3, 2, 4), b.reshape(3, 2, 4)
    seeds = jnp.arange(3, dtype=jnp.uint32)
    got = jax.jit(jax.vmap(lambda x, y, s: sdj.stochastic_depth(
        x, y, 0.5, seed=s, donate_shortcut=True)))(x, y, seeds)
    for i in range(3):
        assert_bits_equal(got[i], stochdepth.forward(x[i], y[i], 0.5, seed=i))


def test_donate_shortcut_errors():
    a = np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="donate_shortcut must be True or False, got int"):
        sdj.stochastic_depth(a, a, 0.5, seed=1, donate_shortcut=1)
    with pytest.raises(TypeError, match="donate_shortcut must be True or False, got str"):
        sdj.stochastic_depth(a, a, 0.5, seed=1, donate_shortcut="yes")
    config = stochdepth._op.OpConfig(0.5)
    with pytest.raises(ValueError, match="donate_shortcut=True needs a shortcut"):
        sdj.apply(None, a, sdj.key_words(1), config, donate_shortcut=True)
    assert_bits_equal(sdj.stochastic_depth(a, a, 0.5, seed=1, donate_shortcut=np.bool_(True)),
                      stochdepth.forward(a, a, 0.5, seed=1))


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "never"
    return text.split("[", 1)[1].split("]", 1)[0]


def _thp_fallbacks():
    try:
        with open("/proc/vmstat") as f:
            return int(dict(line.split() for line in f).get("thp_fault_fallback", 0))
    except OSError:
        return 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["float32", "float16"])
def test_large_fresh_output_is_exact_and_takes_huge_pages(dtype):
    # 48 MiB of output: above the 4 MiB from which the handler advises huge pages, and above
    # glibc's largest mmap threshold (32 MiB), so that every call's output is a fresh mapping.
    shape = (192, 64, 1024) if dtype == np.float32 else (384, 64, 1024)
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    f = jax.jit(lambda a, b, s: sdj.stochastic_depth(a, b, 0.8, seed=s, scaling="training"))
    assert_bits_equal(f(ja, jb, jnp.uint32(5)), stochdepth.forward(a, b, 0.8, seed=5,
                                                                   scaling="training"))
    pages = a.nbytes // 4096
    calls = 4
    fallbacks = _thp_fallbacks()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(calls):
        out = f(ja, jb, jnp.uint32(i))
        out.block_until_ready()
        del out
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
    if _thp_mode() != "never" and _thp_fallbacks() == fallbacks:
        # Without the advice every 4 KiB page of the fresh output faults (pages per call); with
        # it, the 2 MiB-aligned interior takes one fault per huge page and only the unaligned
        # edges (at most 2 MiB each) fault per page.
        assert faults < pages / 4, (faults, pages)
