"""`stochastic_residual`: stochastic depth that owns the branch and runs it on the kept samples
only, in JAX (docs/design.md, "Skipping dropped samples").

    training:  k = kept samples; y = branch(x[k]); out = x, then out[k] += s * y
    inference: out = x + c * branch(x)

The mask is the library's stream for (seed, offset), the kept samples' order that of
`stochdepth.reference.forward_kept`. The arithmetic is the kernel's: the branch's rows are placed
into a zero residual at the kept samples (jnp indexing: there is no compact-row FFI target) and
`stochdepth.jax.apply` computes `x + keep * s * residual`, so a kept sample's output is
`forward_kept`'s bit for bit and a dropped one is `x` bit for bit, jitted or not. Its gradient
is the backward kernel's, so the branch's output gets `backward_kept`'s cotangent.

Two ways to know the kept count, which sizes the branch's input:

- The key is concrete (Python or NumPy integers, JAX arrays that are not traced): the mask is
  computed on the host and the branch runs on exactly the kept samples, under `jax.jit` too
  (the count is then a constant of the traced program).
- The key is traced (a step counter inside `jax.jit`): the count is data-dependent, and shapes
  in XLA are static. The count is rounded up to one of a few static bucket sizes, the kept
  samples are gathered first and the rest of the bucket is padding (copies of the first kept
  sample, so the padding computes what a kept sample does: no Inf or NaN that a dropped
  sample's data might produce), the branch runs on the bucket, and only its first `count`
  rows are placed. `lax.switch` picks the bucket at run time: one traced copy of the branch per
  bucket size, one compiled program, and only the chosen copy executes (under `vmap` the
  switch becomes a select, which runs every copy). Nothing kept: no copy runs. Under grad the
  switch keeps every bucket's activations (zeros for the buckets not taken); where those would
  pass twice the largest bucket's, each copy is rematerialised (recomputed in the backward pass,
  not saved).

The padding rows' outputs are never read, so their cotangent is exactly zero: the branch's
parameters get gradients from kept samples only. A branch with batch statistics (BatchNorm in
training mode) sees the kept samples, and under a traced key the padding rows too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import stochdepth

from .. import _op
from .._buckets import DEFAULT_BUCKETS, bucket_sizes
from .._op import OpConfig

__all__ = ["stochastic_residual", "bucket_sizes"]


def _sdj():
    # The package's public functions, imported when called: stochdepth.jax imports this module.
    import stochdepth.jax as sdj

    return sdj


def _host_key(seed, offset):
    """(seed, offset) as host integers when neither is traced, else None."""
    key_words = _sdj().key_words
    try:
        with jax.ensure_compile_time_eval():
            words = np.asarray(key_words(seed, offset)).astype(np.uint64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    return _op.join64(int(words[0]), int(words[1])), _op.join64(int(words[2]), int(words[3]))


def _run_branch(branch_fn, stateful, state, z):
    """(y, new state) of the branch on `z`, y checked to keep z's shape."""
    if stateful:
        result = branch_fn(z, state)
        if not isinstance(result, tuple) or len(result) != 2:
            raise TypeError("branch_fn with state must return (output, new_state), got "
                            f"{type(result).__name__}")
        y, state = result
    else:
        y = branch_fn(z)
    y = jnp.asarray(y)
    if tuple(y.shape) != tuple(z.shape):
        raise ValueError(f"branch must keep the shape of its input, got {tuple(y.shape)} for "
                         f"an input of shape {tuple(z.shape)}")
    return y, state


def _combine(x, y_full, words, config):
    """x + keep * s * y_full by the kernel, both in their common dtype."""
    common = jnp.promote_types(x.dtype, y_full.dtype)
    return _sdj().apply(x.astype(common), y_full.astype(common), words, config)


def _exact(x, branch_fn, stateful, state, config, seed, offset):
    """The key known on the host: the branch runs on exactly the kept samples."""
    batch = x.shape[0]
    keep = stochdepth.mask(batch, config.survival_prob, seed=seed, offset=offset,
                           mode=config.mode)
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        return x, state  # nothing kept ("batch" mode, or p = 0): the branch does not run
    whole = kept.size == batch
    y, state = _run_branch(branch_fn, stateful, state, x if whole else x[kept])
    full = y if whole else jnp.zeros(x.shape, y.dtype).at[kept].set(y)
    words = jnp.asarray(np.array(_op.key_words(seed, offset), np.uint32))
    return _combine(x, full, words, config), state


def _bucketed(x, branch_fn, stateful, state, config, words, sizes):
    """The key traced: the kept count rounded up to a bucket size, picked by lax.switch."""
    batch = x.shape[0]
    # The mask by the kernel itself: keep * 1 * 1 is 1 for a kept sample, 0 for a dropped one.
    ones = jnp.ones((batch,), jnp.float32)
    keep = _sdj().apply(None, ones, words, OpConfig(config.survival_prob, config.mode)) != 0
    count = jnp.sum(keep, dtype=jnp.int32)
    # "batch" mode and p = 1 keep all or nothing: the one bucket is the whole batch, as it is.
    whole = config.batch_mode or config.survival_prob == 1.0
    if not whole:
        order = jnp.argsort(jnp.logical_not(keep), stable=True)  # the kept samples first
        valid = jnp.arange(batch) < count
        gather_at = jnp.where(valid, order, order[0])  # padding: the first kept sample again
        scatter_at = jnp.where(valid, order, batch)  # padding: past the end, not scattered

    def bucket(size):
        def run(x, state):
            if whole:
                return _run_branch(branch_fn, stateful, state, x)
            y, new_state = _run_branch(branch_fn, stateful, state, x[gather_at[:size]])
            full = jnp.zeros(x.shape, y.dtype).at[scatter_at[:size]].set(y, mode="drop")
            return full, new_state

        return run

    # The branch's output type, for the bucket that runs nothing: an abstract trace only.
    y_spec, state_spec = jax.eval_shape(bucket(sizes[0]), x, state)

    def nothing(x, state):
        zeros = jnp.zeros(y_spec.shape, y_spec.dtype)
        return zeros, jax.tree.map(lambda s, spec: jnp.asarray(s, spec.dtype), state, state_spec)

    # Index 0: nothing kept; index i: the smallest size >= count.
    bounds = jnp.asarray((0,) + sizes[:-1], jnp.int32)
    index = jnp.sum(count > bounds, dtype=jnp.int32)
    # Under grad, lax.switch must give every branch the same residuals: it saves the union of
    # all buckets' activations, the ones of the buckets not taken as zeros. Saved, a ViT-B
    # attention branch at batch 8 and four buckets needed 275 MiB of XLA temporaries against
    # 92 MiB for the plain branch, and its gradient took 45% longer than the same kept rows at a
    # concrete key. Where the union would pass twice the largest bucket's activations, each
    # bucket is rematerialised (jax.checkpoint: 111 MiB, 10% longer, the taken bucket's forward
    # run again in the backward pass); below that (one or two buckets, high p) recomputing costs
    # more than it saves (docs/design.md, "Skipping dropped samples").
    remat = sum(sizes) > 2 * max(sizes)
    branches = [nothing] + [jax.checkpoint(bucket(s)) if remat else bucket(s) for s in sizes]
    full, state = lax.switch(index, branches, x, state)
    return _combine(x, full, words, config), state


def stochastic_residual(x, branch_fn, survival_prob, *, seed=None, offset=0, training=True,
                        mode="row", scaling="inference", buckets=DEFAULT_BUCKETS, state=None):
    """``x + keep * s * branch_fn(x)`` that runs `branch_fn` on the kept samples (axis 0) only.

    Args:
        x: a JAX array (float16, bfloat16, float32, float64), rank >= 1, samples along axis 0.
        branch_fn: maps (n, ...) to (n, ...) sample-wise; with `state`, maps
            `(z, state)` to `(y, new_state)`.
        survival_prob: p in [0, 1], a Python number (static).
        seed, offset: as `stochastic_depth` (integers, JAX integer scalars, traced is fine, or a
            PRNG key for seed); seed is needed only when training. The mask is
            `stochdepth.mask(batch, p, seed=..., offset=..., mode=mode)`.
        training: True draws the mask; False is ``x + c * branch_fn(x)`` on every sample.
        mode: "row" or "batch" (a dropped call runs no branch at all).
        scaling: "inference" (s = 1, c = p) or "training" (s = 1/p, c = 1).
        buckets: the static sizes used when the key is traced (see `bucket_sizes`): a count
            (default 4) or a sequence of sizes. Unused when the key is concrete.
        state: None, or a pytree threaded through the branch (a Keras layer's non-trainable
            variables, BatchNorm statistics); then the result is ``(out, new_state)``, and
            `state` comes back unchanged (in the branch's state types) when the branch does not
            run.

    Equal to `stochastic_depth(x, branch_fn(x), ...)` for a branch that treats samples
    independently; the kept samples' outputs are `reference.forward_kept` of the branch's
    rows bit for bit, the dropped ones `x` bit for bit. A branch's output of another dtype is
    promoted with `x` as `x + y` would be.
    """
    config = OpConfig(survival_prob, mode, 0, scaling, training)
    if not callable(branch_fn):
        raise TypeError(f"branch_fn must be callable, got {type(branch_fn).__name__}")
    x = jnp.asarray(x)
    _op.check_arrays("x", jnp.dtype(x.dtype).name, tuple(x.shape), 0)
    stateful = state is not None
    if not config.training:
        y, state = _run_branch(branch_fn, stateful, state, x)
        out = _combine(x, y, jnp.zeros((4,), jnp.uint32), config)
        return (out, state) if stateful else out
    _op.check_seed_given(seed)
    sizes = bucket_sizes(x.shape[0], config.survival_prob, buckets, config.mode)
    host = _host_key(seed, offset)
    if host is not None:
        out, state = _exact(x, branch_fn, stateful, state, config, *host)
    elif not sizes:
        out = x  # an empty batch, or p = 0: nothing is ever kept
    else:
        out, state = _bucketed(x, branch_fn, stateful, state, config,
                               _sdj().key_words(seed, offset), sizes)
    return (out, state) if stateful else out
