"""The one predicate that picks the PyTorch adapter's eager fast path over its custom ops.

Every choice between the two paths in `stochdepth.torch` goes through `eager()`. This file holds
the adapter's only uses of private torch APIs (docs/design.md, "Randomness in the adapters"):
those of `eager()`, and the two predicates that activation checkpointing needs (`_replay.py`).
"""

from __future__ import annotations

import torch


def eager(*tensors, gamma=None) -> bool:
    """True when the eager fast path may run: nothing traces or watches the dispatcher, and each
    given tensor (None entries are skipped) is a plain CPU or CUDA `torch.Tensor` whose values
    can be read now.

    False under torch.compile, make_fx, torch.export, any TorchDispatchMode or TorchFunctionMode
    (FakeTensorMode, opcheck's modes, `with torch.device(...)`), the JIT tracer, functorch
    transforms and functionalization, for tensor subclasses and for meta or other devices: there
    the registered custom ops run, so that tracers see `stochdepth::...` nodes.

    `gamma`, the layer scale, may also be an `nn.Parameter` (a LayerScale's, which is one):
    a subclass that only disables `__torch_function__`, so the fast path reads it as a tensor.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    for t in tensors:
        if t is not None and not _plain(t, type(t) is torch.Tensor):
            return False
    return gamma is None or _plain(gamma, type(gamma) in (torch.Tensor, torch.nn.Parameter))


def _plain(t, plain_type: bool) -> bool:
    if not plain_type or not (t.is_cpu or t.is_cuda):
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not (wrapped(t) or torch._is_functional_tensor(t))


def in_backward() -> bool:
    """True while an autograd backward runs on this thread (the engine's graph task is set)."""
    return torch._C._current_graph_task_id() != -1


def maybe_checkpointed() -> bool:
    """False when no torch.utils.checkpoint can be around this call: grad enabled, no
    saved-tensor hooks set and no backward running (an ordinary training call; _replay.py)."""
    return (not torch.is_grad_enabled()
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
            or in_backward())
