"""The fused pre-norm block tail in JAX (docs/design.md, "Fused residual and norm"):

    y, n = stochastic_depth_norm(shortcut, residual, 0.9, weight, bias, seed=seed, offset=step)

    y = shortcut + keep[b] * s * (gamma * residual)
    n = LayerNorm(y; weight, bias, eps) or RMSNorm(y; weight, eps) over the last axis

as two XLA FFI custom calls (`stochdepth_norm_fwd`, `stochdepth_norm_bwd`, handlers in
src/ffi/jax_norm_ffi.cc, registered for the CPU, and for CUDA in a CUDA build, when this module
is imported) with a `jax.custom_vjp`: under jit, grad and vmap, the bits of
`stochdepth.reference.forward_norm` / `backward_norm`. The key is the op's uint32[4] operand
(`stochdepth.jax.key_words`), which the kernels read where XLA put it: a traced seed or offset
draws a new mask without recompiling, and the mask is the one `stochdepth.jax.stochastic_depth`
draws for the same (seed, offset). The backward pass saves y, the key and the parameters (the
residual too with gamma), never a mask or a row statistic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _core
from .._norm_op import NormConfig, check_forward
from .._op import OpConfig
from . import _ffi

__all__ = ["stochastic_depth_norm", "apply_norm", "TARGETS"]

TARGETS = ("stochdepth_norm_fwd", "stochdepth_norm_bwd")


def _register():
    """Connects the handlers to the core's norm entries and registers them on every platform the
    module has (the CPU, and CUDA in a CUDA build), without the command-buffer trait: the CUDA
    backward pass takes its scratch from the library's pool."""
    module = _ffi.MODULE
    module.connect_norm(_core._norm_entry)
    for platform in module.norm_platforms:
        for name, capsule in module.norm_handlers(platform).items():
            try:
                jax.ffi.register_ffi_target(name, capsule, platform=platform, api_version=1)
            except Exception as e:  # as _ffi.register: XLA names the API version it refuses
                major, minor = module.ffi_api_version
                raise RuntimeError(
                    f"XLA refused stochdepth's FFI target {name!r} ({platform}): the module was "
                    f"built against jaxlib {module.jaxlib_build_version} (XLA FFI API "
                    f"{major}.{minor}). Rebuild stochdepth against the running jaxlib. ({e})"
                ) from e


_register()


def _attrs(cfg):
    p, norm, eps, training, batch_mode, scaling, has_gamma, has_weight, has_bias = cfg
    return dict(
        survival_prob=np.float64(p), norm=np.int64(norm), eps=np.float64(eps),
        training=np.int64(training), batch_mode=np.int64(batch_mode), scaling=np.int64(scaling),
        has_gamma=np.int64(has_gamma), has_weight=np.int64(has_weight),
        has_bias=np.int64(has_bias),
    )


def _or_empty(v, dtype):
    """The operand of an absent parameter: a zero-length vector (the FFI has no optional
    operands; the has_* attributes say which are real)."""
    return jnp.zeros((0,), dtype) if v is None else v


def _vec(like, present):
    return jax.ShapeDtypeStruct((like.shape[-1] if present else 0,), like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def norm_op(shortcut, residual, gamma, weight, bias, key, cfg):
    """(y, n) on checked arrays; `cfg` the static tuple of `_static` (the FFI attributes)."""
    out = jax.ShapeDtypeStruct(shortcut.shape, shortcut.dtype)
    call = jax.ffi.ffi_call("stochdepth_norm_fwd", (out, out), vmap_method="sequential")
    dt = shortcut.dtype
    return tuple(call(shortcut, residual, _or_empty(gamma, dt), _or_empty(weight, dt),
                      _or_empty(bias, dt), key, **_attrs(cfg)))


def _norm_fwd(shortcut, residual, gamma, weight, bias, key, cfg):
    y, n = norm_op(shortcut, residual, gamma, weight, bias, key, cfg)
    # The residual is read by the backward pass only with gamma (for grad_gamma).
    return (y, n), (y, residual if gamma is not None else None, gamma, weight, key)


def _norm_bwd(cfg, saved, cotangents):
    y, residual, gamma, weight, key = saved
    grad_y, grad_n = cotangents
    dt = y.dtype
    *_, has_gamma, has_weight, has_bias = cfg  # the last three of `_static`
    full = jax.ShapeDtypeStruct(y.shape, dt)
    call = jax.ffi.ffi_call(
        "stochdepth_norm_bwd",
        (full, full, _vec(y, has_gamma), _vec(y, has_weight), _vec(y, has_bias)),
        vmap_method="sequential")
    g_sc, g_res, g_gamma, g_w, g_b = call(grad_y, grad_n, y, _or_empty(residual, dt),
                                          _or_empty(gamma, dt), _or_empty(weight, dt), key,
                                          **_attrs(cfg))
    return (g_sc, g_res, g_gamma if has_gamma else None, g_w if has_weight else None,
            g_b if has_bias else None, np.zeros(key.shape, dtype=jax.dtypes.float0))


norm_op.defvjp(_norm_fwd, _norm_bwd)


def _static(config, has_gamma, has_weight, has_bias):
    op = config.op
    return (op.survival_prob, int(config.norm == "rms"), config.eps, int(op.training),
            int(op.batch_mode), int(op.scaling == "training"), int(has_gamma), int(has_weight),
            int(has_bias))


def _spec(x):
    return None if x is None else (jnp.dtype(x.dtype).name, tuple(x.shape))


def _array(x):
    return None if x is None else jnp.asarray(x)


def apply_norm(shortcut, residual, weight, bias, gamma, words, config):
    """The fused op for a caller that holds its key words already (the Keras layer on the JAX
    backend): `words` the uint32[4] key operand (`stochdepth.jax.key_words`; not read at
    inference), `config` a `stochdepth._norm_op.NormConfig`. The arrays are checked as in
    `stochastic_depth_norm`."""
    shortcut, residual = jnp.asarray(shortcut), jnp.asarray(residual)
    gamma, weight, bias = _array(gamma), _array(weight), _array(bias)
    check_forward(config, _spec(shortcut), _spec(residual), _spec(gamma), _spec(weight),
                  _spec(bias))
    cfg = _static(config, gamma is not None, weight is not None, bias is not None)
    return norm_op(shortcut, residual, gamma, weight, bias, words, cfg)


def stochastic_depth_norm(shortcut, residual, survival_prob, weight, bias=None, *, norm="layer",
                          eps=1e-6, gamma=None, seed=None, offset=0, training=True, mode="row",
                          scaling="inference"):
    """The fused pre-norm block tail: ``(y, n)`` with y = shortcut + keep[b] * s * (gamma *
    residual) and n = LayerNorm(y; weight, bias, eps) (norm="layer") or RMSNorm(y; weight, eps)
    (norm="rms") over the last axis.

    Args:
        shortcut, residual: JAX arrays of shape (B, ..., C), rank >= 2, samples along axis 0,
            the same dtype (float16, bfloat16, float32, float64).
        survival_prob, seed, offset, training, mode, scaling: as for
            `stochdepth.jax.stochastic_depth` (axis 0): the same arguments give the same mask.
        weight, bias: the norm's affine parameters, shape (C,), the inputs' dtype; each may be
            None (norm="rms" takes no bias).
        norm: "layer" or "rms" (static). eps: a positive finite number (static).
        gamma: an optional layer scale of shape (C,) applied to the residual.

    Differentiable in shortcut, residual, gamma, weight and bias (first order). The bits are
    those of `stochdepth.reference.forward_norm` (and `backward_norm` for the gradients).
    """
    from . import key_words  # the package's (imported here: the package imports this module)

    config = NormConfig(OpConfig(survival_prob, mode, 0, scaling, training), norm, eps)
    words = key_words(seed, offset) if config.op.training else jnp.zeros((4,), jnp.uint32)
    return apply_norm(shortcut, residual, weight, bias, gamma, words, config)
