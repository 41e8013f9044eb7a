"""The ops as XLA FFI custom calls with a `jax.custom_vjp`: what runs under jit, grad and vmap.

`cfg` is the static part of a call (survival_prob, axis, training, batch_mode, scaling): FFI
attributes, so a new value compiles anew. The key words (seed, offset) are a uint32[4] operand,
so a new key reuses the compiled program. The backward pass recomputes the mask from the key in
the backward kernel: nothing but the key is saved (docs/design.md, "Semantics").

vmap runs the custom call once per batch element ("sequential"): each element may have its own
key, and the kernels' layout is one sample axis.

`donate` (the residual op's second static argument) aliases the result to the shortcut operand
(`input_output_aliases`): the kernel then runs in place in the shortcut's buffer, which pays
only where XLA may reuse that buffer (docs/design.md, "XLA:CPU buffers").
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from ._ffi import MODULE as _MODULE  # noqa: F401  (registers the targets)


def _attrs(cfg):
    p, axis, training, batch_mode, scaling = cfg
    return dict(
        survival_prob=np.float64(p),
        axis=np.int64(axis),
        training=np.int64(training),
        batch_mode=np.int64(batch_mode),
        scaling=np.int64(scaling),
    )


def _call(target, like, operands, cfg, aliases=None):
    call = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(like.shape, like.dtype), vmap_method="sequential",
        input_output_aliases=aliases,
    )
    return call(*operands, **_attrs(cfg))


def _float0_like(key):
    return np.zeros(key.shape, dtype=jax.dtypes.float0)


# ---- shortcut + keep * s * residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def residual_op(shortcut, residual, key, cfg, donate):
    return _call("stochdepth_residual", residual, (shortcut, residual, key), cfg,
                 {0: 0} if donate else None)


def _residual_fwd(shortcut, residual, key, cfg, donate):
    return residual_op(shortcut, residual, key, cfg, donate), key


def _residual_bwd(cfg, donate, key, g):
    # d/d shortcut is the identity; d/d residual is keep * s * g, by the same kernel.
    return g, _call("stochdepth_scale", g, (g, key), cfg), _float0_like(key)


residual_op.defvjp(_residual_fwd, _residual_bwd)


# ---- keep * s * x (single input); its gradient is the same op on g


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def scale_op(x, key, cfg):
    return _call("stochdepth_scale", x, (x, key), cfg)


def _scale_fwd(x, key, cfg):
    return scale_op(x, key, cfg), key


def _scale_bwd(cfg, key, g):
    return _call("stochdepth_scale", g, (g, key), cfg), _float0_like(key)


scale_op.defvjp(_scale_fwd, _scale_bwd)


# ---- with the layer scale gamma (docs/design.md, "Layer scale")
#
# The backward pass needs the forward's residual (grad_gamma sums (s * g) * residual over the
# kept rows): it and gamma are saved with the key, and one call of the core gives grad_residual
# and grad_gamma together.


def _backward_gamma(g, residual, gamma, key, cfg):
    call = jax.ffi.ffi_call(
        "stochdepth_backward_gamma",
        (jax.ShapeDtypeStruct(g.shape, g.dtype), jax.ShapeDtypeStruct(gamma.shape, gamma.dtype)),
        vmap_method="sequential",
    )
    return call(g, residual, gamma, key, **_attrs(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def residual_gamma_op(shortcut, residual, gamma, key, cfg, donate):
    return _call("stochdepth_residual_gamma", residual, (shortcut, residual, gamma, key), cfg,
                 {0: 0} if donate else None)


def _residual_gamma_fwd(shortcut, residual, gamma, key, cfg, donate):
    return residual_gamma_op(shortcut, residual, gamma, key, cfg, donate), (residual, gamma, key)


def _residual_gamma_bwd(cfg, donate, saved, g):
    residual, gamma, key = saved
    g_res, g_gamma = _backward_gamma(g, residual, gamma, key, cfg)
    return g, g_res, g_gamma, _float0_like(key)


residual_gamma_op.defvjp(_residual_gamma_fwd, _residual_gamma_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def scale_gamma_op(x, gamma, key, cfg):
    return _call("stochdepth_scale_gamma", x, (x, gamma, key), cfg)


def _scale_gamma_fwd(x, gamma, key, cfg):
    return scale_gamma_op(x, gamma, key, cfg), (x, gamma, key)


def _scale_gamma_bwd(cfg, saved, g):
    x, gamma, key = saved
    g_x, g_gamma = _backward_gamma(g, x, gamma, key, cfg)
    return g_x, g_gamma, _float0_like(key)


scale_gamma_op.defvjp(_scale_gamma_fwd, _scale_gamma_bwd)
