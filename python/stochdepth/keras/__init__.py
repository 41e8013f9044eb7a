"""Keras 3 adapter: `StochasticDepth`, a drop-in for `kerasfactory.layers.StochasticDepth`.

    from stochdepth.keras import StochasticDepth      # was: from kerasfactory.layers import ...
    y = StochasticDepth(survival_prob=0.8)([shortcut, residual], training=True)

Same constructor, call signature, errors, inference formula (`shortcut + survival_prob *
residual`), `compute_output_shape` and `get_config` keys as kerasfactory 0.1.1 (a tuple of two
inputs is accepted too; shortcut and residual must have the same shape and dtype), with its
bugs fixed:

- one keep draw per sample at any rank (the sample axis is `axis`, default 0), where
  kerasfactory draws per token for rank 3 and fails for rank 5;
- `seed=0` is a seed (kerasfactory treats it as "no seed");
- the randomness lives in a `keras.random.SeedGenerator`, so a jitted train step (JAX,
  `tf.function`, `model.fit`) draws a fresh mask each step, seeded or not;
- a dropped sample gives the shortcut exactly: its residual is not read, so Inf/NaN there do not
  reach the output (kerasfactory computes `shortcut + 0 * residual`, which makes NaN).

Extra keyword-only options, kerasfactory's behaviour by default: `mode` ("row": one draw per
sample, "batch": one draw for the whole batch), `scaling` ("inference": the paper's convention,
factor `survival_prob` at inference; "training": timm's, factor 1/p on kept samples in training
and 1 at inference) and `axis`.

The mask is DESIGN.md's Philox4x32-10 stream. The layer keeps a SeedGenerator whose state is
`[seed & 0xFFFFFFFF, step]`; training call number n (from 0) uses `(seed, offset=n)`, so its
mask equals `stochdepth.mask(batch, survival_prob, seed=seed, offset=n, mode=mode)` on every
backend. A seed above 2**32 keeps its high word as a constant of the layer. With `seed=None`
Keras picks the seed (`keras.utils.set_random_seed` makes that reproducible).

Backends:
- torch: the compiled kernels through `stochdepth.torch.stochastic_depth` (CPU and CUDA,
  autograd included; nothing per element is kept for backward). The seed state lives on the
  CPU, so reading (seed, offset) for the kernel launch is no device sync. Under
  torch.distributed every rank uses the layer's (seed, step) as it is, as on the other backends
  (seed the layers differently per rank for independent masks).
- jax, tensorflow (and any other): `keras.ops` computes the same Philox words in uint32 integer
  ops, compiled once per backend and mode (jax.jit / tf.function; inlined into a caller's
  trace). The 32x32->64 multiply of each round is one uint64 multiply on TensorFlow; JAX has
  no uint64 without `jax_enable_x64`, so there it is done in 16-bit limbs, where no
  intermediate can overflow. Then `out = where(keep, shortcut + s * residual, shortcut)`.
  Half types compute in float32 and round once, as the kernels do. Eagerly the result is bit
  for bit the kernels' and `stochdepth.reference`'s. Compiled by XLA (jax.jit,
  `tf.function(jit_compile=True)`, Keras's compiled train steps), `shortcut + s * residual`
  with s != 1 (scaling="training", or the inference factor p) may be contracted into one FMA on
  CPUs that have it: those outputs can then differ in the last bit (the FMA's single rounding
  is the more accurate one). XLA drops optimization barriers and no-op roundings before code
  generation, and LLVM sees through bit masks, so this is documented rather than prevented.
  The mask itself, and the default scaling="inference" in training (s = 1, a plain add), are
  exact everywhere.

Loading a model saved with kerasfactory's layer (each such layer comes back as ours):

    keras.saving.load_model(path, custom_objects=stochdepth.keras.KERASFACTORY_CUSTOM_OBJECTS)

That mapping is enough where kerasfactory is not imported. Where it is, Keras lets its global
registration win over `custom_objects`; use `stochdepth.keras.load_kerasfactory_model(path)`
(or `with stochdepth.keras.kerasfactory_compat(): keras.saving.load_model(path)`) there.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import keras
import numpy as np
from keras import ops

__all__ = [
    "StochasticDepth",
    "KERASFACTORY_CUSTOM_OBJECTS",
    "kerasfactory_compat",
    "load_kerasfactory_model",
    "keep_mask",
]

# Random123's Philox4x32 constants (PHILOX_M4x32_0/1, PHILOX_W32_0/1); DESIGN.md.
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_LO16 = 0xFFFF
_LO32 = 0xFFFFFFFF

_MODES = ("row", "batch")
_SCALINGS = ("inference", "training")


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
    # DESIGN.md: T = floor(p * 2**32) in float64; keep iff draw < T.
    return int(math.floor(float(survival_prob) * 2.0**32))


def _draws(batch, k0, k1, off0, off1, mode, mulhilo):
    """The 32-bit draw of each sample (DESIGN.md, "The mask stream"): uint32, shape (batch,)
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
    """The keep mask of DESIGN.md's stream, in `keras.ops`: a bool tensor of shape (batch,).

    `batch` is an int or a scalar int tensor (a dynamic batch size under `tf.function`); the
    seed and offset words are Python ints below 2**32 or uint32 scalar tensors. Equal to
    `stochdepth.mask(batch, survival_prob, seed=seed_hi << 32 | seed_lo,
    offset=offset_hi << 32 | offset_lo, mode=mode)` for batch < 2**31.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
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


# ---- helpers


def _check_survival_prob(value):
    if isinstance(value, np.generic):  # a NumPy scalar: keep get_config() JSON-friendly
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"survival_prob must be a real number in [0, 1], got {type(value).__name__}"
        )
    if not 0 <= value <= 1:  # also rejects NaN
        raise ValueError(f"survival_prob must be in [0, 1], got {value}")
    return value


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be None or an integer in [0, 2**64), got {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be None or an integer in [0, 2**64), got {seed}")
    return seed


def _seed_state_value(seed_lo, dtype):
    """The value that a SeedGenerator state of `dtype` holds for the 32-bit word seed_lo."""
    if keras.backend.standardize_dtype(dtype) == "int32":  # torch: the bit pattern of a uint32
        return (seed_lo ^ 0x80000000) - 0x80000000
    return seed_lo


def _compute_dtype(dtype):
    return "float64" if dtype == "float64" else "float32"


def _torch_module():
    # Imported on first use: `import stochdepth.keras` never imports torch.
    import stochdepth.torch as sd_torch

    return sd_torch


# ---- the layer


@keras.saving.register_keras_serializable(package="stochdepth")
class StochasticDepth(keras.layers.Layer):
    """Stochastic depth (Huang et al., 2016) on a residual branch, per sample.

    Called on `[shortcut, residual]` (same shape and dtype):

    - training: `out[b] = shortcut[b] + keep[b] * s * residual[b]`, keep[b] ~ Bernoulli(p); a
      dropped sample is `shortcut[b]` exactly (its residual is not read);
    - inference: `shortcut + c * residual`.

    With `scaling="inference"` (default, kerasfactory and the paper) s = 1 and c = p; with
    `scaling="training"` (timm, torchvision) s = 1/p (0 when p = 0) and c = 1.

    Args:
        survival_prob: p, the probability of keeping a sample's residual branch, in [0, 1].
        seed: None or an int in [0, 2**64). Training call n of the layer (from 0) uses the
            mask `stochdepth.mask(batch, p, seed=seed, offset=n, mode=mode)`.
        mode: "row" (one draw per sample) or "batch" (one draw for the whole batch).
        scaling: "inference" or "training", as above.
        axis: the sample axis of the inputs (default 0); negative values count from the end.
        **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    Raises:
        ValueError: survival_prob outside [0, 1] (or NaN), a bad mode/scaling/seed value; at
            call time inputs that are not a list of two, or shapes that differ.
        TypeError: arguments of the wrong type, or shortcut and residual of different dtypes.
    """

    def __init__(self, survival_prob=0.5, seed=None, *, mode="row", scaling="inference",
                 axis=0, **kwargs):
        super().__init__(**kwargs)
        self.survival_prob = _check_survival_prob(survival_prob)
        self.seed = _check_seed(seed)
        if mode not in _MODES:
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        if scaling not in _SCALINGS:
            raise ValueError(f"scaling must be 'inference' or 'training', got {scaling!r}")
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.mode = mode
        self.scaling = scaling
        self.axis = int(axis)
        # State [seed & 0xFFFFFFFF, step]: SeedGenerator.next() returns it and advances the step.
        # A seed's high word never changes, so it stays a constant of the layer.
        self._seed_hi = 0 if self.seed is None else self.seed >> 32
        # torch: the kernels take (seed, offset) as host integers, so the state lives on the CPU
        # and reading it is no device sync.
        on_cpu = keras.backend.backend() == "torch"
        with keras.device("cpu") if on_cpu else contextlib.nullcontext():
            self.seed_generator = keras.random.SeedGenerator(None if self.seed is None else 0)
            if self.seed is not None:
                # Set the seed word here rather than through SeedGenerator(seed): the state dtype
                # is int32 on some backends (torch), where a word >= 2**31 must be stored as its
                # bit pattern.
                state = self.seed_generator.state
                word = _seed_state_value(self.seed & _LO32, state.dtype)
                state.assign(ops.convert_to_tensor(np.array([word, 0]), dtype=state.dtype))
        self.built = True

    # -- scalars

    def _train_scale(self):
        p = float(self.survival_prob)
        if self.scaling == "training":
            return 1.0 / p if p > 0 else 0.0
        return 1.0

    def _inference_scale(self):
        return float(self.survival_prob) if self.scaling == "inference" else 1.0

    # -- call

    def call(self, inputs, training=False):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError("inputs must be a list of [shortcut, residual]")
        shortcut, residual = inputs
        shortcut = ops.convert_to_tensor(shortcut)
        residual = ops.convert_to_tensor(residual)
        self._check_inputs(shortcut, residual)
        training = bool(training)
        if keras.backend.backend() == "torch":
            return self._call_torch(shortcut, residual, training)
        return self._call_ops(shortcut, residual, training)

    def _check_inputs(self, shortcut, residual):
        s_dtype = keras.backend.standardize_dtype(shortcut.dtype)
        r_dtype = keras.backend.standardize_dtype(residual.dtype)
        if s_dtype != r_dtype:
            raise TypeError(
                f"shortcut and residual must have the same dtype, got {s_dtype} and {r_dtype}"
            )
        if s_dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise TypeError(
                f"shortcut and residual must be float16, bfloat16, float32 or float64, "
                f"got {s_dtype}"
            )
        s_shape, r_shape = tuple(shortcut.shape), tuple(residual.shape)
        if len(s_shape) != len(r_shape) or any(
            a is not None and b is not None and a != b for a, b in zip(s_shape, r_shape)
        ):
            raise ValueError(
                f"shortcut and residual must have the same shape, got {s_shape} and {r_shape}"
            )
        rank = len(s_shape)
        if rank < 1:
            raise ValueError("shortcut and residual must have rank >= 1 (a sample axis)")
        if not -rank <= self.axis < rank:
            raise ValueError(f"axis {self.axis} is out of range for inputs of rank {rank}")

    def _seed_words(self):
        """The (seed_lo, offset) state of this training call, advancing the step."""
        return self.seed_generator.next()

    def _call_ops(self, shortcut, residual, training):
        dtype = keras.backend.standardize_dtype(shortcut.dtype)
        ct = _compute_dtype(dtype)
        sc = ops.cast(shortcut, ct) if ct != dtype else shortcut
        res = ops.cast(residual, ct) if ct != dtype else residual
        if not training:
            c = self._inference_scale()
            out = sc + ops.multiply(_scalar(c, ct), res) if c != 1.0 else sc + res
            return ops.cast(out, dtype) if ct != dtype else out
        rank = len(shortcut.shape)
        axis = self.axis % rank
        batch = shortcut.shape[axis]
        if batch is None:
            batch = ops.shape(shortcut)[axis]
        state = self._seed_words()
        seed_lo = _low_word(state[0])
        offset = state[1]
        if keras.backend.standardize_dtype(offset.dtype) in ("int64", "uint64"):
            off_lo, off_hi = _low_word(offset), ops.cast(ops.right_shift(offset, 32), "uint32")
        else:
            off_lo, off_hi = _low_word(offset), 0
        keep = keep_mask(batch, self.survival_prob, seed_lo, self._seed_hi, off_lo, off_hi,
                         self.mode)
        bshape = [1] * rank
        bshape[axis] = -1
        keep = ops.reshape(keep, bshape)
        s = self._train_scale()
        # See the module docstring: XLA may contract this multiply-add into an FMA.
        kept = sc + ops.multiply(_scalar(s, ct), res) if s != 1.0 else sc + res
        out = ops.where(keep, kept, sc)
        return ops.cast(out, dtype) if ct != dtype else out

    def _call_torch(self, shortcut, residual, training):
        sd_torch = _torch_module()
        if not training:
            return sd_torch.stochastic_depth(
                shortcut, residual, float(self.survival_prob), training=False, mode=self.mode,
                scaling=self.scaling, axis=self.axis,
            )
        # The state lives on the CPU; advance it there too (its increment would otherwise be
        # created on Keras's default device, a GPU when there is one).
        with keras.device("cpu"):
            seed_lo, offset = self._seed_words().tolist()
        seed = (self._seed_hi << 32) | (seed_lo & _LO32)
        offset &= _LO32
        return sd_torch.stochastic_depth(
            shortcut, residual, float(self.survival_prob), training=True, mode=self.mode,
            scaling=self.scaling, axis=self.axis, seed=seed, offset=offset,
            # The mask is the layer's (seed, step) on every rank, as on the other backends.
            sync_across_ranks=True,
        )

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "survival_prob": self.survival_prob,
                "seed": self.seed,
                "mode": self.mode,
                "scaling": self.scaling,
                "axis": self.axis,
            }
        )
        return config


def _scalar(value, dtype):
    # Evaluated in float64, rounded once to the compute type (DESIGN.md, "Arithmetic").
    return ops.convert_to_tensor(np.asarray(value, dtype=np.float64).astype(dtype), dtype=dtype)


def _low_word(x):
    """The low 32 bits of an integer scalar tensor, as uint32."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype == "uint32":
        return x
    if dtype in ("int64", "uint64"):
        return ops.cast(ops.bitwise_and(x, ops.convert_to_tensor(_LO32, dtype=dtype)), "uint32")
    return ops.cast(x, "uint32")


# Maps the name under which kerasfactory registers its layer to ours, so that a `.keras` file
# saved with `kerasfactory.layers.StochasticDepth` loads with this layer.
_KERASFACTORY_NAME = "kerasfactory.layers>StochasticDepth"
KERASFACTORY_CUSTOM_OBJECTS = {_KERASFACTORY_NAME: StochasticDepth}


@contextlib.contextmanager
def kerasfactory_compat():
    """Within the block, kerasfactory's registered layer name resolves to our layer.

    `load_model(path, custom_objects=KERASFACTORY_CUSTOM_OBJECTS)` is enough where kerasfactory
    is not imported. Where it is, its own registration wins: Keras merges the global registry
    over `custom_objects` (and over `custom_object_scope`) when it deserializes a model's
    layers. This block therefore points the global entry at our layer and restores it on exit
    (not thread-safe, like any change to Keras's global registry)."""
    registry = keras.saving.get_custom_objects()
    missing = object()
    old = registry.get(_KERASFACTORY_NAME, missing)
    registry[_KERASFACTORY_NAME] = StochasticDepth
    try:
        yield
    finally:
        if old is missing:
            registry.pop(_KERASFACTORY_NAME, None)
        else:
            registry[_KERASFACTORY_NAME] = old


def load_kerasfactory_model(filepath, **kwargs):
    """`keras.saving.load_model` for a model saved with kerasfactory's StochasticDepth: every such
    layer comes back as `stochdepth.keras.StochasticDepth`, kerasfactory imported or not."""
    custom_objects = {**KERASFACTORY_CUSTOM_OBJECTS, **(kwargs.pop("custom_objects", None) or {})}
    with kerasfactory_compat():
        return keras.saving.load_model(filepath, custom_objects=custom_objects, **kwargs)
