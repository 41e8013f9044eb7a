"""The fused norm's refusals (docs/design.md, "Fused residual and norm" and "Errors"): the
exception type and a message naming the argument, what was expected and what arrived."""

from __future__ import annotations

import numpy as np
import pytest

import stochdepth

X = np.zeros((4, 3, 8), np.float32)
W = np.ones(8, np.float32)


def fwd(**kw):
    args = dict(shortcut=X, residual=X, survival_prob=0.5, weight=W, bias=W)
    args.update(kw)
    opts = {k: args.pop(k) for k in list(args) if k not in
            ("shortcut", "residual", "survival_prob", "weight", "bias")}
    opts.setdefault("seed", 1)
    return stochdepth.forward_norm(args["shortcut"], args["residual"], args["survival_prob"],
                                   args["weight"], args["bias"], **opts)


def bwd(**kw):
    args = dict(grad_y=X, grad_n=X, y=X, residual=X, weight=W, bias=W)
    args.update(kw)
    opts = {k: args.pop(k) for k in list(args) if k not in
            ("grad_y", "grad_n", "y", "residual", "weight", "bias")}
    opts.setdefault("seed", 1)
    return stochdepth.backward_norm(args["grad_y"], args["grad_n"], args["y"], args["residual"],
                                    0.5, args["weight"], args["bias"], **opts)


@pytest.mark.parametrize("call", [fwd, bwd])
def test_norm_kind(call):
    with pytest.raises(ValueError, match=r"norm must be 'layer' or 'rms', got 'batch'"):
        call(norm="batch")
    with pytest.raises(TypeError, match=r"norm must be 'layer' or 'rms', got int"):
        call(norm=1)
    with pytest.raises(ValueError, match=r"bias must be None for norm='rms'"):
        call(norm="rms")


@pytest.mark.parametrize("call", [fwd, bwd])
@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf"), 10**400])
def test_eps_value(call, eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number, got"):
        call(eps=eps)


@pytest.mark.parametrize("call", [fwd, bwd])
@pytest.mark.parametrize("eps", ["1e-6", None, True, 1j])
def test_eps_type(call, eps):
    with pytest.raises(TypeError, match="eps must be a positive real number, got"):
        call(eps=eps)


@pytest.mark.parametrize("call", [fwd, bwd])
@pytest.mark.parametrize("name", ["gamma", "weight", "bias"])
def test_vector_shape_and_dtype(call, name):
    like = "shortcut" if call is fwd else "y"
    with pytest.raises(ValueError, match=rf"{name} must have shape \(8,\) \(the last axis of "
                       rf"{like}\), got \(7,\)"):
        call(**{name: np.ones(7, np.float32)})
    with pytest.raises(ValueError, match=rf"{name} must have shape \(8,\)"):
        call(**{name: np.ones((1, 8), np.float32)})
    with pytest.raises(TypeError, match=rf"{name} must have dtype float32 like {like}, got "
                       "float64"):
        call(**{name: np.ones(8, np.float64)})


def test_forward_inputs():
    with pytest.raises(TypeError, match="shortcut and residual must have the same dtype, got "
                       "float32 and float64"):
        fwd(residual=X.astype(np.float64))
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 3, 8\) like shortcut, "
                       r"got \(4, 3, 7\)"):
        fwd(residual=X[..., :7].copy())
    with pytest.raises(ValueError, match="shortcut must have rank >= 2"):
        fwd(shortcut=W, residual=W)
    with pytest.raises(ValueError, match="residual must be C-contiguous"):
        fwd(residual=np.zeros((4, 3, 16), np.float32)[..., ::2])
    with pytest.raises(ValueError, match=r"survival_prob must be in \[0, 1\]"):
        fwd(survival_prob=1.5)
    with pytest.raises(TypeError, match="seed"):
        fwd(seed=None)
    with pytest.raises(ValueError, match="mode must be 'row' or 'batch'"):
        fwd(mode="col")
    with pytest.raises(TypeError, match="integer, bool or complex|dtype"):
        fwd(shortcut=X.astype(np.int32), residual=X.astype(np.int32))


@pytest.mark.parametrize("name", ["grad_y", "grad_n"])
def test_backward_grads(name):
    with pytest.raises(ValueError, match=rf"{name} must have shape \(4, 3, 8\) like y, got "
                       r"\(4, 3, 7\)"):
        bwd(**{name: X[..., :7].copy()})
    with pytest.raises(TypeError, match=rf"{name} must have dtype float32 like y, got float16"):
        bwd(**{name: X.astype(np.float16)})


def test_backward_residual_only_with_gamma():
    # without gamma the residual is not read: None is fine
    bwd(residual=None)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 3, 8\) like y"):
        bwd(residual=X[:2].copy(), gamma=W)
    with pytest.raises(TypeError, match="residual"):
        bwd(residual=None, gamma=W)


def test_inference_needs_no_seed():
    y, n = stochdepth.forward_norm(X, X, 0.5, W, W, training=False)
    assert y.shape == n.shape == X.shape
