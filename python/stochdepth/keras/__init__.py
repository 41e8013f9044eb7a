"""Keras 3 adapter: `StochasticDepth`, a drop-in for `kerasfactory.layers.StochasticDepth`.

    from stochdepth.keras import StochasticDepth      # was: from kerasfactory.layers import ...
    y = StochasticDepth(survival_prob=0.8)([shortcut, residual], training=True)

kerasfactory's constructor, call, errors and config, with its bugs fixed, plus keyword-only
options `mode` ("row" or "batch"), `scaling` ("inference" or "training") and `axis` (see
`layer`). The mask is the library's stream on every backend (docs/design.md, "The mask stream";
"Randomness in the adapters" says how the layer keeps its seed and step). Models saved with
kerasfactory's layer load with `load_kerasfactory_model` (see `_compat`).

Modules: `layer` (the layer), `_philox` (the mask in `keras.ops` integer ops, used by the layer
on backends without the kernels: TensorFlow), `_compat` (kerasfactory loading helpers).
Importing this package never imports torch: the torch backend's path imports `stochdepth.torch`
on first use.
"""

from __future__ import annotations

from ._compat import KERASFACTORY_CUSTOM_OBJECTS, kerasfactory_compat, load_kerasfactory_model
from ._philox import keep_mask
from .layer import StochasticDepth
from .norm import StochasticDepthNorm  # the fused residual + norm (norm.py)
from .residual import StochasticResidual

# Saved `.keras` files record the class's module: keep naming the public one, as they did before
# the adapter became a package (either name loads, this keeps the files unchanged).
StochasticDepth.__module__ = __name__

__all__ = [
    "StochasticDepth",
    "StochasticDepthNorm",
    "StochasticResidual",
    "KERASFACTORY_CUSTOM_OBJECTS",
    "kerasfactory_compat",
    "load_kerasfactory_model",
    "keep_mask",
]
