"""The Keras layer on the JAX backend: `StochasticDepth.call` hands its tensors to `stochdepth.jax`.

The kernels then run as XLA FFI custom calls inside the traced step, so the layer gives
`stochdepth.reference` bit for bit under jit too (no integer-op Philox, no FMA contraction:
docs/design.md, "Arithmetic"). Training call n uses the mask of (seed, offset=n), as on every
backend (docs/design.md, "Randomness in the adapters"): the SeedGenerator state
[seed & 0xFFFFFFFF, step] and the seed's constant high word become the key operand.
"""

from __future__ import annotations

from .._op import split64


def call(layer, shortcut, residual, config, gamma=None):
    """The layer's output for `config` (an OpConfig the layer made for this call) and its layer
    scale `gamma` (None without one); the arrays are checked by `stochdepth.jax.apply`, once."""
    # Imported on first use: importing stochdepth.keras never imports jax itself.
    import jax.numpy as jnp

    import stochdepth.jax as sdj

    if not config.training:
        return sdj.apply(shortcut, residual, jnp.zeros((4,), jnp.uint32), config, gamma=gamma)
    state = layer._seed_words()
    seed_lo = state[0].astype(jnp.uint32)
    step = state[1]
    if step.dtype.itemsize == 8:
        off_lo, off_hi = (w.astype(jnp.uint32) for w in split64(step))
    else:
        off_lo, off_hi = step.astype(jnp.uint32), jnp.uint32(0)
    words = jnp.stack([seed_lo, jnp.uint32(layer._seed_hi), off_lo, off_hi])
    return sdj.apply(shortcut, residual, words, config, gamma=gamma)
