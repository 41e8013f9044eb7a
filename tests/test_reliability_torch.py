"""Reliability of the PyTorch side (issue 10): lazy negation views are resolved before the
kernels read memory (item 7), a torch tensor the raw API cannot take is a TypeError naming the
argument, not torch's own error (item 8), and a float axis is refused by the modules (item 15).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from torch_util import assert_same, to_numpy  # noqa: E402

import stochdepth  # noqa: E402
from stochdepth import reference  # noqa: E402

# ---- item 7: lazy negation


def _neg_views():
    base = torch.arange(1.0, 25.0).reshape(6, 4)
    n = base._neg_view()
    assert n.is_neg() and n.data_ptr() == base.data_ptr()
    # A transposed negation view too (a non-contiguous one: .contiguous() resolves it there).
    nt = base.t().contiguous()._neg_view().t()
    return {"neg": n, "neg-transposed": nt}


@pytest.mark.parametrize("kind", ["neg", "neg-transposed"])
@pytest.mark.parametrize("training", [True, False])
def test_negation_views_are_resolved(kind, training):
    v = _neg_views()[kind]
    plain = v.resolve_neg().contiguous()
    want = reference.forward(to_numpy(plain), to_numpy(plain), 0.5, training=training, seed=7)
    out = sdt.stochastic_depth(v, v, 0.5, training, seed=7)
    assert_same(out, want)
    if training:  # timm's drop_path at inference returns its input itself
        assert_same(sdt.drop_path(v, 0.5, True, seed=7), sdt.drop_path(plain, 0.5, True, seed=7))


def test_negation_views_in_backward_and_modules():
    v = _neg_views()["neg"]
    plain = v.resolve_neg().contiguous()
    a = v.clone().requires_grad_()  # a leaf; the grad flowing back is a negation view
    out = sdt.stochastic_depth(None, a, 0.5, seed=7)
    g = torch.ones_like(out)._neg_view()
    out.backward(g)
    want = reference.backward(-np.ones((6, 4), np.float32), 0.5, seed=7)[1]
    assert_same(a.grad, want)
    m = sdt.StochasticDepth(0.5, seed=7)
    m2 = sdt.StochasticDepth(0.5, seed=7)
    assert_same(m(v, v), m2(plain, plain))


def test_conjugate_of_a_real_tensor_is_itself():
    # conj() of a real tensor sets no bit; the adapter's resolve is harmless there.
    x = torch.arange(1.0, 9.0).reshape(4, 2)
    assert_same(sdt.stochastic_depth(x.conj(), x, 0.5, seed=1),
                sdt.stochastic_depth(x, x, 0.5, seed=1))


# ---- item 8: torch tensors the raw API cannot take


def test_raw_api_names_the_argument_for_tensors_it_cannot_take():
    x = torch.ones(4, 3)
    with pytest.raises(TypeError, match="residual must be an array that DLPack can export.*"
                                        "(grad|gradient)"):
        stochdepth.forward(None, torch.ones(4, 3, requires_grad=True), 0.5, seed=1)
    with pytest.raises(TypeError, match="residual must be an array that DLPack can export"):
        stochdepth.forward(None, torch.ones(4, 3).to_sparse(), 0.5, seed=1)
    with pytest.raises(TypeError, match="residual must be an array that DLPack can export.*"
                                        "__dlpack_device__"):
        stochdepth.forward(None, torch.ones(4, 3, device="meta"), 0.5, seed=1)
    with pytest.raises(TypeError, match="shortcut must be an array that DLPack can export"):
        stochdepth.forward(torch.ones(4, 3, requires_grad=True), x, 0.5, seed=1)
    with pytest.raises(TypeError, match="grad_out must be an array that DLPack can export"):
        stochdepth.backward(torch.ones(4, 3, requires_grad=True), 0.5, seed=1)
    # The chained cause is torch's own error, for whoever needs the detail.
    try:
        stochdepth.forward(None, torch.ones(4, 3, requires_grad=True), 0.5, seed=1)
    except TypeError as e:
        assert e.__cause__ is not None
    # A negation view: torch exports its memory without the sign (np.from_dlpack reads it so);
    # the raw API refuses it rather than compute with the wrong sign.
    with pytest.raises(TypeError, match="residual is a lazy negation view"):
        stochdepth.forward(None, torch.ones(4, 3)._neg_view(), 0.5, seed=1)
    with pytest.raises(TypeError, match="out is a lazy negation view"):
        stochdepth.forward(x, x, 0.5, seed=1, out=torch.ones(4, 3)._neg_view())


# ---- item 15: float axis


@pytest.mark.parametrize("axis", [1.5, 1.0, "1", True])
def test_modules_refuse_a_non_integer_axis(axis):
    with pytest.raises(TypeError, match="axis must be an integer"):
        sdt.StochasticDepth(0.5, axis=axis)


def test_functional_refuses_a_non_integer_axis():
    x = torch.ones(4, 3)
    with pytest.raises(TypeError, match="axis must be an integer"):
        sdt.stochastic_depth(x, x, 0.5, axis=1.5, seed=1)
    assert sdt.StochasticDepth(0.5, axis=np.int64(1)).axis == 1
