"""Inputs of the raw API that once gave a silently wrong result or an unhelpful error (issue 10):
non-native byte order (item 5), immutable producers given as `out` (item 6), arrays as seed or
offset (item 9), axes past int64 (item 10), `mask` without a seed (item 12), and `seed` left
out at inference (item 17). Every refusal names the argument, the expected and the received.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_dlpack import NumpyDLPack
from sd_testutil import run_python

import stochdepth
from stochdepth import reference

F32 = np.float32

# ---- item 5: byte order


@pytest.mark.parametrize("dt", [">f2", ">f4", ">f8"])
def test_non_native_byte_order_is_refused_everywhere(dt):
    big = np.array([[1.0, 2.0]], dt)
    native = big.astype(big.dtype.newbyteorder("="))
    msg = "must have the machine's native byte order, got dtype '>f"
    with pytest.raises(TypeError, match="residual " + msg):
        stochdepth.forward(native, big, 0.5, seed=1)
    with pytest.raises(TypeError, match="shortcut " + msg):
        stochdepth.forward(big, native, 0.5, seed=1)
    with pytest.raises(TypeError, match="grad_out " + msg):
        stochdepth.backward(big, 0.5, seed=1)
    with pytest.raises(TypeError, match="out " + msg):
        stochdepth.forward(native, native, 0.5, seed=1, out=np.zeros_like(big))
    with pytest.raises(TypeError, match="out " + msg):
        stochdepth.backward(native, 0.5, seed=1, out=np.zeros_like(big))
    # The example, made native, gives the right answer.
    x = np.array([[1.0, 2.0]], "=f4")
    assert np.array_equal(stochdepth.forward(x * 10, x, 1.0, seed=1), [[11.0, 22.0]])


def test_explicit_native_byte_order_is_accepted():
    x = np.array([[1.0, 2.0]], "<f4" if np.little_endian else ">f4")
    assert np.array_equal(stochdepth.forward(x, x, 1.0, seed=1), 2 * x)


# ---- item 6: immutable producers as out

IMMUTABLE_OUT = """
import numpy as np, stochdepth
x = np.ones((4, 3), np.float32)
{setup}
before = np.asarray(out).copy()
try:
    stochdepth.forward(x, x, 0.5, seed=1, out=out)
    print("ACCEPTED")
except ValueError as e:
    assert "out must be writable" in str(e), e
    assert np.array_equal(np.asarray(out), before), "written before the refusal"
    # As an input it is fine.
    r = stochdepth.forward(None, out, 1.0, seed=1)
    assert np.array_equal(np.from_dlpack(r), before)
    print("REFUSED")
"""


@pytest.mark.parametrize("framework, setup", [
    ("jax", "import jax.numpy as jnp; out = jnp.zeros((4, 3), jnp.float32)"),
    ("tensorflow", "import tensorflow as tf; out = tf.zeros((4, 3), tf.float32)"),
])
def test_immutable_producers_are_refused_as_out(framework, setup):
    pytest.importorskip(framework)
    # A fresh interpreter: importing either framework here would slow the rest of the suite.
    r = run_python(IMMUTABLE_OUT.format(setup=setup),
                   env={"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
                        "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "REFUSED", r.stdout + r.stderr[-2000:]


def test_writable_producers_are_still_accepted_as_out():
    x = np.ones((4, 3), F32)
    out = np.zeros((4, 3), F32)
    stochdepth.forward(x, x, 1.0, seed=1, out=NumpyDLPack(out))
    assert np.array_equal(out, 2 * x)
    ro = np.zeros((4, 3), F32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        stochdepth.forward(x, x, 1.0, seed=1, out=ro)


# ---- items 9, 10, 12, 17: scalar arguments


@pytest.mark.parametrize("name", ["seed", "offset"])
@pytest.mark.parametrize("value, shown", [
    (np.array([1]), "ndarray of shape (1,)"),
    (np.array(1.0), "ndarray of shape ()"),
    (np.array([[1, 2]]), "ndarray of shape (1, 2)"),
    (1.0, "float"),
    ("1", "str"),
])
def test_arrays_as_seed_or_offset_name_the_argument(name, value, shown):
    x = np.ones((4, 3), F32)
    kwargs = {"seed": 1, name: value}
    with pytest.raises(TypeError) as e:
        stochdepth.forward(x, x, 0.5, **kwargs)
    assert str(e.value) == f"{name} must be an integer in [0, 2**64), got {shown}"
    with pytest.raises(TypeError, match=f"{name} must be an integer"):
        stochdepth.mask(4, 0.5, **kwargs)


def test_zero_d_integer_arrays_are_still_integers():
    x = np.ones((4, 3), F32)
    a = stochdepth.forward(x, x, 0.5, seed=np.array(5), offset=np.uint64(2**63))
    assert np.array_equal(a, reference.forward(x, x, 0.5, seed=5, offset=2**63))


@pytest.mark.parametrize("axis", [2**63, -2**63, 2**63 - 1, -2**63 - 1, 2**100, 2, -3])
def test_axis_out_of_range_says_value_and_rank(axis):
    x = np.ones((4, 3), F32)
    with pytest.raises(ValueError) as e:
        stochdepth.forward(x, x, 0.5, seed=1, axis=axis)
    assert str(e.value) == (f"axis {axis} is out of range for an array of rank 2 "
                            "(expected -2 <= axis < 2)")
    with pytest.raises(ValueError, match=f"axis {axis} is out of range"):
        stochdepth.backward(x, 0.5, seed=1, axis=axis)


def test_mask_without_seed_does_not_mention_training():
    with pytest.raises(TypeError) as e:
        stochdepth.mask(4, 0.5, seed=None)
    assert "training" not in str(e.value)
    assert str(e.value).startswith("seed must be an integer in [0, 2**64)")
    assert "got None" in str(e.value)
    with pytest.raises(TypeError, match="mask.. missing 1 required keyword-only argument: 'seed'"):
        stochdepth.mask(4, 0.5)


def test_seed_is_optional_at_inference_and_required_in_training():
    x = np.arange(12, dtype=F32).reshape(4, 3)
    assert np.array_equal(stochdepth.forward(x, x, 0.5, training=False),
                          reference.forward(x, x, 0.5, training=False, seed=0))
    g, gr = stochdepth.backward(x, 0.5, training=False)
    assert g is x and np.array_equal(gr, reference.backward(x, 0.5, training=False, seed=0)[1])
    with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 2\*\*64\) when "
                                        "training=True, got None"):
        stochdepth.forward(x, x, 0.5)
    with pytest.raises(TypeError, match="when training=True, got None"):
        stochdepth.backward(x, 0.5, training=True)
