"""The fused pre-norm block tail of the raw API: `forward_norm` and `backward_norm`
(docs/design.md, "Fused residual and norm"), exported by the `stochdepth` package."""

from __future__ import annotations

from . import _core


def forward_norm(shortcut, residual, survival_prob, weight, bias=None, *, norm="layer", eps=1e-6,
                 gamma=None, seed=None, offset=0, training=True, mode="row", scaling="inference",
                 stream=None):
    """Stochastic-depth residual add followed by LayerNorm or RMSNorm: ``(y, n)`` with

        y = shortcut + keep[b] * s * (gamma * residual)     (gamma None: shortcut + s * residual)
        n = norm(y) over the last axis: LayerNorm(weight, bias, eps) or RMSNorm(weight, eps)

    Args:
        shortcut, residual: shape (B, ..., C), rank >= 2, samples along axis 0; same dtype
            (float16, bfloat16, float32, float64) and device.
        survival_prob, seed, offset, training, mode, scaling: as for `stochdepth.forward`; the
            same arguments give the same mask (docs/design.md, "The mask stream"). `seed` is an
            integer.
        weight, bias: the norm's affine parameters, shape (C,), the inputs' dtype; each may be
            None. `norm="rms"` takes no bias.
        norm: "layer" or "rms". eps: a positive number added to the variance (mean square).
        gamma: an optional layer scale of shape (C,) applied to the residual.
        stream: as for `stochdepth.forward`.

    The arithmetic and its order are pinned (statistics in float32, float64 for float64), so
    every ISA, thread count and device gives the same bits as `stochdepth.reference.forward_norm`.
    A dropped sample's y is its shortcut bit for bit, and its residual is never read. NumPy in
    gives NumPy out; other DLPack producers give `stochdepth.Array`.
    """
    if stream is None:
        from . import _current_stream

        stream = _current_stream(shortcut, residual)
    return _core.forward_norm(shortcut, residual, survival_prob, weight, bias, norm, eps, gamma,
                              training, seed, offset, mode, scaling, stream)


def backward_norm(grad_y, grad_n, y, residual, survival_prob, weight, bias=None, *, norm="layer",
                  eps=1e-6, gamma=None, seed=None, offset=0, training=True, mode="row",
                  scaling="inference", stream=None):
    """Gradients of `forward_norm` for the same arguments, given its output `y` and the gradients
    of both its outputs: ``(grad_shortcut, grad_residual, grad_gamma, grad_weight, grad_bias)``,
    None for each parameter that was None.

    The row statistics are recomputed from `y` and the mask from (seed, offset); nothing else is
    kept between the passes. `residual` is read (kept rows only) with `gamma`, for grad_gamma;
    without gamma it may be None. `bias` is only looked at for whether it was given.
    """
    if stream is None:
        from . import _current_stream

        stream = _current_stream(y, grad_y, grad_n)
    return _core.backward_norm(grad_y, grad_n, y, residual, survival_prob, weight, bias, norm, eps,
                               gamma, training, seed, offset, mode, scaling, stream)
