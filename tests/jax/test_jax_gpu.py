"""stochdepth.jax's CUDA targets (run in its own process by tests/test_jax.py).

Everywhere: the key operand's bytes are the words [seed, offset] the CUDA kernels read
(DropPathParams::rng_words); the FFI module has CUDA handlers exactly when the build has CUDA
(so a CUDA build in CI proves they compiled and are exported), and they are registered for XLA's
"CUDA" platform, command-buffer compatible. Where jax has a GPU backend (jax[cuda12] in the GPU
check): the ops run there bit for bit like the reference, a new key per call under jit without
recompiling, also inside XLA's command buffers (CUDA graphs). Without a JAX GPU backend those
tests skip with GPU_SKIP, the one skip reason tests/test_jax.py accepts; with
STOCHDEPTH_REQUIRE_JAX_GPU=1 they fail instead.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sd_testutil import BF16, DTYPES, F64, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
import stochdepth.jax as sdj  # noqa: E402
from stochdepth.jax import _ffi  # noqa: E402

GPU_SKIP = "no JAX GPU backend (jax[cuda12]) here"
TARGETS = ("stochdepth_backward_gamma", "stochdepth_residual", "stochdepth_residual_gamma",
           "stochdepth_scale", "stochdepth_scale_gamma")  # sorted


def _capsule_pointer(capsule):
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get(capsule, None)


def _cuda_build():
    compiled = stochdepth.build_info()["cuda_compiled"]
    expect = os.environ.get("STOCHDEPTH_EXPECT_CUDA")
    if expect in ("0", "1"):
        assert compiled == (expect == "1"), "the build's CUDA differs from STOCHDEPTH_EXPECT_CUDA"
    return compiled


def _gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend
        return []


@pytest.fixture
def gpu():
    devices = _gpus()
    if not devices:
        if os.environ.get("STOCHDEPTH_REQUIRE_JAX_GPU") == "1":
            pytest.fail(f"{GPU_SKIP} (STOCHDEPTH_REQUIRE_JAX_GPU=1)")
        pytest.skip(GPU_SKIP)
    assert _cuda_build(), "jax has a GPU backend but this stochdepth build has no CUDA"
    return devices[0]


# ---- everywhere


@pytest.mark.parametrize("seed, offset", [(0, 0), (7, 3), (2**64 - 1, 2**63 + 5),
                                          (0x0123456789ABCDEF, 0xFEDCBA9876543210)])
def test_key_operand_bytes_are_the_seed_offset_words(seed, offset):
    words = np.asarray(sdj.key_words(seed, offset))
    assert words.dtype == np.uint32 and words.shape == (4,)
    assert words.view(np.uint64).tolist() == [seed, offset]  # little-endian: [seed, offset]
    # The core reading the key's own buffer as rng_words draws the mask of (seed, offset).
    x = np.ones((16, 3), np.float32)
    a = np.zeros_like(x)
    _core = stochdepth._core
    _core.run_raw(0, x.ctypes.data, a.ctypes.data, 1, 16, 3, _core.DType.float32, 0.5, True,
                  False, _core.Scaling.inference, seed ^ 1, offset ^ 1, -1, 0,
                  rng_words_ptr=words.ctypes.data)  # the arguments' (seed, offset) are ignored
    assert_bits_equal(a, reference.forward(None, x, 0.5, seed=seed, offset=offset))


def test_cuda_handlers_exist_exactly_in_a_cuda_build():
    module = _ffi.MODULE
    cuda = _cuda_build()
    assert module.platforms == (("cpu", "CUDA") if cuda else ("cpu",))
    cpu = module.handlers("cpu")
    assert tuple(sorted(cpu)) == TARGETS
    assert module.handlers().keys() == cpu.keys()
    if cuda:
        gpu = module.handlers("CUDA")
        assert tuple(sorted(gpu)) == TARGETS
        pointers = {_capsule_pointer(c) for c in (*cpu.values(), *gpu.values())}
        assert len(pointers) == 2 * len(TARGETS) and None not in pointers  # all distinct
    else:
        with pytest.raises(ValueError, match="no handlers for platform 'CUDA'"):
            module.handlers("CUDA")


def test_cuda_targets_registered_for_xla_command_buffers():
    from jaxlib import xla_client

    want = {"cpu": TARGETS, "CUDA": TARGETS} if _cuda_build() else {"cpu": TARGETS}
    assert _ffi.REGISTERED == want
    if "CUDA" not in want:
        return
    assert _ffi._traits("CUDA") == {"traits": xla_client.CustomCallTargetTraits
                                    .COMMAND_BUFFER_COMPATIBLE}
    assert _ffi._traits("cpu") == {}
    jax.devices()  # starts the backends: a CUDA plugin takes the pending registrations
    if not _gpus():
        # No CUDA backend: jaxlib keeps the targets, with their traits, for one started later.
        # The op's targets (the fused norm's: tests/jax/test_jax_norm.py).
        pending = {name: (api, traits) for name, _, api, traits
                   in xla_client._custom_callback.get("CUDA", []) if not name.startswith(
                       "stochdepth_norm_")}
        compatible = xla_client.CustomCallTargetTraits.COMMAND_BUFFER_COMPATIBLE
        assert pending == {name: (1, compatible) for name in TARGETS}


# ---- on a JAX GPU backend


def _on(device, *arrays):
    return [jax.device_put(a, device) for a in arrays]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_gpu_forward_and_grad_match_reference(gpu, rng, dtype, mode, scaling):
    a = random_array(rng, (33, 5, 7), dtype)
    b = random_array(rng, (33, 5, 7), dtype)
    g = random_array(rng, (33, 5, 7), dtype)
    kw = dict(mode=mode, scaling=scaling, axis=1)
    with jax.enable_x64(np.dtype(dtype) == F64):
        da, db, dg = _on(gpu, a, b, g)
        f = jax.jit(lambda a, b, o: sdj.stochastic_depth(a, b, 0.6, seed=9, offset=o, **kw))
        out = f(da, db, 4)
        assert out.devices() == {gpu}
        assert_bits_equal(np.asarray(out), reference.forward(a, b, 0.6, seed=9, offset=4, **kw))
        _, vjp = jax.vjp(lambda a, b: f(a, b, 4), da, db)
        ga, gb = vjp(dg)
        want = reference.backward(g, 0.6, seed=9, offset=4, **kw)[1]
        assert_bits_equal(np.asarray(ga), g)
        assert_bits_equal(np.asarray(gb), want)
        single = jax.jit(lambda b: sdj.drop_path(b, 0.6, seed=9, offset=4, **kw))(db)
        assert_bits_equal(np.asarray(single),
                          reference.forward(None, b, 0.6, seed=9, offset=4, **kw))


def test_gpu_new_key_without_recompiling(gpu, rng):
    x = random_array(rng, (64, 16), BF16)
    (dx,) = _on(gpu, x)
    f = jax.jit(lambda x, k, o: sdj.drop_path(x, 0.5, seed=k, offset=o))
    for seed, offset in [(1, 0), (1, 1), (2, 0), (2**40 + 3, 2**31 - 1)]:
        key = jnp.array([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32)  # raw key: seed = k0:k1
        got = f(dx, key, jnp.uint32(offset))
        assert_bits_equal(np.asarray(got), reference.forward(None, x, 0.5, seed=seed,
                                                              offset=offset))
    assert f._cache_size() == 1  # one program for every key


_COMMAND_BUFFER_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import stochdepth.jax as sdj
    from stochdepth import reference
    a = np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7
    b = np.ones((64, 8), np.float32)
    def step(a, b, o):  # fusions around the custom call: one command buffer for all three
        return sdj.stochastic_depth(a * 2, b + 1, 0.5, seed=5, offset=o) - 1
    f = jax.jit(step)
    text = f.lower(a, b, 0).compile().as_text()
    blocks = [blk for blk in text.split("\\n\\n") if "command_buffer" in blk.split("\\n")[0]]
    assert any('custom_call_target="stochdepth_residual"' in blk for blk in blocks), text
    for o in range(6):  # every replay reads its own key from the device
        want = reference.forward(a * 2, b + 1, 0.5, seed=5, offset=o) - 1
        assert np.array_equal(np.asarray(f(a, b, o)), want), o
    print("command buffer OK")
""")


def test_gpu_command_buffer_replays_read_each_key(gpu, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL "
               "--xla_gpu_graph_min_graph_size=1")
    proc = subprocess.run([sys.executable, "-c", _COMMAND_BUFFER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0 and "command buffer OK" in proc.stdout, proc.stdout + proc.stderr
