"""The Keras layer on the JAX backend: `StochasticDepth.call` hands its tensors to `stochdepth.jax`.

The kernels then run as XLA FFI custom calls inside the traced step, so the layer gives
`stochdepth.reference` bit for bit under jit too (no integer-op Philox, no FMA contraction:
docs/design.md, "Arithmetic"). Training call n uses the mask of (seed, offset=n), as on every
backend (docs/design.md, "Randomness in the adapters"): the SeedGenerator state
[seed & 0xFFFFFFFF, step] and the seed's constant high word become the key operand.
"""

from __future__ import annotations

_LO32 = 0xFFFFFFFF


def call(layer, shortcut, residual, training):
    # Imported on first use: importing stochdepth.keras never imports jax itself.
    import jax.numpy as jnp

    import stochdepth.jax as sdj
    from stochdepth.jax import _ops

    p = float(layer.survival_prob)
    if not training:
        return sdj.stochastic_depth(shortcut, residual, p, training=False, mode=layer.mode,
                                    axis=layer.axis, scaling=layer.scaling)
    ax = sdj._check_arrays((shortcut, residual), layer.axis)
    cfg = sdj._config(p, True, layer.mode, ax, layer.scaling)
    state = layer._seed_words()
    seed_lo = state[0].astype(jnp.uint32)
    step = state[1]
    if step.dtype.itemsize == 8:
        off_lo, off_hi = (step & _LO32).astype(jnp.uint32), (step >> 32).astype(jnp.uint32)
    else:
        off_lo, off_hi = step.astype(jnp.uint32), jnp.uint32(0)
    key = jnp.stack([seed_lo, jnp.uint32(layer._seed_hi & _LO32), off_lo, off_hi])
    return _ops.residual_op(shortcut, residual, key, cfg)
