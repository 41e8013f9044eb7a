"""The Keras layer on the TensorFlow backend: `StochasticDepth.call` hands its tensors to
`stochdepth.tensorflow.apply`, the library's kernels as TensorFlow custom ops, gradients included.

Used when this build has the TensorFlow ops and they load into the running TensorFlow
(`available()`); otherwise the layer keeps its Keras-ops path (`_philox.keep_mask`), which gives
the same outputs. The ops have no XLA kernel, so a layer that uses them says `supports_jit =
False`: Keras's `jit_compile="auto"` then leaves XLA off for the model, and an explicit
`jit_compile=True` is turned off with Keras's warning. Inside a function that XLA compiles
anyway (`tf.function(jit_compile=True)` around the layer), the layer takes the Keras-ops path.
Training call n uses the mask of (seed, offset=n), as on every backend (docs/design.md,
"Randomness in the adapters"): the SeedGenerator state [seed & 0xFFFFFFFF, step] and the seed's
constant high word become the key input.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def available():
    """Whether stochdepth.tensorflow imports here (a build with the ops, a matching TensorFlow)."""
    try:
        import stochdepth.tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def in_xla_context():
    """Whether the function being traced is compiled by XLA (where the ops have no kernel)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util

    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    return bool(control_flow_util.GraphOrParentsInXlaContext(graph))


def call(layer, shortcut, residual, config):
    """The layer's output for `config` (an OpConfig the layer made for this call); the tensors
    are checked by `stochdepth.tensorflow.apply`, once."""
    import tensorflow as tf

    import stochdepth.tensorflow as sdt

    if not config.training:
        return sdt.apply(shortcut, residual, tf.zeros((4,), tf.uint32), config)
    state = layer._seed_words()  # [seed & 0xFFFFFFFF, step], int64 on this backend
    seed_lo = tf.cast(state[0], tf.uint32)
    step = state[1]
    if step.dtype.size == 8:
        off_lo = tf.cast(step, tf.uint32)  # the low 32 bits
        off_hi = tf.cast(tf.bitwise.right_shift(step, tf.constant(32, step.dtype)), tf.uint32)
    else:
        off_lo, off_hi = tf.cast(step, tf.uint32), tf.constant(0, tf.uint32)
    words = tf.stack([seed_lo, tf.constant(layer._seed_hi, tf.uint32), off_lo, off_hi])
    return sdt.apply(shortcut, residual, words, config)
