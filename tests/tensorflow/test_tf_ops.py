"""stochdepth.tensorflow (run in its own process by tests/test_tensorflow.py): the kernels as
TensorFlow custom ops give `stochdepth.reference` bit for bit, eagerly and under tf.function,
for every dtype, mode, scaling, axis and training flag; the registered gradient is the backward
kernel's; seed and offset are op inputs (a new mask without retracing); a SavedModel using the
ops reloads in a fresh process; errors and the version check.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sd_testutil import BF16, DTYPES, assert_bits_equal, random_array
from stochdepth._op import OpConfig

import stochdepth
from stochdepth import reference

tf = pytest.importorskip("tensorflow")
# Not importorskip: with TensorFlow installed, a build without the ops must fail here.
import stochdepth.tensorflow as sdt  # noqa: E402
from stochdepth.tensorflow import _load  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")

SHAPE = (6, 5, 3)
TF_DTYPES = {"float16": tf.float16, "bfloat16": tf.bfloat16, "float32": tf.float32,
             "float64": tf.float64}


def _np(t):
    """A tensor's value with the reference's dtype (TensorFlow's bfloat16 as ml_dtypes')."""
    a = np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    return a.view(BF16) if a.dtype.name == "bfloat16" and a.dtype != BF16 else a


def _tf(a):
    a = np.asarray(a)
    return tf.convert_to_tensor(a, TF_DTYPES[a.dtype.name])


def _pair(rng, dtype, shape=SHAPE):
    return random_array(rng, shape, dtype), random_array(rng, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_forward_matches_reference_eager_and_function(rng, dtype, training, mode, scaling, axis):
    a, b = _pair(rng, dtype)
    kw = dict(training=training, mode=mode, axis=axis, scaling=scaling)
    want = reference.forward(a, b, 0.6, seed=11, offset=4, **kw)
    want_single = reference.forward(None, b, 0.6, seed=11, offset=4, **kw)
    ta, tb = _tf(a), _tf(b)
    assert_bits_equal(_np(sdt.stochastic_depth(ta, tb, 0.6, seed=11, offset=4, **kw)), want)
    assert_bits_equal(_np(sdt.drop_path(tb, 0.6, seed=11, offset=4, **kw)), want_single)
    fn = tf.function(lambda a, b: sdt.stochastic_depth(a, b, 0.6, seed=11, offset=4, **kw))
    single = tf.function(lambda b: sdt.drop_path(b, 0.6, seed=11, offset=4, **kw))
    assert_bits_equal(_np(fn(ta, tb)), want)
    assert_bits_equal(_np(single(tb)), want_single)


def test_numpy_inputs_and_bfloat16_round_trip(rng):
    a, b = _pair(rng, BF16)
    want = reference.forward(a, b, 0.5, seed=3)
    got = sdt.stochastic_depth(a, b, 0.5, seed=3)  # NumPy arrays in, a tensor out
    assert got.dtype == tf.bfloat16
    assert_bits_equal(_np(got), want)


@pytest.mark.parametrize("training", [True, False])
def test_apply_is_the_functions_with_a_config_and_words(rng, training):
    """apply(shortcut, residual, words, config), as stochdepth.jax.apply: the words and the
    OpConfig the functions make give the functions' outputs; a graph tensor of words under
    tf.function is a new mask per value without retracing."""
    a, b = _pair(rng, np.float32)
    config = OpConfig(0.7, "batch", -1, "training", training)
    words = sdt.key_words(2**33 + 5, 6)
    kw = dict(training=training, mode="batch", axis=-1, scaling="training")
    want = reference.forward(a, b, 0.7, seed=2**33 + 5, offset=6, **kw)
    assert_bits_equal(_np(sdt.apply(_tf(a), _tf(b), words, config)), want)
    assert_bits_equal(_np(sdt.apply(None, b, words, config)),
                      reference.forward(None, b, 0.7, seed=2**33 + 5, offset=6, **kw))
    traces = []

    @tf.function
    def step(words):
        traces.append(1)
        return sdt.apply(None, _tf(b), words, OpConfig(0.5, axis=1))

    for n in range(3):
        got = _np(step(sdt.key_words(9, n)))
        assert_bits_equal(got, reference.forward(None, b, 0.5, seed=9, offset=n, axis=1))
    assert len(traces) == 1


def test_apply_checks_the_tensors():
    x = tf.ones((4, 3))
    words = sdt.key_words(1, 0)
    with pytest.raises(ValueError, match=r"same shape, got \(4, 3\) and \(3, 3\)"):
        sdt.apply(x, tf.ones((3, 3)), words, OpConfig(0.5))
    with pytest.raises(ValueError, match="axis 2 is out of range for inputs of rank 2"):
        sdt.apply(None, x, words, OpConfig(0.5, axis=2))


def _grads(fn, *xs, w):
    """The gradients of fn's output, given w as its upstream gradient. Given directly rather
    than through a loss sum(out * w): TensorFlow's own kernels flush subnormals (bfloat16's and
    float32's), which would change w before it reaches the op."""
    with tf.GradientTape() as tape:
        tape.watch(xs)
        out = fn(*xs)
    return tape.gradient(out, list(xs), output_gradients=w)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_gradient_is_the_backward_kernel(rng, dtype, training, scaling):
    a, b = _pair(rng, dtype)
    w = random_array(rng, SHAPE, dtype)
    kw = dict(training=training, scaling=scaling, mode="row", axis=1)
    want = reference.backward(w, 0.3, seed=5, offset=9, **kw)[1]
    ta, tb, tw = _tf(a), _tf(b), _tf(w)

    def residual(a, b):
        return sdt.stochastic_depth(a, b, 0.3, seed=5, offset=9, **kw)

    def single(b):
        return sdt.drop_path(b, 0.3, seed=5, offset=9, **kw)

    for run in (lambda f, *x: _grads(f, *x, w=tw),
                tf.function(lambda f, *x: _grads(f, *x, w=tw))):
        g_short, g_res = run(residual, ta, tb)
        assert_bits_equal(_np(g_short), w)
        assert_bits_equal(_np(g_res), want)
        assert_bits_equal(_np(run(single, tb)[0]), want)


def test_gradient_matches_numerical_jacobian():
    a = np.linspace(-1, 1, 24).reshape(8, 3)
    b = np.cos(np.arange(24.0)).reshape(8, 3)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, b: sdt.stochastic_depth(a, b, 0.5, seed=2, scaling="training"),
        [tf.constant(a), tf.constant(b)])
    for t, n in zip(theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-7, atol=1e-7)


def test_second_order_gradient():
    b = tf.constant(np.ones((8, 2)))
    with tf.GradientTape() as outer:
        outer.watch(b)
        with tf.GradientTape() as inner:
            inner.watch(b)
            y = tf.reduce_sum(sdt.drop_path(b, 0.5, seed=4) ** 2)
        g = tf.reduce_sum(inner.gradient(y, b))
    gg = outer.gradient(g, b)
    keep = stochdepth.mask(8, 0.5, seed=4)
    np.testing.assert_array_equal(_np(gg)[:, 0], np.where(keep, 2.0, 0.0))


def test_offset_tensor_draws_new_masks_without_retracing():
    x = tf.ones((64, 2))
    traces = []

    @tf.function
    def step(offset):
        traces.append(1)
        return sdt.drop_path(x, 0.5, seed=7, offset=offset)

    counter = tf.Variable(0, dtype=tf.int64)
    for n in range(4):
        out = _np(step(counter))
        np.testing.assert_array_equal(out[:, 0] != 0, stochdepth.mask(64, 0.5, seed=7, offset=n))
        counter.assign_add(1)
    assert len(traces) == 1
    # A seed tensor too, and offsets as int32 tensors: still one trace per signature.
    for n in range(3):
        out = _np(step(tf.constant(n, tf.int32)))
        np.testing.assert_array_equal(out[:, 0] != 0, stochdepth.mask(64, 0.5, seed=7, offset=n))
    assert len(traces) == 2


@pytest.mark.parametrize(
    "seed, offset, words",
    [
        (1, 2, (1, 0, 2, 0)),
        (2**64 - 1, 2**40 + 3, (2**32 - 1, 2**32 - 1, 3, 2**8)),
        (np.uint64(2**63), np.int8(5), (0, 2**31, 5, 0)),
    ],
)
def test_key_words_of_host_integers(seed, offset, words):
    assert tuple(sdt.key_words(seed, offset).numpy().tolist()) == words


def test_key_words_of_tensors_are_their_bit_patterns():
    w = sdt.key_words(tf.constant(-1, tf.int32), tf.constant(-2, tf.int64))
    assert tuple(w.numpy().tolist()) == (2**32 - 1, 0, 2**32 - 2, 2**32 - 1)
    w = sdt.key_words(tf.constant(2**40 + 9, tf.int64), tf.constant(7, tf.uint32))
    assert tuple(w.numpy().tolist()) == (9, 2**8, 7, 0)
    x = tf.ones((32, 1))
    got = _np(sdt.drop_path(x, 0.5, seed=tf.constant(2**40 + 9, tf.int64), offset=3))
    want = stochdepth.mask(32, 0.5, seed=2**40 + 9, offset=3)
    np.testing.assert_array_equal(got[:, 0] != 0, want)


def test_zero_size_and_inference_without_seed():
    x = tf.zeros((0, 3))
    assert sdt.drop_path(x, 0.5, seed=1).shape == (0, 3)
    y = tf.ones((4, 3))
    assert_bits_equal(_np(sdt.drop_path(y, 0.25, training=False)), np.full((4, 3), 0.25,
                                                                           np.float32))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(survival_prob=1.5), ValueError, r"survival_prob must be in \[0, 1\], got 1.5"),
        (dict(survival_prob=float("nan")), ValueError, "survival_prob must be in"),
        (dict(survival_prob=True), TypeError,
         r"survival_prob must be a real number in \[0, 1\] \(a Python or NumPy number"),
        (dict(survival_prob=tf.constant(0.5)), TypeError,
         "survival_prob must be a real number .* got EagerTensor"),
        (dict(mode="token"), ValueError, "mode must be 'row' or 'batch', got 'token'"),
        (dict(scaling="timm"), ValueError, "scaling must be 'inference' or 'training'"),
        (dict(seed=None), ValueError, r"seed is required when training=True"),
        (dict(seed=True), TypeError, r"seed must be an integer in \[0, 2\*\*64\), got bool"),
        (dict(offset=np.bool_(True)), TypeError,
         r"offset must be an integer in \[0, 2\*\*64\), got bool"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
        (dict(offset=2**64), ValueError, r"offset must be in \[0, 2\*\*64\)"),
        (dict(seed=1.5), TypeError, "seed must be an integer or an integer scalar tensor, "
         "got float"),
        (dict(seed="7"), TypeError, "seed must be an integer or an integer scalar tensor"),
        (dict(offset=tf.constant([1, 2])), TypeError,
         r"offset must be an integer or an integer scalar tensor, got int32\[2\]"),
        (dict(offset=tf.constant(1.0)), TypeError, r"got float32\[\]"),
        (dict(axis=3), ValueError,
         r"axis 3 is out of range for inputs of rank 2 \(expected -2 <= axis < 2\)"),
        (dict(axis=1.0), TypeError, "axis must be an integer, got float"),
        (dict(axis=True), TypeError, "axis must be an integer, got bool"),
    ],
)
def test_errors_are_the_shared_ones(kwargs, exc, match):
    """The messages of stochdepth._op, as every adapter gives them."""
    args = dict(survival_prob=0.5, seed=1, offset=0)
    args.update(kwargs)
    p = args.pop("survival_prob")
    x = tf.ones((4, 3))
    with pytest.raises(exc, match=match):
        sdt.stochastic_depth(x, x, p, **args)


def test_input_errors():
    x = tf.ones((4, 3))
    with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64, "
                                        "got int32"):
        sdt.drop_path(tf.ones((4, 3), tf.int32), 0.5, seed=1)
    with pytest.raises(TypeError, match="residual must be float16, bfloat16, float32 or float64, "
                                        "got int64"):
        sdt.stochastic_depth(tf.ones((4, 3), tf.int64), tf.ones((4, 3), tf.int64), 0.5, seed=1)
    with pytest.raises(TypeError, match="shortcut must be a tensor or array, got NoneType"):
        sdt.stochastic_depth(None, x, 0.5, seed=1)
    with pytest.raises(TypeError, match="same dtype, got float32 and float64"):
        sdt.stochastic_depth(x, tf.ones((4, 3), tf.float64), 0.5, seed=1)
    with pytest.raises(ValueError, match=r"same shape, got \(4, 3\) and \(4, 2\)"):
        sdt.stochastic_depth(x, tf.ones((4, 2)), 0.5, seed=1)
    with pytest.raises(ValueError, match=r"x must have rank >= 1 \(a sample axis\), got a 0-d"):
        sdt.drop_path(tf.constant(1.0), 0.5, seed=1)
    # The sample axis is an op attribute: a tensor of unknown rank cannot be traced.
    unknown = tf.function(lambda x: sdt.drop_path(x, 0.5, seed=1),
                          input_signature=[tf.TensorSpec(None, tf.float32)])
    with pytest.raises(ValueError, match="x must have a known rank"):
        unknown.get_concrete_function()


def test_raw_op_checks_its_inputs():
    """The kernels repeat the wrapper's checks: a direct call of the op is an error, never a
    crash."""
    from stochdepth.tensorflow import _ops

    x = tf.ones((4, 3))
    key = sdt.key_words(1, 0)
    p = tf.constant(0.5, tf.float64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="axis 2 is out of range"):
        _ops.scale_op(x, key, p, (2, True, False, False))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"survival_prob must be in \[0, 1\]"):
        _ops.scale_op(x, key, tf.constant(2.0, tf.float64), (0, True, False, False))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"key input must be uint32\[4\]"):
        _ops.scale_op(x, key[:3], p, (0, True, False, False))
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        _ops.residual_op(x, tf.ones((4, 2)), key, p, (0, True, False, False))


def test_xla_compile_is_refused_clearly():
    """The ops have no XLA kernel: jit_compile=True is TensorFlow's error naming the op."""
    x = tf.ones((4, 3))
    fn = tf.function(lambda x: sdt.drop_path(x, 0.5, seed=1), jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="StochdepthScale"):
        fn(x)


def test_version_check():
    _load.check_tensorflow("2.21.0", "2.21.0")
    _load.check_tensorflow("2.22.1", "2.21.0")  # a newer minor: the C API keeps its entries
    with pytest.raises(ImportError, match=r"built against TensorFlow 2.21.0, which the running "
                                          r"TensorFlow 2.20.0 does not match.*STOCHDEPTH_TF=ON"):
        _load.check_tensorflow("2.20.0", "2.21.0")
    with pytest.raises(ImportError, match="does not match"):
        _load.check_tensorflow("3.0.0", "2.21.0")
    with pytest.raises(ImportError, match=r"needs TensorFlow >= 2.16.0"):
        _load.check_tensorflow("2.15.1")
    assert sdt.BUILT_AGAINST == tf.__version__  # the package's test extra: the same release


SAVEDMODEL = """
import sys
import numpy as np
import tensorflow as tf
{imports}
from stochdepth import reference

loaded = tf.saved_model.load(sys.argv[1])
sc = np.arange(24, dtype=np.float32).reshape(8, 3)
res = np.cos(np.arange(24, dtype=np.float32)).reshape(8, 3)
for step in range(3):
    out = loaded.train(tf.constant(sc), tf.constant(res), tf.constant(step, tf.int64)).numpy()
    want = reference.forward(sc, res, 0.5, seed=42, offset=step, scaling="training")
    assert out.tobytes() == want.tobytes(), step
a, b = tf.constant(sc), tf.constant(res)
with tf.GradientTape() as tape:
    tape.watch(b)
    y = tf.reduce_sum(loaded.train(a, b, tf.constant(1, tf.int64)))
g = tape.gradient(y, b).numpy()
want = reference.backward(np.ones_like(res), 0.5, seed=42, offset=1, scaling="training")[1]
assert g.tobytes() == want.tobytes()
print("ok")
"""


def test_saved_model_reloads_in_a_fresh_process(tmp_path):
    class Block(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)] * 2
                     + [tf.TensorSpec([], tf.int64)])
        def train(self, shortcut, residual, step):
            return sdt.stochastic_depth(shortcut, residual, 0.5, seed=42, offset=step,
                                        scaling="training")

    path = str(tmp_path / "block")
    tf.saved_model.save(Block(), path)
    run = [sys.executable, "-c"]
    env_code = SAVEDMODEL.format(imports="import stochdepth.tensorflow  # loads the ops")
    r = subprocess.run(run + [textwrap.dedent(env_code), path], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-4000:]
    # Without the import, the op is unknown to TensorFlow: the load fails and says which op.
    r = subprocess.run(run + [textwrap.dedent(SAVEDMODEL.format(imports="")), path],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "StochdepthResidual" in r.stderr, r.stderr[-4000:]
