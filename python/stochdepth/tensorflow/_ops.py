"""The raw ops of `stochdepth/_tf_ops.so` and their registered gradients.

`cfg` is the static part of a call (axis, training, batch_mode, training_scaling): op
attributes, so a new value traces anew. The key words (seed, offset) are a uint32[4] input and
the survival probability a float64 input, so a new key reuses a traced graph. The backward pass
recomputes the mask from the key in the backward kernel: nothing but the key is kept
(docs/design.md, "Semantics").
"""

from __future__ import annotations

import tensorflow as tf

from ._load import MODULE

ATTRS = ("axis", "training", "batch_mode", "training_scaling")


def residual_op(shortcut, residual, key, p, cfg):
    return MODULE.stochdepth_residual(shortcut, residual, key, p, **dict(zip(ATTRS, cfg)))


def scale_op(x, key, p, cfg):
    return MODULE.stochdepth_scale(x, key, p, **dict(zip(ATTRS, cfg)))


def _cfg(op):
    return tuple(op.get_attr(name) for name in ATTRS)


@tf.RegisterGradient("StochdepthResidual")
def _residual_grad(op, g):
    # d/d shortcut is the identity; d/d residual is keep * s * g, by the same kernel.
    key, p = op.inputs[2], op.inputs[3]
    return [g, scale_op(g, key, p, _cfg(op)), None, None]


@tf.RegisterGradient("StochdepthScale")
def _scale_grad(op, g):
    key, p = op.inputs[1], op.inputs[2]
    return [scale_op(g, key, p, _cfg(op)), None, None]
