"""Helpers shared by the PyTorch adapter's tests: exact (bitwise) comparison of tensors, seeded
inputs, and a count of the tensors autograd saves. Imported only by tests that need torch."""

from __future__ import annotations

import numpy as np
import torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def to_numpy(t):
    """Exact NumPy copy of a CPU tensor (bfloat16 through ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same(actual, expected):
    """Bitwise equality (NaN == NaN), for a tensor against a tensor or a NumPy array."""
    a = to_numpy(actual)
    e = to_numpy(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(a.view(np.uint8), e.view(np.uint8))


def randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def count_saved(fn):
    """Number of tensors autograd saves (pack hook calls) while running fn()."""
    packs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        out = fn()
    return len(packs), out


def saved_tensors(fn):
    """The tensors autograd saves (pack hook calls) while running fn(), and fn()'s result."""
    packs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packs.append(t) or t, lambda t: t):
        out = fn()
    return packs, out
