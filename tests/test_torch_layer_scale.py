"""The PyTorch adapter's layer scale (docs/design.md, "Layer scale"): `stochastic_depth` and
`drop_path` with `gamma=`, their custom ops `drop_path_gamma_fwd`/`_bwd`, and
`LayerScaleDropPath`: exact against stochdepth.reference (the unfused `x + drop_path(gamma * r)`
pinned there), gradcheck, opcheck, torch.compile without a graph break, state_dict, activation
checkpointing, and every bad argument refused with the raw API's message."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.bench import _blocks as B  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import checkpoint as cp  # noqa: E402
from torch_util import DTYPES, assert_same, randn, to_numpy  # noqa: E402

from stochdepth import reference  # noqa: E402

pytestmark = pytest.mark.torch
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _inputs(dtype, shape=(8, 5, 12), seed=0):
    return (randn(shape, dtype, seed), randn(shape, dtype, seed + 1),
            randn(shape[-1:], dtype, seed + 2), randn(shape, dtype, seed + 3))


def _np(*ts):
    return [None if t is None else to_numpy(t) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [dict(scaling="training"), dict(mode="batch", axis=1),
                                dict(training=False, scaling="inference")])
@pytest.mark.parametrize("single", [False, True])
def test_forward_backward_equal_reference(dtype, kw, single):
    sc, res, gamma, g = _inputs(dtype)
    sc = None if single else sc.requires_grad_()
    res.requires_grad_()
    gamma.requires_grad_()
    out = sdt.stochastic_depth(sc, res, 0.6, seed=7, offset=2, gamma=gamma, **kw)
    ref_kw = dict(kw, seed=7, offset=2)
    n_sc, n_res, n_gamma, n_g = _np(sc, res, gamma, g)
    assert_same(out, reference.forward(n_sc, n_res, 0.6, gamma=n_gamma, **ref_kw))
    out.backward(g)
    _, want_res, want_gamma = reference.backward(n_g, 0.6, gamma=n_gamma, residual=n_res,
                                                 **ref_kw)
    assert_same(res.grad, want_res)
    assert_same(gamma.grad, want_gamma)
    if sc is not None:
        assert_same(sc.grad, g)


def test_unseeded_draws_from_torch_generator():
    sc, res, gamma, _ = _inputs(torch.float32)
    torch.manual_seed(5)
    a = sdt.stochastic_depth(sc, res, 0.5, gamma=gamma)
    torch.manual_seed(5)
    b = sdt.stochastic_depth(sc, res, 0.5, gamma=gamma)
    assert_same(a, b)
    # The same pair as the op without gamma draws: the same mask.
    torch.manual_seed(5)
    plain = sdt.stochastic_depth(sc, res * gamma, 0.5)
    assert_same(a, plain)


def test_drop_path_gamma():
    _, x, gamma, _ = _inputs(torch.float32)
    out = sdt.drop_path(x, 0.4, True, seed=3, gamma=gamma)
    want = reference.forward(None, to_numpy(x), 0.6, seed=3, scaling="training",
                             gamma=to_numpy(gamma))
    assert_same(out, want)
    # Where timm's drop_path returns x: gamma * x.
    scaled = to_numpy(x) * to_numpy(gamma)
    assert_same(sdt.drop_path(x, 0.4, False, gamma=gamma), scaled)
    assert_same(sdt.drop_path(x, 0.0, True, gamma=gamma), scaled)
    assert_same(sdt.drop_path(x, 0.4, True, False, seed=3, gamma=gamma),
                reference.forward(None, to_numpy(x), 0.6, seed=3, gamma=to_numpy(gamma)))


def test_gamma_none_is_the_plain_op():
    sc, res, _, _ = _inputs(torch.float32)
    assert_same(sdt.stochastic_depth(sc, res, 0.5, seed=1, gamma=None),
                sdt.stochastic_depth(sc, res, 0.5, seed=1))
    x = sc
    assert sdt.drop_path(x, 0.5, False, gamma=None) is x


def test_gradcheck_and_gradgradcheck_float64():
    sc, res, gamma, _ = (t.requires_grad_() for t in _inputs(torch.float64, (6, 3, 4)))
    for kw in (dict(scaling="training"), dict(training=False), dict(mode="batch")):
        def f(a, b, c, kw=kw):
            return sdt.stochastic_depth(a, b, 0.5, seed=2, gamma=c, **kw)
        assert torch.autograd.gradcheck(f, (sc, res, gamma))
        assert torch.autograd.gradgradcheck(f, (sc, res, gamma))
    assert torch.autograd.gradcheck(
        lambda b, c: sdt.drop_path(b, 0.5, True, seed=4, gamma=c), (res, gamma))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    sc, res, gamma, g = (t.requires_grad_() for t in _inputs(dtype, (6, 3, 4)))
    rng = torch.tensor([3, 1])
    for args in [(sc, res, gamma, rng, 0.5, True, False, 0, "training", -1),
                 (None, res, gamma, None, 0.5, False, False, 1, "inference", -1)]:
        torch.library.opcheck(torch.ops.stochdepth.drop_path_gamma_fwd, args)
    torch.library.opcheck(torch.ops.stochdepth.drop_path_gamma_bwd,
                          (g, res, gamma, rng, 0.5, True, True, 0, "training", 2))


@pytest.mark.timeout(300)
def test_compile_fullgraph_equals_eager():
    sc, res, gamma, g = _inputs(torch.float32)

    def f(a, b, c, seed):
        return sdt.stochastic_depth(a, b, 0.5, seed=seed, scaling="training", gamma=c)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):
        leaves = [t.clone().requires_grad_() for t in (sc, res, gamma)]
        eager_leaves = [t.clone().requires_grad_() for t in (sc, res, gamma)]
        out = compiled(*leaves, seed)
        want = f(*eager_leaves, seed)
        assert_same(out, want)
        out.backward(g)
        want.backward(g)
        for a, b in zip(leaves, eager_leaves):
            assert_same(a.grad, b.grad)


def test_compiled_graph_has_the_op():
    _, res, gamma, _ = _inputs(torch.float32)
    gm = torch.fx.experimental.proxy_tensor.make_fx(
        lambda b, c: sdt.drop_path(b, 0.5, True, seed=1, gamma=c))(res, gamma)
    assert "stochdepth.drop_path_gamma_fwd" in str(gm.code)


def test_errors():
    sc, res, gamma, _ = _inputs(torch.float32, (4, 6))
    with pytest.raises(TypeError, match="gamma must have dtype float32 like residual, got float64"):
        sdt.stochastic_depth(sc, res, 0.5, seed=1, gamma=gamma.double())
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\) \(the last axis of "
                                         r"residual\), got \(5,\)"):
        sdt.stochastic_depth(sc, res, 0.5, seed=1, gamma=gamma[:5])
    with pytest.raises(ValueError, match=r"gamma must have shape \(6,\).*got \(1, 6\)"):
        sdt.stochastic_depth(sc, res, 0.5, seed=1, gamma=gamma[None])
    with pytest.raises(ValueError, match="must not be the sample axis; got axis 1"):
        sdt.stochastic_depth(sc, res, 0.5, seed=1, axis=-1, gamma=gamma)
    with pytest.raises(TypeError, match="gamma must be a torch.Tensor or None, got ndarray"):
        sdt.stochastic_depth(sc, res, 0.5, seed=1, gamma=np.ones(6, np.float32))
    with pytest.raises(ValueError, match=r"gamma must be on the same device as x \(cpu\), got "
                                         r"meta"):
        sdt.drop_path(res, 0.5, True, seed=1, gamma=gamma.to("meta"))
    with pytest.raises(TypeError, match="gamma must have dtype float32 like x, got float16"):
        sdt.drop_path(res, 0.5, False, gamma=gamma.half())
    rng = torch.tensor([1, 0])
    g = torch.ones(4, 6)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 6\) like grad_out, got "
                                         r"\(4, 5\)"):
        torch.ops.stochdepth.drop_path_gamma_bwd(g, res[:, :5], gamma, rng, 0.5, True, False, 0,
                                                 "training", -1)
    with pytest.raises(TypeError, match="residual must have dtype float32 like grad_out, got "
                                        "float64"):
        torch.ops.stochdepth.drop_path_gamma_bwd(g, res.double(), gamma, rng, 0.5, True, False,
                                                 0, "training", -1)


# ---- LayerScaleDropPath -----------------------------------------------------------------------


def _unfused(x, r, gamma, p, seed, offset, training=True):
    """The unfused x + drop_path(gamma * r), by the reference."""
    n_x, n_r, n_gamma = _np(x, r, gamma)
    t = reference.forward(None, n_r, 1.0, training=False, scaling="training", gamma=n_gamma)
    if not training:
        return n_x + t
    return reference.forward(n_x, t, 1.0 - p, seed=seed, offset=offset, scaling="training")


@pytest.mark.parametrize("seed", [11, None], ids=["seeded", "unseeded"])
def test_module_equals_unfused(seed):
    m = sdt.LayerScaleDropPath(12, 0.5, 0.4, seed=seed)
    x, r, _, g = _inputs(torch.float32)
    with torch.no_grad():
        m.gamma.copy_(randn((12,), seed=9))
    x.requires_grad_()
    r.requires_grad_()
    for step in range(2):
        torch.manual_seed(step)
        pair = None
        if seed is None:
            pair = sdt._keys.draw(None)
            torch.manual_seed(step)
        out = m(x, r)
        if seed is None:
            s, o = sdt._keys.Rng.of(pair).seed, sdt._keys.Rng.of(pair).offset
        else:
            s, o = seed, step
        assert_same(out, _unfused(x, r, m.gamma, 0.4, s, o))
        m.zero_grad()
        r.grad = None
        out.backward(g)
        _, want_r, want_gamma = reference.backward(
            to_numpy(g), 0.6, seed=s, offset=o, scaling="training", gamma=to_numpy(m.gamma),
            residual=to_numpy(r))
        assert_same(r.grad, want_r)
        assert_same(m.gamma.grad, want_gamma)
    m.eval()
    assert_same(m(x, r), _unfused(x, r, m.gamma, 0.4, 0, 0, training=False))


class _Block(nn.Module):
    """timm's ViT block with its `ls1`/`drop_path1` pairs as LayerScaleDropPath."""

    def __init__(self, dim, heads, init_values, drop, seed=None):
        super().__init__()
        ref = B.Block(dim, heads, init_values=init_values, drop_path=drop)
        self.norm1, self.attn, self.norm2, self.mlp = ref.norm1, ref.attn, ref.norm2, ref.mlp
        self.ls1 = sdt.LayerScaleDropPath(dim, init_values, drop, seed=seed)
        self.ls2 = sdt.LayerScaleDropPath(dim, init_values, drop,
                                          seed=None if seed is None else seed + 1)

    def forward(self, x):
        x = self.ls1(x, self.attn(self.norm1(x)))
        return self.ls2(x, self.mlp(self.norm2(x)))


def test_module_loads_timm_state_dict():
    torch.manual_seed(0)
    timm_block = B.Block(16, 2, init_values=0.3, drop_path=0.2)
    with torch.no_grad():
        timm_block.ls1.gamma.uniform_()
    ours = _Block(16, 2, 1e-5, 0.2)
    ours.load_state_dict(timm_block.state_dict())  # strict: the same keys
    assert sorted(ours.state_dict()) == sorted(timm_block.state_dict())
    x = randn((3, 5, 16))
    timm_block.eval()
    ours.eval()
    assert_same(ours(x), timm_block(x))  # eval: x + gamma * branch, the same roundings
    seeded = _Block(16, 2, 1e-5, 0.2, seed=4)
    seeded.load_state_dict(timm_block.state_dict(), strict=False)  # without rng_state
    assert seeded.ls1.offset == 0 and "ls1.rng_state" in seeded.state_dict()


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("seed", [5, None], ids=["seeded", "unseeded"])
def test_module_checkpointed_equals_plain(use_reentrant, seed):
    def train(checkpointed):
        torch.manual_seed(0)
        blocks = nn.ModuleList(_Block(8, 2, 0.5, 0.5, seed=None if seed is None else seed + 2 * i)
                               for i in range(2))
        grads = []
        for _ in range(2):
            x = torch.randn(16, 3, 8, requires_grad=True)
            blocks.zero_grad()
            h = x
            for b in blocks:
                h = cp.checkpoint(b, h, use_reentrant=use_reentrant) if checkpointed else b(h)
            h.square().sum().backward()
            grads.append([x.grad] + [p.grad for p in blocks.parameters()])
        return grads

    for a, b in zip(train(False), train(True)):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb)


@pytest.mark.timeout(300)
def test_module_compiled_equals_eager():
    x, r, _, g = _inputs(torch.float32)
    eager = sdt.LayerScaleDropPath(12, 0.5, 0.4, seed=3)
    compiled_module = sdt.LayerScaleDropPath(12, 0.5, 0.4, seed=3)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        a = eager(x, r)
        b = compiled(x, r)
        assert_same(b, a)
    assert compiled_module.offset == eager.offset == 2


@cuda
@pytest.mark.cuda
def test_cuda_matches_cpu():
    sc, res, gamma, g = _inputs(torch.float32)
    leaves = [t.cuda().requires_grad_() for t in (sc, res, gamma)]
    out = sdt.stochastic_depth(*leaves[:2], 0.5, seed=3, scaling="training", gamma=leaves[2])
    assert_same(out.cpu(), sdt.stochastic_depth(sc, res, 0.5, seed=3, scaling="training",
                                                 gamma=gamma))
    out.backward(g.cuda())
    _, want_r, want_gamma = reference.backward(to_numpy(g), 0.5, seed=3, scaling="training",
                                               gamma=to_numpy(gamma), residual=to_numpy(res))
    assert_same(leaves[1].grad.cpu(), want_r)
    assert_same(leaves[2].grad.cpu(), want_gamma)
