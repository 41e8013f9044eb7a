"""`StochasticDepthNorm`, the fused pre-norm block tail as a Keras 3 layer (docs/design.md,
"Fused residual and norm"): called on `[shortcut, residual]`, it returns `[y, n]` with

    y = shortcut + keep[b] * s * (gamma * residual)
    n = LayerNorm(y; weight, bias, eps) or RMSNorm(y; weight, eps) over the last axis

owning weight (ones), bias (zeros, LayerNorm only) and, with `layer_scale=`, gamma (filled with
it). Seeded like `StochasticDepth`: training call n uses the mask of (seed, offset=n), the
SeedGenerator state [seed & 0xFFFFFFFF, step] saved with the model.

- torch backend: `stochdepth.torch.stochastic_depth_norm` (the compiled kernels, gradients
  included);
- JAX backend: `stochdepth.jax.norm.apply_norm` (the XLA FFI custom calls, gradients included);
- other backends (TensorFlow): `keras.ops`, with the mask of `_philox.keep_mask` and the forward
  pass in the pinned order (16-lane row sums); the gradient is the backend's automatic
  differentiation of those ops, not the pinned backward pass. A TensorFlow kernel may come later.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from .._norm_op import NormConfig, check_eps, check_forward, check_norm
from .._op import LO32, OpConfig, check_mode, check_prob, check_scaling, join64, split64
from ._philox import keep_mask
from .layer import (
    _check_layer_scale,
    _check_seed,
    _compute_dtype,
    _load_variables,
    _low_word,
    _save_seed_state,
    _scalar,
    _seed_generator,
    _torch_module,
)

_LANES = 16  # the pinned row sum's lanes (docs/design.md, "Fused residual and norm")


@keras.saving.register_keras_serializable(package="stochdepth")
class StochasticDepthNorm(keras.layers.Layer):
    """Stochastic depth on a residual branch followed by LayerNorm or RMSNorm, fused.

    Called on `[shortcut, residual]` (shape (B, ..., C), the same dtype, samples along axis 0),
    returns `[y, n]` (see the module docstring; at inference y = shortcut + c * (gamma *
    residual)).

    Args:
        survival_prob: p, the probability of keeping a sample's residual branch, in [0, 1].
        seed: None or an int in [0, 2**64). Training call n of the layer (from 0) uses the
            mask `stochdepth.mask(batch, p, seed=seed, offset=n, mode=mode)`.
        norm: "layer" (LayerNorm) or "rms" (RMSNorm). eps: a positive finite number added to
            the variance (mean square).
        elementwise_affine: whether the layer owns the norm's weight (and bias, LayerNorm).
        layer_scale: None, or the initial value of the layer scale gamma (shape (C,)) applied to
            the residual.
        mode, scaling: as for `StochasticDepth`.
        **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    The parameters are cast to the inputs' dtype for the op (as the PyTorch module does).
    """

    def __init__(self, survival_prob=0.5, seed=None, *, norm="layer", eps=1e-6,
                 elementwise_affine=True, layer_scale=None, mode="row", scaling="inference",
                 **kwargs):
        super().__init__(**kwargs)
        self.survival_prob = check_prob("survival_prob", survival_prob)
        self.seed = _check_seed(seed)
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        if not isinstance(elementwise_affine, (bool, np.bool_)):
            raise TypeError(
                f"elementwise_affine must be a bool, got {type(elementwise_affine).__name__}")
        self.elementwise_affine = bool(elementwise_affine)
        if layer_scale is not None:
            layer_scale = _check_layer_scale(layer_scale)
        self.layer_scale = layer_scale
        self.mode = check_mode(mode)
        self.scaling = check_scaling(scaling)
        # The seed state as StochasticDepth keeps it (layer.py).
        self.seed_generator, self._seed_hi = _seed_generator(self.seed)
        self.weight = self.bias = self.gamma = None

    def build(self, input_shape):
        if (not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2
                or not all(isinstance(s, (list, tuple)) for s in input_shape)):
            raise ValueError("inputs must be a list of [shortcut, residual]")
        width = input_shape[0][-1] if len(input_shape[0]) else None
        if width is None:
            raise ValueError(f"the last axis (the channels) of the inputs must be known, got "
                             f"shape {tuple(input_shape[0])}")
        width = int(width)
        if self.elementwise_affine:
            self.weight = self.add_weight(name="weight", shape=(width,), initializer="ones")
            if self.norm == "layer":
                self.bias = self.add_weight(name="bias", shape=(width,), initializer="zeros")
        if self.layer_scale is not None:
            self.gamma = self.add_weight(
                name="gamma", shape=(width,),
                initializer=keras.initializers.Constant(self.layer_scale))

    # -- call

    def call(self, inputs, training=False):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError("inputs must be a list of [shortcut, residual]")
        shortcut = ops.convert_to_tensor(inputs[0])
        residual = ops.convert_to_tensor(inputs[1])
        config = NormConfig(
            OpConfig(self.survival_prob, self.mode, 0, self.scaling, bool(training)), self.norm,
            self.eps)
        dtype = keras.backend.standardize_dtype(shortcut.dtype)

        def cast(v):  # a parameter as a tensor in the inputs' dtype (differentiable)
            if v is None:
                return None
            t = ops.convert_to_tensor(v)
            return t if keras.backend.standardize_dtype(t.dtype) == dtype else ops.cast(t, dtype)

        weight, bias, gamma = cast(self.weight), cast(self.bias), cast(self.gamma)
        std = keras.backend.standardize_dtype

        def spec(x):
            return None if x is None else (std(x.dtype), tuple(x.shape))

        check_forward(config, spec(shortcut), spec(residual), spec(gamma), spec(weight),
                      spec(bias))
        backend = keras.backend.backend()
        if backend == "torch":
            return list(self._call_torch(shortcut, residual, weight, bias, gamma, config))
        if backend == "jax":
            return list(self._call_jax(shortcut, residual, weight, bias, gamma, config))
        return list(self._call_ops(shortcut, residual, weight, bias, gamma, config))

    def _call_torch(self, shortcut, residual, weight, bias, gamma, config):
        sd_torch = _torch_module()
        seed, offset = None, 0
        if config.op.training:
            with keras.device("cpu"):  # the state lives on the CPU (as StochasticDepth's)
                seed_lo, step = self.seed_generator.next().tolist()
            seed, offset = join64(seed_lo, self._seed_hi), step & LO32
        return sd_torch.stochastic_depth_norm(
            shortcut, residual, config.op.survival_prob, weight, bias, norm=config.norm,
            eps=config.eps, gamma=gamma, seed=seed, offset=offset, training=config.op.training,
            mode=config.op.mode, scaling=config.op.scaling,
            # The mask is the layer's (seed, step) on every rank, as on the other backends.
            sync_across_ranks=True)

    def _call_jax(self, shortcut, residual, weight, bias, gamma, config):
        # Imported on first use: importing stochdepth.keras never imports jax itself.
        import jax.numpy as jnp

        from ..jax.norm import apply_norm

        if config.op.training:
            # The key operand as keras/_jax_backend.py makes it for StochasticDepth.
            state = self.seed_generator.next()
            step = state[1]
            if step.dtype.itemsize == 8:
                off_lo, off_hi = (w.astype(jnp.uint32) for w in split64(step))
            else:
                off_lo, off_hi = step.astype(jnp.uint32), jnp.uint32(0)
            words = jnp.stack([state[0].astype(jnp.uint32), jnp.uint32(self._seed_hi), off_lo,
                               off_hi])
        else:
            words = jnp.zeros((4,), jnp.uint32)
        return apply_norm(shortcut, residual, weight, bias, gamma, words, config)

    def _call_ops(self, shortcut, residual, weight, bias, gamma, config):
        """keras.ops, in the order of docs/design.md, "Fused residual and norm"."""
        dtype = keras.backend.standardize_dtype(shortcut.dtype)
        ct = _compute_dtype(dtype)

        def up(x):
            return None if x is None else (ops.cast(x, ct) if ct != dtype else x)

        sc, res = up(shortcut), up(residual)
        t = res if gamma is None else ops.multiply(up(gamma), res)
        op = config.op
        if op.training:
            s = op.train_scale
            state = self.seed_generator.next()
            offset = state[1]
            if keras.backend.standardize_dtype(offset.dtype) in ("int64", "uint64"):
                off_lo = _low_word(offset)
                off_hi = ops.cast(ops.right_shift(offset, 32), "uint32")
            else:
                off_lo, off_hi = _low_word(offset), 0
            batch = shortcut.shape[0]
            if batch is None:
                batch = ops.shape(shortcut)[0]
            keep = keep_mask(batch, op.survival_prob, _low_word(state[0]), self._seed_hi,
                             off_lo, off_hi, op.mode)
            keep = ops.reshape(keep, [-1] + [1] * (len(shortcut.shape) - 1))
            y = ops.where(keep, sc + ops.multiply(_scalar(s, ct), t), sc)
        else:
            y = sc + ops.multiply(_scalar(op.inference_scale, ct), t)
        y = ops.cast(y, dtype) if ct != dtype else y
        yc = up(y)  # the norm reads the stored y
        c = _scalar(float(shortcut.shape[-1]), ct)
        if config.norm == "layer":
            mean = _row_sum(yc) / c
            d = yc - mean
            var = _row_sum(ops.multiply(d, d)) / c
            xhat = d
        else:
            var = _row_sum(ops.multiply(yc, yc)) / c
            xhat = yc
        rstd = _scalar(1.0, ct) / ops.sqrt(var + _scalar(config.eps, ct))
        n = ops.multiply(xhat, rstd)
        if weight is not None:
            n = ops.multiply(n, up(weight))
        if bias is not None:
            n = n + up(bias)
        return y, (ops.cast(n, dtype) if ct != dtype else n)

    # -- saved state: the variables, and the mask sequence continues after save + load

    def save_own_variables(self, store):
        super().save_own_variables(store)
        _save_seed_state(self, store)

    def load_own_variables(self, store):
        _load_variables(self, store)

    def compute_output_shape(self, input_shape):
        return [input_shape[0], input_shape[0]]

    def get_config(self):
        config = super().get_config()
        config.update({
            "survival_prob": self.survival_prob,
            "seed": self.seed,
            "norm": self.norm,
            "eps": self.eps,
            "elementwise_affine": self.elementwise_affine,
            "layer_scale": self.layer_scale,
            "mode": self.mode,
            "scaling": self.scaling,
        })
        return config


def _row_sum(x):
    """Each row's sum over the last axis in the pinned order (reference._row_sums): lane j adds
    the elements j, j + 16, ... to +0 in index order, then the tree over the lanes; kept dims."""
    c = x.shape[-1]
    steps = -(-c // _LANES)
    pad = steps * _LANES - c
    if pad:  # +0 adds nothing: a lane that starts at +0 is never -0
        x = ops.pad(x, [[0, 0]] * (len(x.shape) - 1) + [[0, pad]])
    acc = x[..., 0:_LANES]
    acc = acc + ops.zeros_like(acc)  # the lanes start at +0 (-0 + +0 is +0, as the kernels)
    for k in range(1, steps):
        acc = acc + x[..., k * _LANES:(k + 1) * _LANES]
    for h in (8, 4, 2, 1):
        acc = acc[..., :h] + acc[..., h:2 * h]
    return acc
