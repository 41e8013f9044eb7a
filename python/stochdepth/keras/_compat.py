"""Loading `.keras` files saved with kerasfactory's StochasticDepth: each such layer comes back
as `stochdepth.keras.StochasticDepth`.

    keras.saving.load_model(path, custom_objects=stochdepth.keras.KERASFACTORY_CUSTOM_OBJECTS)

is enough where kerasfactory is not imported. Where it is, Keras lets its global registration win
over `custom_objects`; use `load_kerasfactory_model(path)` (or `with kerasfactory_compat():
keras.saving.load_model(path)`) there.
"""

from __future__ import annotations

import contextlib

import keras

from .layer import StochasticDepth

# Maps the name under which kerasfactory registers its layer to ours, so that a `.keras` file
# saved with `kerasfactory.layers.StochasticDepth` loads with this layer.
_KERASFACTORY_NAME = "kerasfactory.layers>StochasticDepth"
KERASFACTORY_CUSTOM_OBJECTS = {_KERASFACTORY_NAME: StochasticDepth}


@contextlib.contextmanager
def kerasfactory_compat():
    """Within the block, kerasfactory's registered layer name resolves to our layer.

    `load_model(path, custom_objects=KERASFACTORY_CUSTOM_OBJECTS)` is enough where kerasfactory
    is not imported. Where it is, its own registration wins: Keras merges the global registry
    over `custom_objects` (and over `custom_object_scope`) when it deserializes a model's
    layers. This block therefore points the global entry at our layer and restores it on exit
    (not thread-safe, like any change to Keras's global registry)."""
    registry = keras.saving.get_custom_objects()
    missing = object()
    old = registry.get(_KERASFACTORY_NAME, missing)
    registry[_KERASFACTORY_NAME] = StochasticDepth
    try:
        yield
    finally:
        if old is missing:
            registry.pop(_KERASFACTORY_NAME, None)
        else:
            registry[_KERASFACTORY_NAME] = old


def load_kerasfactory_model(filepath, **kwargs):
    """`keras.saving.load_model` for a model saved with kerasfactory's StochasticDepth: every such
    layer comes back as `stochdepth.keras.StochasticDepth`, kerasfactory imported or not."""
    custom_objects = {**KERASFACTORY_CUSTOM_OBJECTS, **(kwargs.pop("custom_objects", None) or {})}
    with kerasfactory_compat():
        return keras.saving.load_model(filepath, custom_objects=custom_objects, **kwargs)
