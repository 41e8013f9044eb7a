"""`StochasticResidual`, the Keras 3 layer that owns a residual branch and runs it on the kept
samples only (docs/design.md, "Skipping dropped samples"):

    training:  k = kept samples; y = layer(x[k]); out = x, then out[k] += s * y
    inference: out = x + c * layer(x)

Seeded as `StochasticDepth`: a SeedGenerator state [seed & 0xFFFFFFFF, step], so training call
n uses the mask `stochdepth.mask(batch, p, seed=seed, offset=n, mode=mode)` on every backend and
a compiled step draws a fresh one (docs/design.md, "Randomness in the adapters").

- torch backend: `stochdepth.torch.stochastic_residual` (the kernels; the kept count is read
  on the host, so the branch runs on exactly the kept samples).
- JAX backend: `stochdepth.jax.stochastic_residual` (the kernels). Eagerly the count is exact;
  inside a jitted step (`model.fit`, `stateless_call` under `jax.jit`) the state is traced and
  the branch runs at one of a few static bucket sizes (`buckets`), in a `lax.switch`. The
  wrapped layer runs in a `keras.StatelessScope` of its own there, and its non-trainable state
  (a Dropout's seed, BatchNorm's statistics) comes out of the switch as a value and is assigned
  after it, so a stateful layer works inside the jitted step too.
- TensorFlow (and other backends): the mask by `_philox.keep_mask`, the kept samples gathered
  and scattered back with `keras.ops` (dynamic shapes: the exact count, under `tf.function`
  too), `x + s * y` on the kept rows in the compute type, rounded once: exact eagerly; for the
  XLA caveat see docs/design.md, "Arithmetic".
"""

from __future__ import annotations

import keras
from keras import ops

from .._buckets import DEFAULT_BUCKETS, check_buckets
from .._op import (
    LO32,
    OpConfig,
    check_arrays,
    check_mode,
    check_prob,
    check_scaling,
    join64,
)
from ._philox import keep_mask
from .layer import (
    _check_seed,
    _compute_dtype,
    _load_seed_state,
    _low_word,
    _save_seed_state,
    _scalar,
    _seed_generator,
    _torch_module,
)

__all__ = ["StochasticResidual"]


@keras.saving.register_keras_serializable(package="stochdepth")
class StochasticResidual(keras.layers.Wrapper):
    """``x + keep * s * layer(x)``, per sample along axis 0, running `layer` only on the samples
    it keeps.

    Args:
        layer: the residual branch, a Keras layer mapping (n, ...) to (n, ...) sample-wise.
        survival_prob: p, the probability of keeping a sample's branch, in [0, 1].
        seed: None or an int in [0, 2**64), as `StochasticDepth`.
        mode: "row" (one draw per sample) or "batch" (a dropped call runs no branch at all).
        scaling: "inference" (s = 1, c = p) or "training" (s = 1/p, c = 1), as `StochasticDepth`.
        buckets: the JAX backend's static sizes inside a jitted step
            (`stochdepth.jax.residual.bucket_sizes`): a count (default 4) or a sequence of sizes.
        **kwargs: standard `keras.layers.Layer` arguments (name, dtype, ...).

    For a layer that treats samples independently the output is `StochasticDepth()([x,
    layer(x)])`'s; a layer with batch statistics sees the kept samples only (on JAX inside a
    jitted step, the bucket's padding rows too: copies of the first kept sample).
    """

    def __init__(self, layer, survival_prob=0.5, seed=None, *, mode="row", scaling="inference",
                 buckets=DEFAULT_BUCKETS, **kwargs):
        super().__init__(layer, **kwargs)
        self.survival_prob = check_prob("survival_prob", survival_prob)
        self.seed = _check_seed(seed)
        self.mode = check_mode(mode)
        self.scaling = check_scaling(scaling)
        self.buckets = check_buckets(buckets)
        # The seed state as StochasticDepth keeps it (layer.py).
        self.seed_generator, self._seed_hi = _seed_generator(self.seed)

    # -- call

    def call(self, inputs, training=False):
        x = ops.convert_to_tensor(inputs)
        config = OpConfig(self.survival_prob, self.mode, 0, self.scaling, bool(training))
        backend = keras.backend.backend()
        if backend == "jax":
            return self._call_jax(x, config)  # stochdepth.jax checks x
        check_arrays("x", keras.backend.standardize_dtype(x.dtype), tuple(x.shape), 0)
        if backend == "torch":
            return self._call_torch(x, config)
        return self._call_ops(x, config)

    def _branch(self, z, training):
        y = self.layer(z, training=training)
        if tuple(y.shape) != tuple(z.shape) and None not in tuple(z.shape):
            raise ValueError(f"layer must keep the shape of its input, got {tuple(y.shape)} for "
                             f"an input of shape {tuple(z.shape)}")
        return y

    def _call_torch(self, x, config):
        sd_torch = _torch_module()

        def branch(z):
            return self._branch(z, config.training)

        if not config.training:
            return sd_torch.stochastic_residual(x, branch, config.survival_prob, training=False,
                                                mode=config.mode, scaling=config.scaling)
        # The state lives on the CPU; advance it there (as StochasticDepth does).
        with keras.device("cpu"):
            seed_lo, offset = self.seed_generator.next().tolist()
        return sd_torch.stochastic_residual(
            x, branch, config.survival_prob, training=True, mode=config.mode,
            scaling=config.scaling, seed=join64(seed_lo, self._seed_hi), offset=offset & LO32,
            # The mask is the layer's (seed, step) on every rank, as on the other backends.
            sync_across_ranks=True,
        )

    def _call_jax(self, x, config):
        # Imported on first use: importing stochdepth.keras never imports jax itself.
        import jax.numpy as jnp

        import stochdepth.jax as sdj

        layer = self.layer
        trainable = layer.trainable_variables
        non_trainable = layer.non_trainable_variables
        values = [v.value for v in trainable]  # the current values (traced inside a step)

        def branch(z, state):
            # The layer's variables are the values read above; what it assigns is returned, so
            # nothing traced inside lax.switch escapes it.
            mapping = list(zip(trainable, values)) + list(zip(non_trainable, state))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                y = self._branch(z, config.training)
            return y, [scope.get_current_value(v) for v in non_trainable]

        state = [v.value for v in non_trainable]
        kw = dict(mode=config.mode, scaling=config.scaling, state=state)
        if config.training:
            seed_lo, step = self.seed_generator.next()
            # The seed as a raw key [hi, lo] (seed = hi * 2**32 + lo); the step as the offset.
            kw.update(seed=jnp.stack([jnp.uint32(self._seed_hi), seed_lo.astype(jnp.uint32)]),
                      offset=step, buckets=self.buckets)
        out, state = sdj.stochastic_residual(x, branch, config.survival_prob,
                                             training=config.training, **kw)
        for variable, value in zip(non_trainable, state):
            variable.assign(value)
        return out

    def _call_ops(self, x, config):
        if not config.training:
            y = self._branch(x, False)
            return _add(x, y, config.inference_scale)
        batch = x.shape[0]
        if batch is None:
            batch = ops.shape(x)[0]
        state = self.seed_generator.next()
        offset = state[1]
        if keras.backend.standardize_dtype(offset.dtype) in ("int64", "uint64"):
            off_lo, off_hi = _low_word(offset), ops.cast(ops.right_shift(offset, 32), "uint32")
        else:
            off_lo, off_hi = _low_word(offset), 0
        keep = keep_mask(batch, config.survival_prob, _low_word(state[0]), self._seed_hi,
                         off_lo, off_hi, config.mode)
        kept = ops.nonzero(keep)[0]  # the kept samples, in order (a dynamic count)
        if isinstance(kept.shape[0], int) and kept.shape[0] == 0:
            return x  # known on the host that nothing is kept: the branch does not run
        kept_x = ops.take(x, kept, axis=0)
        y = self._branch(kept_x, True)
        rows = _add(kept_x, y, config.train_scale)
        return ops.scatter_update(_promoted(x, rows.dtype), ops.expand_dims(kept, 1), rows)

    # -- saved state: as StochasticDepth, the mask sequence continues after save + load

    def save_own_variables(self, store):
        super().save_own_variables(store)
        _save_seed_state(self, store)

    def load_own_variables(self, store):
        # The wrapper has no variables of its own (the wrapped layer saves its own): the store
        # holds only the seed state.
        _load_seed_state(self, store)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "survival_prob": self.survival_prob,
                "seed": self.seed,
                "mode": self.mode,
                "scaling": self.scaling,
                "buckets": self.buckets if isinstance(self.buckets, int) else list(self.buckets),
            }
        )
        return config


def _promoted(x, dtype):
    return x if keras.backend.standardize_dtype(x.dtype) == dtype else ops.cast(x, dtype)


def _add(x, y, factor):
    """x + factor * y, both in their common dtype, computed in the compute type (float32 for
    the half types) and rounded once (docs/design.md, "Arithmetic")."""
    std = keras.backend.standardize_dtype
    dtype = keras.backend.result_type(std(x.dtype), std(y.dtype))
    ct = _compute_dtype(dtype)
    a, b = _promoted(x, ct), _promoted(y, ct)
    # XLA may contract this multiply-add into an FMA (docs/design.md, "Arithmetic").
    out = a + ops.multiply(_scalar(factor, ct), b) if factor != 1.0 else a + b
    return _promoted(out, dtype)
