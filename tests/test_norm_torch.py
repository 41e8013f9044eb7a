"""stochdepth.torch.stochastic_depth_norm and StochasticDepthNorm (docs/design.md, "Fused residual
and norm"): the reference's bits forward and backward, opcheck, gradcheck in float64,
torch.compile(fullgraph=True), the module's parameters and seeded offsets, and errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stochdepth.torch import StochasticDepthNorm, stochastic_depth_norm  # noqa: E402
from stochdepth.torch.norm import norm_bwd, norm_fwd  # noqa: E402

import stochdepth  # noqa: E402
from stochdepth import reference  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _np(t):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.detach().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().numpy()


def _bits_equal(a, b):
    a = np.atleast_1d(_np(a) if isinstance(a, torch.Tensor) else a)
    b = np.atleast_1d(_np(b) if isinstance(b, torch.Tensor) else b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def _inputs(dtype, shape=(6, 3, 17), gamma=True, rms=False, grad=False):
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[-1]

    def rnd(*s, scale=1.0, add=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale + add).to(dtype) \
            .requires_grad_(grad)

    sc, res = rnd(*shape), rnd(*shape)
    w = rnd(c, scale=0.2, add=1.0)
    b = None if rms else rnd(c, scale=0.1)
    gm = rnd(c, scale=0.2, add=1.0) if gamma else None
    return sc, res, w, b, gm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("gamma", [False, True])
def test_forward_backward_match_reference(dtype, norm, gamma):
    sc, res, w, b, gm = _inputs(dtype, gamma=gamma, rms=norm == "rms", grad=True)
    kw = dict(norm=norm, eps=1e-5, gamma=gm, seed=21, offset=4, scaling="training")
    y, n = stochastic_depth_norm(sc, res, 0.5, w, b, **kw)
    npk = {k: (_np(v) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ey, en = reference.forward_norm(_np(sc), _np(res), 0.5, _np(w), None if b is None else _np(b),
                                    **npk)
    _bits_equal(y, ey)
    _bits_equal(n, en)
    gy, gn = torch.randn_like(y.float()).to(dtype), torch.randn_like(n.float()).to(dtype)
    params = [t for t in (sc, res, gm, w, b) if t is not None]
    grads = torch.autograd.grad((y, n), params, (gy, gn))
    want = reference.backward_norm(_np(gy), _np(gn), ey, _np(res), 0.5, _np(w),
                                   None if b is None else _np(b), **npk)
    want = [e for e in want if e is not None]
    for a, e in zip(grads, want):
        _bits_equal(a, e)


def test_mask_is_stochastic_depths():
    sc, res, w, b, _ = _inputs(torch.float32, gamma=False)
    y, _ = stochastic_depth_norm(sc, res, 0.5, w, b, seed=5, offset=2)
    keep = stochdepth.mask(6, 0.5, seed=5, offset=2)
    want = stochdepth.torch.stochastic_depth(sc, res, 0.5, seed=5, offset=2)
    _bits_equal(y, want)
    assert keep.any() and not keep.all()


def test_gradcheck_f64():
    for norm in ("layer", "rms"):
        sc, res, w, b, gm = _inputs(torch.float64, shape=(4, 2, 5), rms=norm == "rms", grad=True)
        args = [t for t in (sc, res, w, b, gm) if t is not None]

        def f(*ts, norm=norm, has_b=b is not None):
            it = iter(ts)
            s, r, w_ = next(it), next(it), next(it)
            b_ = next(it) if has_b else None
            g_ = next(it)
            return stochastic_depth_norm(s, r, 0.5, w_, b_, norm=norm, gamma=g_, seed=3,
                                         eps=1e-5)

        assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_opcheck():
    for dtype in (torch.float32, torch.float64):
        sc, res, w, b, gm = _inputs(dtype, grad=True)
        rng = torch.tensor([7, 1], dtype=torch.int64)
        args = (sc, res, gm, w, b, rng, 0.5, "layer", 1e-5, True, False, "training", -1)
        torch.library.opcheck(norm_fwd, args)
        y, n = norm_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        bargs = (torch.randn_like(y), torch.randn_like(n), y, res.detach(), gm.detach(),
                 w.detach(), True, rng, 0.5, "layer", 1e-5, True, False, "training", -1)
        torch.library.opcheck(norm_bwd, bargs)


# Inductor's first compile in a process imports torch.jit code that warns (torch 2.13).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    mod = StochasticDepthNorm(17, 0.5, layer_scale_init=0.1, seed=11)
    ref = StochasticDepthNorm(17, 0.5, layer_scale_init=0.1, seed=11)
    sc, res, *_ = _inputs(torch.float32, gamma=False)
    res.requires_grad_(True)
    compiled = torch.compile(mod, fullgraph=True, backend=backend)
    for _ in range(3):
        y1, n1 = compiled(sc, res)
        y2, n2 = ref(sc, res)
        _bits_equal(y1, y2)
        _bits_equal(n1, n2)
        g1 = torch.autograd.grad(n1.sum() + y1.sum(), [res, mod.weight, mod.gamma])
        g2 = torch.autograd.grad(n2.sum() + y2.sum(), [res, ref.weight, ref.gamma])
        for a, e in zip(g1, g2):
            _bits_equal(a, e)
    assert mod.offset == ref.offset == 3


def test_compile_fullgraph_function_grads():
    sc, res, w, b, gm = _inputs(torch.float32, grad=True)

    def f(sc, res, w, b, gm):
        y, n = stochastic_depth_norm(sc, res, 0.7, w, b, gamma=gm, seed=4, offset=9)
        return (y * 2).sum() + (n * n).sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(sc, res, w, b, gm)
    got = torch.autograd.grad(loss, (sc, res, w, b, gm))
    loss2 = f(sc, res, w, b, gm)
    want = torch.autograd.grad(loss2, (sc, res, w, b, gm))
    _bits_equal(loss.detach(), loss2.detach())
    for a, e in zip(got, want):
        _bits_equal(a, e)


def test_module_parameters_state_and_eval():
    m = StochasticDepthNorm(8, 0.5, norm="rms", seed=3)
    assert m.bias is None and m.gamma is None and torch.equal(m.weight, torch.ones(8))
    m2 = StochasticDepthNorm(8, 0.5, elementwise_affine=False, layer_scale_init=1e-2)
    assert m2.weight is None and m2.bias is None
    assert torch.allclose(m2.gamma, torch.full((8,), 1e-2))
    assert m2.state_dict().keys() == {"gamma"}
    x = torch.randn(4, 8)
    m(x, x)
    assert m.offset == 1 and "rng_state" in m.state_dict()
    m.eval()
    y, n = m(x, x)
    _bits_equal(y, x + 0.5 * x)  # inference, scaling="inference": shortcut + p * residual
    assert m.offset == 1
    assert "seed=3" in repr(m)


def test_module_casts_parameters_to_input_dtype():
    m = StochasticDepthNorm(8, 1.0, layer_scale_init=0.5, seed=1)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    y, n = m(x, x)
    assert y.dtype == n.dtype == torch.bfloat16
    n.float().sum().backward()
    assert m.weight.grad is not None and m.gamma.grad is not None and m.bias.grad is not None


def test_errors():
    sc, res, w, b, _ = _inputs(torch.float32, gamma=False)
    with pytest.raises(ValueError, match="norm must be 'layer' or 'rms', got 'batch'"):
        stochastic_depth_norm(sc, res, 0.5, w, b, norm="batch", seed=1)
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        stochastic_depth_norm(sc, res, 0.5, w, b, eps=0.0, seed=1)
    with pytest.raises(ValueError, match=r"gamma must have shape \(17,\)"):
        stochastic_depth_norm(sc, res, 0.5, w, b, gamma=torch.ones(3), seed=1)
    with pytest.raises(TypeError, match="weight must have dtype torch.float32"):
        stochastic_depth_norm(sc, res, 0.5, w.double(), b, seed=1)
    with pytest.raises(ValueError, match="bias must be None for norm='rms'"):
        stochastic_depth_norm(sc, res, 0.5, w, b, norm="rms", seed=1)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        StochasticDepthNorm(0, 0.5)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("seed", [7, None], ids=["seeded", "unseeded"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_module_checkpointed_equals_plain(norm, use_reentrant, seed):
    # Activation checkpointing recomputes the forward in backward: the recompute must draw the
    # mask of the forward it replays (docs/design.md, "Activation checkpointing"), so every
    # gradient equals the plain run's, step after step.
    import torch.utils.checkpoint as cp

    def train(checkpointed):
        torch.manual_seed(0)
        mods = torch.nn.ModuleList(
            StochasticDepthNorm(8, 0.5, norm=norm, layer_scale_init=0.5,
                                seed=None if seed is None else seed + i) for i in range(2))
        for m in mods:  # parameters that are not all ones and zeros
            with torch.no_grad():
                for p in m.parameters():
                    p.uniform_(0.5, 1.5)
        grads = []
        for _ in range(2):
            x = torch.randn(16, 3, 8, requires_grad=True)
            r = torch.randn(16, 3, 8, requires_grad=True)
            mods.zero_grad()
            h, loss = x, 0
            for m in mods:
                y, n = (cp.checkpoint(m, h, r, use_reentrant=use_reentrant) if checkpointed
                        else m(h, r))
                loss = loss + n.square().sum()
                h = y
            (loss + h.sum()).backward()
            grads.append([x.grad, r.grad] + [p.grad for p in mods.parameters()])
        return grads

    plain, checkpointed = train(False), train(True)
    for a, b in zip(plain, checkpointed):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb)
    if seed is not None:  # the masks drop some samples and keep others: a replayed mask matters
        for i in range(2):
            for step in range(2):
                keep = stochdepth.mask(16, 0.5, seed=seed + i, offset=step)
                assert 0 < keep.sum() < 16
