"""The one predicate that picks the PyTorch adapter's eager fast path over its custom ops.

Every choice between the two paths in `stochdepth.torch` goes through `eager()`, and it holds the
adapter's only uses of private torch APIs (docs/design.md, "Randomness in the adapters").
"""

from __future__ import annotations

import torch


def eager(*tensors) -> bool:
    """True when the eager fast path may run: nothing traces or watches the dispatcher, and each
    given tensor (None entries are skipped) is a plain CPU or CUDA `torch.Tensor` whose values
    can be read now.

    False under torch.compile, make_fx, torch.export, any TorchDispatchMode or TorchFunctionMode
    (FakeTensorMode, opcheck's modes, `with torch.device(...)`), the JIT tracer, functorch
    transforms and functionalization, for tensor subclasses and for meta or other devices: there
    the registered custom ops run, so that tracers see `stochdepth::...` nodes.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or not (t.is_cpu or t.is_cuda):
            return False
        if wrapped(t) or torch._is_functional_tensor(t):
            return False
    return True
