"""Activation checkpointing and seeded modules: a recomputed forward draws the mask of the forward
it replays (docs/design.md, "Activation checkpointing").

`torch.utils.checkpoint` runs a segment's forward twice: once without keeping activations, and
again during backward to rebuild them. An unseeded module draws its words from torch's generator,
whose state checkpoint restores before the recompute, so the recompute draws the same words. A
seeded module's words come from its own offset, which checkpoint knows nothing about: without
this file the recompute would take the next offset, and backward would use a different mask from
the forward that produced the loss (wrong gradients, no error).

So each seeded call made inside a checkpointed forward records the words it used on that
checkpoint's own object (the reentrant form's autograd context, the non-reentrant form's frame),
and a call made while that checkpoint recomputes takes them back, in call order, without
advancing the offset. The record lives and dies with the checkpoint: nothing accumulates.

Which checkpoint a call belongs to is read from the Python stack, and only when a checkpoint can
be involved at all (grad disabled, saved-tensor hooks set, or a backward running): an ordinary
training call pays three flag reads.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Optional

import torch
from torch.utils import checkpoint as _cp

from . import _mode

_FILE = _cp.__file__
# The frames that identify a checkpoint, by function name inside torch/utils/checkpoint.py:
#   reentrant form: CheckpointFunction.forward(ctx, ...) runs the first pass, .backward(ctx, ...)
#     the recompute; `ctx` is the same object in both.
#   non-reentrant form: checkpoint(...) runs the first pass with the frame in its generator
#     `gen`; unpack_hook(holder) runs the recompute, with `frame` and the backward's `gid`.
_FIRST_PASS_REENTRANT = "forward"
_RECOMPUTE_REENTRANT = "backward"
_FIRST_PASS_NON_REENTRANT = "checkpoint"
_RECOMPUTE_NON_REENTRANT = "unpack_hook"

_DRAWS = "_stochdepth_draws"    # {module: [words of each call, in call order]}
_CURSOR = "_stochdepth_cursor"  # {(module, run): calls replayed so far}


def _holder(frame) -> tuple[Optional[Any], Any, bool]:
    """(holder, run, recomputing) when `frame` is one of a checkpoint's frames, else
    (None, None, False)."""
    code = frame.f_code
    if code.co_filename != _FILE:
        return None, None, False
    name, local = code.co_name, frame.f_locals
    if name == _FIRST_PASS_REENTRANT and "ctx" in local and "run_function" in local:
        return local["ctx"], None, False
    if name == _RECOMPUTE_REENTRANT and "ctx" in local:
        return local["ctx"], 0, True
    if name == _FIRST_PASS_NON_REENTRANT and "gen" in local:
        gen = local["gen"]
        holder = gen.gi_frame.f_locals.get("new_frame") if gen.gi_frame is not None else None
        return holder, None, False
    if name == _RECOMPUTE_NON_REENTRANT and "frame" in local:
        return local["frame"], local.get("gid"), True
    return None, None, False


def _checkpoints() -> tuple[list, Optional[tuple[Any, Any]]]:
    """The first passes around this call, innermost first, up to the innermost recompute; and
    that recompute as (holder, run), or None. A first pass inside a recompute (a checkpoint nested
    in a recomputed one) replays too: the outer checkpoint's first pass recorded the call."""
    first_passes = []
    f = sys._getframe(1)
    while f is not None:
        holder, run, recomputing = _holder(f)
        if holder is not None:
            if recomputing:
                return first_passes, (holder, run)
            first_passes.append(holder)
        f = f.f_back
    return first_passes, None


def _calls(holder, module) -> list:
    draws = getattr(holder, _DRAWS, None)
    if draws is None:
        draws = {}
        setattr(holder, _DRAWS, draws)
    return draws.setdefault(module, [])


def seeded_words(module, draw: Callable[[], Any]) -> Any:
    """The words of a seeded module's training call: `draw()` (which advances the module's
    offset), kept on the checkpoint when the call runs in a checkpointed forward; or, when the
    call recomputes such a forward, the words its call there used, and no draw."""
    if not _mode.maybe_checkpointed():
        return draw()
    first_passes, recompute = _checkpoints()
    if recompute is None:
        if not first_passes and _mode.in_backward() and torch.is_grad_enabled():
            warnings.warn(
                f"{type(module).__name__}(seed={module.seed}) ran a training forward inside a "
                "backward pass, outside torch.utils.checkpoint: if this recomputes an earlier "
                "forward, its mask is not that forward's (docs/design.md, \"Activation "
                "checkpointing\")", RuntimeWarning, stacklevel=4)
        words = draw()
    else:
        holder, run = recompute
        calls = _calls(holder, module)
        cursor = getattr(holder, _CURSOR, None)
        if cursor is None:
            cursor = {}
            setattr(holder, _CURSOR, cursor)
        i = cursor.get((module, run), 0)
        if i >= len(calls):
            raise RuntimeError(
                f"{type(module).__name__}(seed={module.seed}) is called {i + 1} time(s) in the "
                f"recompute of a checkpointed forward that called it {len(calls)} time(s): the "
                "recompute must make the same calls as the forward it replays (docs/design.md, "
                "\"Activation checkpointing\")")
        cursor[(module, run)] = i + 1
        words = calls[i]
    for holder in first_passes:
        _calls(holder, module).append(words)
    return words
