"""Philox4x32-10 in `keras.ops` integer ops: the keep mask on backends without the kernels.

The layer uses it on backends without the kernels (TensorFlow); on torch and JAX it calls the
compiled kernels through `stochdepth.torch` and `stochdepth.jax`. `keep_mask` itself runs on
every backend, JAX included. The words are those of `stochdepth.mask` bit for bit
(docs/design.md, "The mask stream"); every operation stays within uint32 without relying on
wrap-around, which not every backend promises.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from .._op import check_mode

# Random123's Philox4x32 constants (PHILOX_M4x32_0/1, PHILOX_W32_0/1); docs/design.md,
# "The mask stream".
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_LO16 = 0xFFFF


# ---- Philox4x32-10 in keras.ops (uint32 words, no operation may overflow)


def _u32(value):
    return ops.convert_to_tensor(np.uint32(value), dtype="uint32")


def _split16(x):
    return ops.bitwise_and(x, _u32(_LO16)), ops.right_shift(x, _u32(16))


def _join16(hi, lo):
    """(hi << 16) | lo for hi, lo < 2**16."""
    return ops.bitwise_or(ops.left_shift(hi, _u32(16)), lo)


def _add32(x, c):
    """(x + c) mod 2**32 for a uint32 tensor x and a Python int c, without wrapping arithmetic
    (whether uint32 addition wraps is not promised by every backend)."""
    x_lo, x_hi = _split16(x)
    lo = ops.add(x_lo, _u32(c & _LO16))
    hi = ops.add(ops.add(x_hi, _u32(c >> 16)), ops.right_shift(lo, _u32(16)))
    return _join16(ops.bitwise_and(hi, _u32(_LO16)), ops.bitwise_and(lo, _u32(_LO16)))


def _mulhilo32_limbs(x, m):
    """(hi, lo) words of the 64-bit product x * m, x a uint32 tensor, m a 32-bit constant.

    Schoolbook multiplication in 16-bit limbs: each partial product is < 2**32 and each sum
    below is bounded by the final (< 2**32) value it contributes to, so nothing overflows.
    Used where there is no uint64 (JAX without jax_enable_x64)."""
    x_lo, x_hi = _split16(x)
    m_lo, m_hi = _u32(m & _LO16), _u32(m >> 16)
    ll = ops.multiply(x_lo, m_lo)
    lh = ops.multiply(x_lo, m_hi)
    hl = ops.multiply(x_hi, m_lo)
    hh = ops.multiply(x_hi, m_hi)
    ll_lo, ll_hi = _split16(ll)
    lh_lo, lh_hi = _split16(lh)
    hl_lo, hl_hi = _split16(hl)
    mid = ops.add(ops.add(ll_hi, lh_lo), hl_lo)  # < 3 * 2**16
    mid_lo, mid_hi = _split16(mid)
    lo = _join16(mid_lo, ll_lo)
    hi = ops.add(ops.add(ops.add(hh, lh_hi), hl_hi), mid_hi)
    return hi, lo


def _mulhilo32_tf_u64(x, m):
    """The same with one uint64 multiply, for TensorFlow (uint64 multiply, truncating casts).
    Written in `tf` ops: `keras.ops` type promotion turns uint64 * uint64 into uint32."""
    import tensorflow as tf

    prod = tf.cast(x, tf.uint64) * tf.constant(m, tf.uint64)
    return tf.cast(tf.bitwise.right_shift(prod, tf.constant(32, tf.uint64)), tf.uint32), tf.cast(
        prod, tf.uint32
    )


def _philox4x32_10(c0, c1, c2, c3, k0, k1, mulhilo=_mulhilo32_limbs):
    """Philox4x32-10 (Random123) on uint32 tensors of one shape; returns the four words."""
    for rnd in range(10):
        if rnd > 0:  # the key schedule: k += (W0, W1) before every round but the first
            k0 = _add32(k0, _W0)
            k1 = _add32(k1, _W1)
        hi0, lo0 = mulhilo(c0, _M0)
        hi1, lo1 = mulhilo(c2, _M1)
        c0, c1, c2, c3 = (
            ops.bitwise_xor(ops.bitwise_xor(hi1, c1), k0),
            lo1,
            ops.bitwise_xor(ops.bitwise_xor(hi0, c3), k1),
            lo0,
        )
    return c0, c1, c2, c3


def _keep_threshold(survival_prob):
    # T = floor(p * 2**32) in float64; keep iff draw < T (docs/design.md, "The mask stream").
    return int(math.floor(float(survival_prob) * 2.0**32))


def _draws(batch, k0, k1, off0, off1, mode, mulhilo):
    """The 32-bit draw of each sample (docs/design.md, "The mask stream"): uint32, shape (batch,)
    in "row" mode, (1,) in "batch" mode (sample 0's draw, for every sample)."""
    if mode == "batch":
        samples = ops.zeros((1,), dtype="uint32")
    else:
        samples = ops.cast(ops.arange(batch, dtype="int32"), "uint32")
    zeros = ops.zeros_like(samples)
    k0, k1, off0, off1 = (ops.add(zeros, ops.cast(w, "uint32")) for w in (k0, k1, off0, off1))
    x = _philox4x32_10(ops.right_shift(samples, _u32(2)), zeros, off0, off1, k0, k1, mulhilo)
    lane = ops.bitwise_and(samples, _u32(3))
    return ops.where(
        ops.equal(lane, _u32(0)), x[0],
        ops.where(ops.equal(lane, _u32(1)), x[1], ops.where(ops.equal(lane, _u32(2)), x[2], x[3])),
    )


_DRAW_FNS = {}


def _draw_fn(mode):
    """`_draws` for this backend, compiled once per (backend, mode): eager Keras would dispatch
    its ~700 small integer ops one by one (~0.2 s a call); compiled, a call is one dispatch, and
    inside a caller's jax.jit / tf.function it inlines."""
    backend = keras.backend.backend()
    fn = _DRAW_FNS.get((backend, mode))
    if fn is not None:
        return fn
    if backend == "jax":
        import jax

        def jax_fn(batch, k0, k1, off0, off1):
            return _draws(batch, k0, k1, off0, off1, mode, _mulhilo32_limbs)

        jax_fn = jax.jit(jax_fn, static_argnums=(0,))

        def fn(batch, k0, k1, off0, off1):
            # The batch size is static for jax.jit: draw for the next power of two and slice, so
            # that eager calls with varied batch sizes compile a handful of programs, not one
            # per size. The draws of samples < batch do not depend on the padding.
            padded = 1 if mode == "batch" else 1 << max(0, int(batch) - 1).bit_length()
            draws = jax_fn(padded, k0, k1, off0, off1)
            return draws if mode == "batch" or padded == batch else draws[:batch]
    elif backend == "tensorflow":
        import tensorflow as tf

        def tf_fn(batch, k0, k1, off0, off1):
            return _draws(batch, k0, k1, off0, off1, mode, _mulhilo32_tf_u64)

        spec = tf.TensorSpec([], tf.uint32)
        tf_fn = tf.function(tf_fn, autograph=False, reduce_retracing=True,
                            input_signature=[tf.TensorSpec([], tf.int32)] + [spec] * 4)

        def fn(batch, k0, k1, off0, off1):
            return tf_fn(tf.cast(batch, tf.int32), *(tf.cast(w, tf.uint32) for w in
                                                      (k0, k1, off0, off1)))
    else:

        def fn(batch, k0, k1, off0, off1):
            return _draws(batch, k0, k1, off0, off1, mode, _mulhilo32_limbs)

    _DRAW_FNS[(backend, mode)] = fn
    return fn


def keep_mask(batch, survival_prob, seed_lo, seed_hi, offset_lo, offset_hi, mode="row"):
    """The keep mask of the library's stream (docs/design.md, "The mask stream"), in `keras.ops`:
    a bool tensor of shape (batch,).

    `batch` is an int or a scalar int tensor (a dynamic batch size under `tf.function`); the
    seed and offset words are Python ints below 2**32 or uint32 scalar tensors. Equal to
    `stochdepth.mask(batch, survival_prob, seed=seed_hi << 32 | seed_lo,
    offset=offset_hi << 32 | offset_lo, mode=mode)` for batch < 2**31.
    """
    check_mode(mode)
    words = [ops.convert_to_tensor(np.uint32(w), dtype="uint32") if isinstance(w, int) else w
             for w in (seed_lo, seed_hi, offset_lo, offset_hi)]
    draw = _draw_fn(mode)(batch, *words)
    threshold = _keep_threshold(survival_prob)
    if threshold >= 2**32:
        keep = ops.ones_like(draw, dtype="bool")
    elif threshold <= 0:
        keep = ops.zeros_like(draw, dtype="bool")
    else:
        keep = ops.less(draw, _u32(threshold))
    if mode == "batch":
        keep = ops.broadcast_to(keep, (batch,))
    return keep
