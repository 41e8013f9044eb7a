"""`StochasticDepth`, the Keras 3 layer: a drop-in for `kerasfactory.layers.StochasticDepth`.

Same constructor, call signature, errors, inference formula (`shortcut + survival_prob *
residual`), `compute_output_shape` and `get_config` keys as kerasfactory 0.1.1 (a tuple of two
inputs is accepted too), with its bugs fixed: one keep draw per sample at any rank (kerasfactory
draws per token for rank 3 and fails for rank 5); `seed=0` is a seed; a jitted train step
draws a fresh mask each step, seeded or not; a dropped sample is the shortcut exactly, its
residual unread (kerasfactory's `shortcut + 0 * residual` turns Inf into NaN).

With `layer_scale=init` the layer owns a trainable `gamma` of the last axis's width (LayerScale,
docs/design.md, "Layer scale"): `shortcut + keep * s * (gamma * residual)`, the fused op on the
JAX backend (`stochdepth.jax.apply(..., gamma=)`) and the torch backend
(`stochdepth.torch.stochastic_depth(..., gamma=)`), and the same bits from keras.ops elsewhere.

On the torch backend the layer calls `stochdepth.torch.stochastic_depth`, on the JAX backend
`stochdepth.jax.apply` (`_jax_backend.py`) and on the TensorFlow backend
`stochdepth.tensorflow.apply` (`_tf_backend.py`, where this build has the TensorFlow ops): the
compiled kernels, gradients included. Elsewhere (TensorFlow without the ops, or inside an
XLA-compiled function) it draws the mask with `_philox.keep_mask` and combines in `keras.ops`,
with the same outputs.
Training call n uses the mask `stochdepth.mask(batch, p, seed=seed, offset=n)` on every backend
(docs/design.md, "Randomness in the adapters").
"""

from __future__ import annotations

import contextlib
import math
import numbers

import keras
import numpy as np
from keras import ops

from .._op import (
    LO32,
    OpConfig,
    check_arrays,
    check_axis,
    check_gamma,
    check_mode,
    check_prob,
    check_scaling,
    check_u64,
    join64,
    split64,
)
from . import _jax_backend, _tf_backend
from ._philox import keep_mask

_STATE_KEY = "seed_generator_state"  # the key of the saved state in the layer's weight store


# ---- helpers


def _check_seed(seed):
    return None if seed is None else check_u64("seed", seed)


def _seed_state_value(seed_lo, dtype):
    """The value that a SeedGenerator state of `dtype` holds for the 32-bit word seed_lo."""
    if keras.backend.standardize_dtype(dtype) == "int32":  # torch: the bit pattern of a uint32
        return (seed_lo ^ 0x80000000) - 0x80000000
    return seed_lo


def _state_device():
    """Where the seed state lives: the CPU on torch (the kernels take (seed, offset) as host
    integers, so reading the state is no device sync), the default device elsewhere."""
    return keras.device("cpu") if keras.backend.backend() == "torch" else contextlib.nullcontext()


def _assign_state(state, seed_lo, step):
    with _state_device():
        value = np.array([_seed_state_value(seed_lo, state.dtype), step])
        state.assign(ops.convert_to_tensor(value, dtype=state.dtype))


def _seed_generator(seed):
    """(SeedGenerator, the seed's high word) of a layer with this seed (None: unseeded).

    The state is [seed & 0xFFFFFFFF, step]: SeedGenerator.next() returns it and advances the
    step. A seed's high word never changes, so it stays a constant of the layer. The seed word is
    set here rather than through SeedGenerator(seed): the state dtype is int32 on some backends
    (torch), where a word >= 2**31 must be stored as its bit pattern."""
    seed_lo, seed_hi = split64(0 if seed is None else seed)
    with _state_device():
        generator = keras.random.SeedGenerator(None if seed is None else 0)
    if seed is not None:
        _assign_state(generator.state, seed_lo, 0)
    return generator, seed_hi


def _save_seed_state(layer, store):
    """Saves the seed generator's state [seed word, step] with the model (Keras saves only
    trainable and non-trainable variables, not seed generators), so that a loaded model draws
    the masks the saved one would have drawn next."""
    store[_STATE_KEY] = np.asarray(ops.convert_to_numpy(layer.seed_generator.state))


def _load_seed_state(layer, store):
    """The state _save_seed_state saved, on any backend, rewritten in this backend's state dtype
    (int32 on torch stores the word as its bit pattern); a file saved before the state was saved
    restarts at step 0."""
    if _STATE_KEY not in store:
        return
    saved = np.asarray(store[_STATE_KEY]).astype(np.int64)
    _assign_state(layer.seed_generator.state, int(saved[0]) & LO32, int(saved[1]))


def _load_variables(layer, store):
    """The variables by index as Keras saves them (the base class would count the seed state as
    one variable too many), then the seed state beside them."""
    for i, v in enumerate(layer._trainable_variables + layer._non_trainable_variables):
        v.assign(store[f"{i}"])
    _load_seed_state(layer, store)


def _check_layer_scale(value):
    """layer_scale: a finite real number (gamma's initial value)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"layer_scale must be a real number or None, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"layer_scale must be finite, got {value!r}")
    return float(value)


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
        layer_scale: None, or the initial value of a trainable layer scale `gamma` of shape
            (C,), C the inputs' last axis (created in `build`; the sample axis must not be the
            last one): the residual is scaled by gamma first (docs/design.md, "Layer scale").
        **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    Raises:
        ValueError: survival_prob outside [0, 1] (or NaN), a bad mode/scaling/seed value; at
            call time inputs that are not a list of two, or shapes that differ.
        TypeError: arguments of the wrong type, or shortcut and residual of different dtypes.
    """

    def __init__(self, survival_prob=0.5, seed=None, *, mode="row", scaling="inference",
                 axis=0, layer_scale=None, **kwargs):
        super().__init__(**kwargs)
        # The survival_prob as given (a NumPy scalar made a Python number): get_config() keeps it.
        self.survival_prob = check_prob("survival_prob", survival_prob)
        self.seed = _check_seed(seed)
        self.mode = check_mode(mode)
        self.scaling = check_scaling(scaling)
        self.axis = check_axis(axis)
        self.layer_scale = None if layer_scale is None else _check_layer_scale(layer_scale)
        self.gamma = None
        # The TensorFlow ops have no XLA kernel: Keras leaves XLA off for a model with this layer
        # (jit_compile="auto"), and turns an explicit jit_compile=True off with a warning.
        self._use_tf_ops = keras.backend.backend() == "tensorflow" and _tf_backend.available()
        if self._use_tf_ops:
            self.supports_jit = False
        self.seed_generator, self._seed_hi = _seed_generator(self.seed)
        # Without a layer scale there is nothing to build (and nothing to save but the state).
        self.built = self.layer_scale is None

    def build(self, input_shape):
        if self.layer_scale is None:
            return
        if (not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2
                or not all(isinstance(s, (list, tuple)) for s in input_shape)):
            raise ValueError("inputs must be a list of [shortcut, residual]")
        width = input_shape[0][-1] if len(input_shape[0]) else None
        if width is None:
            raise ValueError(f"layer_scale needs the last axis (the channels) of the inputs to "
                             f"be known, got shape {tuple(input_shape[0])}")
        self.gamma = self.add_weight(name="gamma", shape=(int(width),),
                                     initializer=keras.initializers.Constant(self.layer_scale))

    # -- call

    def call(self, inputs, training=False):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError("inputs must be a list of [shortcut, residual]")
        shortcut, residual = inputs
        shortcut = ops.convert_to_tensor(shortcut)
        residual = ops.convert_to_tensor(residual)
        # This call's config, from the layer's attributes: validated here, once.
        config = OpConfig(self.survival_prob, self.mode, self.axis, self.scaling, bool(training))
        gamma = self._gamma_like(residual)
        if keras.backend.backend() == "jax":
            # checks the arrays and gamma
            return _jax_backend.call(self, shortcut, residual, config, gamma)
        if gamma is None and self._use_tf_ops and not _tf_backend.in_xla_context():
            return _tf_backend.call(self, shortcut, residual, config)  # checks the arrays
        axis = self._check_inputs(shortcut, residual, config.axis, gamma)
        if keras.backend.backend() == "torch":
            return self._call_torch(shortcut, residual, config, gamma)
        return self._call_ops(shortcut, residual, config, axis, gamma)

    def _gamma_like(self, residual):
        """gamma as a tensor of the inputs' dtype (Keras's autocast under a mixed precision
        policy, and differentiable), or None without a layer scale."""
        if self.gamma is None:
            return None
        g = ops.convert_to_tensor(self.gamma)
        std = keras.backend.standardize_dtype
        return g if std(g.dtype) == std(residual.dtype) else ops.cast(g, residual.dtype)

    @staticmethod
    def _check_inputs(shortcut, residual, axis, gamma=None):
        """The two inputs' dtypes and shapes (None dimensions are unknown until run time), and
        gamma's against them; returns the axis as an index."""
        std = keras.backend.standardize_dtype
        ax = check_arrays("residual", std(residual.dtype), tuple(residual.shape), axis,
                          (std(shortcut.dtype), tuple(shortcut.shape)))
        if gamma is not None:
            check_gamma(std(gamma.dtype), tuple(gamma.shape), "residual", std(residual.dtype),
                        tuple(residual.shape), ax)
        return ax

    def _seed_words(self):
        """The (seed_lo, offset) state of this training call, advancing the step."""
        return self.seed_generator.next()

    def _call_ops(self, shortcut, residual, config, axis, gamma=None):
        dtype = keras.backend.standardize_dtype(shortcut.dtype)
        ct = _compute_dtype(dtype)
        sc = ops.cast(shortcut, ct) if ct != dtype else shortcut
        res = ops.cast(residual, ct) if ct != dtype else residual
        if gamma is not None:  # t = gamma * residual in the compute type ("Layer scale")
            res = ops.multiply(ops.cast(gamma, ct) if ct != dtype else gamma, res)
        if not config.training:
            c = config.inference_scale
            out = sc + ops.multiply(_scalar(c, ct), res) if c != 1.0 else sc + res
            return ops.cast(out, dtype) if ct != dtype else out
        rank = len(shortcut.shape)
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
        keep = keep_mask(batch, config.survival_prob, seed_lo, self._seed_hi, off_lo, off_hi,
                         config.mode)
        bshape = [1] * rank
        bshape[axis] = -1
        keep = ops.reshape(keep, bshape)
        s = config.train_scale
        # XLA may contract this multiply-add into an FMA (docs/design.md, "Arithmetic").
        kept = sc + ops.multiply(_scalar(s, ct), res) if s != 1.0 else sc + res
        out = ops.where(keep, kept, sc)
        return ops.cast(out, dtype) if ct != dtype else out

    def _call_torch(self, shortcut, residual, config, gamma=None):
        kw = {} if gamma is None else {"gamma": gamma}
        return self._call_torch_op(_torch_module(), shortcut, residual, config, kw)

    def _call_torch_op(self, sd_torch, shortcut, residual, config, kw):
        if not config.training:
            return sd_torch.stochastic_depth(
                shortcut, residual, config.survival_prob, training=False, mode=config.mode,
                scaling=config.scaling, axis=config.axis, **kw,
            )
        # The state lives on the CPU; advance it there too (its increment would otherwise be
        # created on Keras's default device, a GPU when there is one).
        with keras.device("cpu"):
            seed_lo, offset = self._seed_words().tolist()
        return sd_torch.stochastic_depth(
            shortcut, residual, config.survival_prob, training=True, mode=config.mode,
            scaling=config.scaling, axis=config.axis, seed=join64(seed_lo, self._seed_hi),
            offset=offset & LO32,
            # The mask is the layer's (seed, step) on every rank, as on the other backends.
            sync_across_ranks=True, **kw,
        )

    # -- saved state: the mask sequence continues after model.save + load_model

    def save_own_variables(self, store):
        super().save_own_variables(store)
        _save_seed_state(self, store)

    def load_own_variables(self, store):
        _load_variables(self, store)  # gamma, with a layer scale; and the seed state

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
                "layer_scale": self.layer_scale,
            }
        )
        return config


def _scalar(value, dtype):
    # Evaluated in float64, rounded once to the compute type (docs/design.md, "Arithmetic").
    return ops.convert_to_tensor(np.asarray(value, dtype=np.float64).astype(dtype), dtype=dtype)


def _low_word(x):
    """The low 32 bits of an integer scalar tensor, as uint32."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype == "uint32":
        return x
    if dtype in ("int64", "uint64"):
        return ops.cast(ops.bitwise_and(x, ops.convert_to_tensor(LO32, dtype=dtype)), "uint32")
    return ops.cast(x, "uint32")
