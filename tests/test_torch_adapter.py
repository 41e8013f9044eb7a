"""stochdepth.torch: the custom ops, autograd, torch.compile, the drop-in modules and their RNG.

Every numeric check is exact: the adapter must give what `stochdepth.reference` gives, and the
drop-in modules what timm's and torchvision's formulas give for the same mask (the formulas are
written here from the libraries' documented behaviour; nothing is downloaded).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.torch import _kernels, _mode, _rng  # noqa: E402

import stochdepth  # noqa: E402
from stochdepth import reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


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


# ---- import hygiene ---------------------------------------------------------------------------


def test_import_stochdepth_does_not_import_torch():
    code = "import sys, stochdepth; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=120)


# ---- numerics vs the reference ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", ["inference", "training"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_forward_backward_match_reference(dtype, scaling, mode):
    shape, p, seed, offset = (9, 5, 7), 0.6, 2**64 - 3, 2**40 + 5
    sc, res = randn(shape, dtype, 1), randn(shape, dtype, 2)
    out = sdt.stochastic_depth(sc, res, p, mode=mode, scaling=scaling, seed=seed, offset=offset)
    exp = ref.forward(to_numpy(sc), to_numpy(res), p, seed=seed, offset=offset, mode=mode,
                      scaling=scaling)
    assert_same(out, exp)

    sc_, res_ = sc.clone().requires_grad_(), res.clone().requires_grad_()
    out = sdt.stochastic_depth(sc_, res_, p, mode=mode, scaling=scaling, seed=seed, offset=offset)
    grad = randn(shape, dtype, 3)
    out.backward(grad)
    _, g_res = ref.backward(to_numpy(grad), p, seed=seed, offset=offset, mode=mode,
                            scaling=scaling)
    assert_same(res_.grad, g_res)
    assert_same(sc_.grad, grad)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("training", [True, False])
def test_axis_single_input_and_inference(axis, training):
    shape, p = (4, 6, 3), 0.5
    res = randn(shape, torch.float32, 4)
    for sc in (None, randn(shape, torch.float32, 5)):
        out = sdt.stochastic_depth(sc, res, p, training, axis=axis, seed=11, offset=2)
        exp = ref.forward(None if sc is None else sc.numpy(), res.numpy(), p, training=training,
                          seed=11, offset=2, axis=axis)
        assert_same(out, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_cpu_tensors_use_library_buffers_exactly(dtype):
    # >= 4 MiB: outputs come from the library's recycled buffers through DLPack.
    shape = (64, 3, 8192 if dtype == torch.float32 else 16384)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    assert nbytes >= _kernels.LIB_ALLOC_BYTES
    sc = randn(shape, dtype, 1).requires_grad_()
    res = randn(shape, dtype, 2).requires_grad_()
    out = sdt.stochastic_depth(sc, res, 0.7, seed=5, offset=9, scaling="training", axis=1)
    exp = ref.forward(to_numpy(sc), to_numpy(res), 0.7, seed=5, offset=9, scaling="training",
                      axis=1)
    assert_same(out, exp)
    grad = randn(shape, dtype, 3)
    out.backward(grad)
    assert_same(res.grad, ref.backward(to_numpy(grad), 0.7, seed=5, offset=9,
                                       scaling="training", axis=1)[1])
    assert_same(sc.grad, grad)
    single = sdt.drop_path(res.detach(), 0.4, True, seed=3)
    assert_same(single, ref.forward(None, to_numpy(res), 0.6, seed=3, scaling="training"))
    assert_same(sdt.stochastic_depth(sc.detach(), res.detach(), 0.7, False),
                ref.forward(to_numpy(sc), to_numpy(res), 0.7, training=False))


def test_op_path_equals_eager_fast_path():
    # The public functions skip the dispatcher for plain eager tensors; the registered op must
    # give the same bits, forward and backward.
    sc, res = randn((6, 5)), randn((6, 5), seed=1)
    rng = torch.tensor([123, 4], dtype=torch.int64)
    a = sdt.drop_path_fwd(sc, res, rng, 0.5, True, False, 0, "training", -1)
    b = sdt.stochastic_depth(sc, res, 0.5, seed=123, offset=4, scaling="training")
    assert_same(a, b)
    g = randn((6, 5), seed=2)
    assert_same(sdt.drop_path_bwd(g, rng, 0.5, True, False, 0, "training", -1),
                ref.backward(g.numpy(), 0.5, seed=123, offset=4, scaling="training")[1])


def test_traced_graphs_contain_the_registered_ops():
    # The eager shortcut is only for plain eager tensors; anything that watches the dispatcher
    # sees stochdepth::drop_path_fwd / drop_path_bwd.
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    x = randn((4, 3))
    assert _mode.eager(x)
    gm = make_fx(lambda t: sdt.drop_path(t, 0.5, True, seed=1))(x)
    assert "stochdepth.drop_path_fwd" in gm.code

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    xg = x.clone().requires_grad_()
    with Record() as rec:
        sdt.stochastic_depth(x, xg, 0.5, seed=2).sum().backward()
    assert any("stochdepth.drop_path_fwd" in o for o in rec.ops)
    assert any("stochdepth.drop_path_bwd" in o for o in rec.ops)
    assert_same(xg.grad, ref.backward(np.ones((4, 3), np.float32), 0.5, seed=2)[1])


def test_p_zero_and_one_exact():
    sc, res = randn((16, 8)), randn((16, 8), seed=1)
    # p = 1: everything kept; s = 1 in both conventions.
    for scaling in ("inference", "training"):
        assert_same(sdt.stochastic_depth(sc, res, 1.0, scaling=scaling, seed=1), sc + res)
    # p = 0: nothing kept, the shortcut bit for bit, zeros in the single-input form.
    assert_same(sdt.stochastic_depth(sc, res, 0.0, scaling="training", seed=1), sc)
    assert_same(sdt.drop_path(res, 1.0, True), torch.zeros_like(res))
    assert_same(sdt.torchvision_stochastic_depth(res, 1.0, "row"), torch.zeros_like(res))
    # Inference with p = 0 under the paper's convention: shortcut + 0 * residual.
    assert_same(sdt.stochastic_depth(sc, res, 0.0, False), sc + 0.0 * res)


def test_keep_rate_binomial():
    n, p = 40_000, 0.8
    x = torch.ones(n, 1)
    kept = sdt.drop_path(x, 1 - p, True, scale_by_keep=False, seed=99).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * p) < 5 * sigma  # two-sided, false alarm ~ 6e-7
    # and the mask is the library's own: the same count as stochdepth.mask
    assert kept == int(stochdepth.mask(n, p, seed=99).sum())


def test_dropped_residual_nan_does_not_reach_output():
    sc, res = randn((32, 4)), randn((32, 4), seed=1)
    keep = stochdepth.mask(32, 0.5, seed=5)
    assert 0 < keep.sum() < 32
    res[torch.from_numpy(~keep)] = float("nan")
    out = sdt.stochastic_depth(sc, res, 0.5, seed=5, scaling="training")
    assert not torch.isnan(out).any()
    assert_same(out[torch.from_numpy(~keep)], sc[torch.from_numpy(~keep)])


def test_empty_and_non_contiguous():
    e = torch.empty(0, 3)
    assert sdt.stochastic_depth(e, e, 0.5, seed=1).shape == (0, 3)
    assert sdt.drop_path(torch.empty(4, 0), 0.5, True, seed=1).shape == (4, 0)

    base_sc, base_res = randn((6, 10)), randn((6, 10), seed=1)
    sc, res = base_sc[:, ::2], base_res.t().contiguous().t()[:, :5]  # strided views
    assert not sc.is_contiguous() and not res.is_contiguous()
    out = sdt.stochastic_depth(sc, res, 0.5, seed=3, scaling="training")
    assert out.is_contiguous()
    assert_same(out, sdt.stochastic_depth(sc.contiguous(), res.contiguous(), 0.5, seed=3,
                                          scaling="training"))
    # channels_last: same values, contiguous result
    x = randn((4, 3, 2, 2)).to(memory_format=torch.channels_last)
    assert_same(sdt.drop_path(x, 0.5, True, seed=2), sdt.drop_path(x.contiguous(), 0.5, True,
                                                                   seed=2))


def test_errors():
    x = randn((4, 3))
    with pytest.raises(TypeError, match="residual"):
        sdt.stochastic_depth(x, torch.ones(4, 3, dtype=torch.int32), 0.5, seed=1)
    with pytest.raises(TypeError, match="x"):
        sdt.drop_path(torch.ones(4, dtype=torch.complex64), 0.5, True)
    with pytest.raises(ValueError, match="survival_prob"):
        sdt.stochastic_depth(x, x, 1.5, seed=1)
    with pytest.raises(ValueError, match="survival_prob"):
        sdt.stochastic_depth(x, x, float("nan"), seed=1)
    with pytest.raises(ValueError, match="shape"):
        sdt.stochastic_depth(x, randn((4, 4)), 0.5, seed=1)
    with pytest.raises(ValueError, match="mode"):
        sdt.stochastic_depth(x, x, 0.5, mode="col", seed=1)
    with pytest.raises(ValueError, match="scaling"):
        sdt.stochastic_depth(x, x, 0.5, scaling="both", seed=1)
    with pytest.raises(ValueError, match="axis"):
        sdt.stochastic_depth(x, x, 0.5, axis=2, seed=1)
    with pytest.raises(ValueError, match="seed"):
        sdt.stochastic_depth(x, x, 0.5, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        sdt.stochastic_depth(x, x, 0.5, seed=2**64)
    with pytest.raises(TypeError, match="seed"):
        sdt.stochastic_depth(x, x, 0.5, seed=1.0)
    with pytest.raises(ValueError, match="rank"):
        sdt.stochastic_depth(torch.tensor(1.0), torch.tensor(2.0), 0.5, seed=1)
    with pytest.raises(ValueError, match="drop probability"):
        sdt.torchvision_stochastic_depth(x, -0.1, "row")
    with pytest.raises(ValueError, match="mode"):
        sdt.torchvision_stochastic_depth(x, 0.1, "col")
    with pytest.raises(ValueError, match="drop_prob"):
        sdt.DropPath(2.0)


# ---- custom-op machinery ----------------------------------------------------------------------


def _op_samples(dtype=torch.float64):
    sc = randn((6, 4, 3), dtype, 1).requires_grad_()
    res = randn((6, 4, 3), dtype, 2).requires_grad_()
    rng = torch.tensor([-5, 7], dtype=torch.int64)  # seed 2**64 - 5
    return [
        (sc, res, rng, 0.5, True, False, 0, "training", -1),
        (sc, res, rng, 0.7, True, True, 1, "inference", -1),
        (None, res, rng, 0.5, True, False, -1, "training", 3),
        (sc, res, None, 0.3, False, False, 0, "inference", -1),
        (sc, res, None, 0.3, False, False, 0, "training", -1),
    ]


def test_opcheck():
    for args in _op_samples():
        torch.library.opcheck(sdt.drop_path_fwd, args)
    g = randn((6, 4, 3), torch.float64, 3).requires_grad_()
    rng = torch.tensor([3, 1], dtype=torch.int64)
    torch.library.opcheck(sdt.drop_path_bwd, (g, rng, 0.5, True, False, 0, "training", -1))
    torch.library.opcheck(sdt.drop_path_bwd, (g, None, 0.5, False, False, 0, "inference", -1))
    torch.library.opcheck(_rng.rng_snapshot, (rng,))


def test_gradcheck_float64():
    for sc, res, rng, *rest in _op_samples():
        if sc is None:
            def fn(r, rng=rng, rest=rest):
                return sdt.drop_path_fwd(None, r, rng, *rest)
            inputs = (res,)
        else:
            def fn(s, r, rng=rng, rest=rest):
                return sdt.drop_path_fwd(s, r, rng, *rest)
            inputs = (sc, res)
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)
    sc, res = _op_samples()[0][:2]
    assert torch.autograd.gradcheck(
        lambda s, r: sdt.stochastic_depth(s, r, 0.5, seed=9, scaling="training"), (sc, res))
    assert torch.autograd.gradgradcheck(
        lambda s, r: sdt.stochastic_depth(s, r, 0.5, seed=9, scaling="training"), (sc, res))


def test_backward_saves_no_tensor():
    sc = randn((8, 4)).requires_grad_()
    res = randn((8, 4), seed=1).requires_grad_()
    rng = torch.tensor([1, 2], dtype=torch.int64)
    cases = [
        lambda: sdt.stochastic_depth(sc, res, 0.5, seed=1),
        lambda: sdt.stochastic_depth(sc, res * 1.0, 0.5),  # unseeded draw
        lambda: sdt.drop_path(res, 0.3, True),
        lambda: sdt.DropPath(0.3, seed=4).train()(res),
        lambda: sdt.StochasticDepth(0.7, seed=4)(sc, res),
        lambda: sdt.TorchvisionStochasticDepth(0.2, "row")(res),
        lambda: sdt.drop_path_fwd(sc, res, rng, 0.5, True, False, 0, "training", -1),  # the op
    ]
    for fn in cases:
        n, out = count_saved(fn)
        assert n == 0, n
        out.sum().backward()  # and backward still works from the scalars alone


# inductor's own import of TorchScript helpers warns; pyproject turns warnings into errors.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_matches_eager():
    class Block(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.drop = sdt.DropPath(0.3, seed=seed)
            self.sd = sdt.StochasticDepth(0.6, scaling="training", seed=seed)

        def forward(self, x):
            y = x + self.drop(self.lin(x))
            return self.sd(y, torch.tanh(self.lin(y)))

    x = randn((16, 8))
    # Seeded modules with inductor (the default backend): masks, offsets and gradients agree.
    torch.manual_seed(0)
    eager = Block(seed=7)
    comp = copy.deepcopy(eager)
    fn = torch.compile(comp, fullgraph=True)
    for _ in range(3):
        out_e, out_c = eager(x), fn(x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
        out_e.square().sum().backward()
        out_c.square().sum().backward()
        torch.testing.assert_close(comp.lin.weight.grad, eager.lin.weight.grad, rtol=1e-4,
                                   atol=1e-4)  # a wrong mask is off by O(1)
    assert eager.drop.offset == comp.drop.offset == 3
    # Unseeded: the draw is traced too; aot_eager keeps torch's random stream, so equal.
    eager = Block(seed=None)
    fn = torch.compile(copy.deepcopy(eager), fullgraph=True, backend="aot_eager")
    for step in range(2):
        torch.manual_seed(step)
        out_e = eager(x)
        torch.manual_seed(step)
        assert_same(fn(x), out_e)
    # No graph break with the functional API either.
    explain = torch._dynamo.explain(
        lambda s, r: sdt.drop_path(r, 0.2, True, seed=3) + sdt.stochastic_depth(s, r, 0.5)
    )(x, x)
    assert explain.graph_break_count == 0
    assert explain.graph_count == 1


def test_torch_export():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.drop = sdt.DropPath(0.3, seed=5)
            self.sd = sdt.StochasticDepth(0.7, scaling="training")

        def forward(self, x):
            y = x + self.drop(self.lin(x))
            return self.sd(y, self.lin(y))

    x = randn((8, 4))
    for training in (False, True):
        net = Net().train(training)
        ep = torch.export.export(net, (x,))
        targets = [str(n.target) for n in ep.graph.nodes]
        assert targets.count("stochdepth.drop_path_fwd.default") == (2 if training else 1)
        if not training:
            assert_same(ep.module()(x), net(x))


def test_autocast_and_mixed_dtypes():
    sc32 = randn((8, 6))
    res16 = randn((8, 6), torch.bfloat16, 1)
    out = sdt.stochastic_depth(sc32, res16, 0.5, seed=2)
    assert out.dtype == torch.float32  # promoted like sc32 + res16
    assert_same(out, sdt.stochastic_depth(sc32, res16.float(), 0.5, seed=2))

    lin = torch.nn.Linear(6, 6)
    x = randn((8, 6)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        branch = lin(x)
        assert branch.dtype == torch.bfloat16
        out = sdt.stochastic_depth(x, branch, 0.5, seed=2, scaling="training")
        single = sdt.drop_path(branch, 0.5, True, seed=2)
    assert out.dtype == torch.float32 and single.dtype == torch.bfloat16
    assert_same(out, ref.forward(x.detach().numpy(), branch.detach().float().numpy(), 0.5,
                                 seed=2, scaling="training"))
    out.sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32


# ---- randomness -------------------------------------------------------------------------------


def test_unseeded_follows_torch_manual_seed():
    x = torch.ones(64, 2)
    torch.manual_seed(5)
    a = [sdt.drop_path(x, 0.5, True) for _ in range(3)]
    torch.manual_seed(5)
    b = [sdt.drop_path(x, 0.5, True) for _ in range(3)]
    for u, v in zip(a, b):
        assert_same(u, v)
    assert not torch.equal(a[0], a[1])  # a fresh draw per call
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert_same(sdt.drop_path(x, 0.5, True, generator=g1), sdt.drop_path(x, 0.5, True,
                                                                         generator=g2))


def _module_mask(m, batch):
    out = m(torch.ones(batch, 1)) if not isinstance(m, sdt.StochasticDepth) else m(
        torch.zeros(batch, 1), torch.ones(batch, 1))
    return (out[:, 0] != 0).numpy()


@pytest.mark.parametrize("kind", ["StochasticDepth", "DropPath", "TorchvisionStochasticDepth"])
def test_seeded_module_sequence_and_resume(kind, tmp_path):
    make = {
        "StochasticDepth": lambda: sdt.StochasticDepth(0.5, seed=2**63 + 9),
        "DropPath": lambda: sdt.DropPath(0.5, seed=2**63 + 9),
        "TorchvisionStochasticDepth": lambda: sdt.TorchvisionStochasticDepth(0.5, "row",
                                                                             seed=2**63 + 9),
    }[kind]
    m = make().train()
    for step in range(3):
        np.testing.assert_array_equal(_module_mask(m, 64),
                                      stochdepth.mask(64, 0.5, seed=2**63 + 9, offset=step))
    assert m.offset == 3
    m.eval()
    _module_mask(m, 8)
    assert m.offset == 3  # inference draws nothing
    sd = m.state_dict()
    assert list(sd) == ["rng_state"] and sd["rng_state"].tolist() == [2**63 + 9 - 2**64, 3]
    path = tmp_path / "ckpt.pt"
    torch.save(sd, path)
    resumed = make().train()
    resumed.load_state_dict(torch.load(path))
    assert resumed.offset == 3
    np.testing.assert_array_equal(_module_mask(resumed, 64), _module_mask(m.train(), 64))
    # the rng state stays on the host when the module moves
    assert m.to(torch.float64)._rng_state.device.type == "cpu"


# ---- drop-in proof ----------------------------------------------------------------------------
# The originals' formulas, written from timm's and torchvision's documented behaviour, with the
# Bernoulli noise replaced by the mask stochdepth draws, so that both sides use the same mask.


def timm_drop_path(x, drop_prob, training, scale_by_keep, keep):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = torch.from_numpy(keep).to(x.dtype).reshape(shape)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


def torchvision_stochastic_depth(input, p, mode, training, keep):
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.from_numpy(keep[: math.prod(size)]).to(input.dtype).reshape(size)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class ResidualNet(torch.nn.Module):
    """Three pre-norm residual MLP blocks, each branch through a drop-path module."""

    def __init__(self, make_drop, width=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for i in range(3):
            self.blocks.append(torch.nn.ModuleDict({
                "norm": torch.nn.LayerNorm(width),
                "fc1": torch.nn.Linear(width, 2 * width),
                "fc2": torch.nn.Linear(2 * width, width),
                "drop": make_drop(i),
            }))

    def forward(self, x):
        for b in self.blocks:
            x = x + b["drop"](b["fc2"](torch.nn.functional.gelu(b["fc1"](b["norm"](x)))))
        return x


class _FormulaDrop(torch.nn.Module):
    def __init__(self, formula, seed):
        super().__init__()
        self.formula, self.seed, self.calls = formula, seed, 0

    def forward(self, x):
        keep = stochdepth.mask(x.shape[0], self.survival, seed=self.seed, offset=self.calls,
                               mode=getattr(self, "mode", "row"))
        self.calls += 1
        return self.formula(x, keep)


def _compare_models(make_ours, make_formula, x):
    torch.manual_seed(0)
    ours = ResidualNet(make_ours)
    theirs = ResidualNet(make_formula)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for step in range(3):
        xo, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_o, out_t = ours(xo), theirs(xt)
        assert_same(out_o, out_t)
        grad = randn(out_o.shape, seed=10 + step)
        out_o.backward(grad)
        out_t.backward(grad)
        assert_same(xo.grad, xt.grad)
        for (_name, po), pt in zip(ours.named_parameters(), theirs.parameters()):
            assert_same(po.grad, pt.grad)
    return ours


@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_drop_in_for_timm_drop_path(scale_by_keep):
    drops = [0.1, 0.25, 0.5]
    x = randn((32, 16))

    def make_formula(i):
        d = _FormulaDrop(lambda t, keep: timm_drop_path(t, drops[i], True, scale_by_keep, keep),
                         seed=100 + i)
        d.survival = 1 - drops[i]
        return d

    ours = _compare_models(lambda i: sdt.DropPath(drops[i], scale_by_keep, seed=100 + i),
                           make_formula, x)
    # eval: identity, no scaling either way (timm returns x itself)
    ours.eval()
    assert ours.blocks[0]["drop"](x) is x
    assert sdt.drop_path(x, 0.3, False, scale_by_keep) is x


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_drop_in_for_torchvision_stochastic_depth(mode):
    ps = [0.1, 0.25, 0.5]
    x = randn((32, 16))

    def make_formula(i):
        d = _FormulaDrop(lambda t, keep: torchvision_stochastic_depth(t, ps[i], mode, True, keep),
                         seed=200 + i)
        d.survival, d.mode = 1 - ps[i], mode
        return d

    _compare_models(lambda i: sdt.TorchvisionStochasticDepth(ps[i], mode, seed=200 + i),
                    make_formula, x)
    assert sdt.torchvision_stochastic_depth(x, 0.3, mode, training=False) is x


def test_two_input_module_equals_add_of_drop_path():
    # StochasticDepth(1 - d, scaling="training")(x, f) == x + timm_drop_path(f) for one mask.
    x, f = randn((32, 16)), randn((32, 16), seed=1)
    keep = stochdepth.mask(32, 1 - 0.25, seed=5)
    m = sdt.StochasticDepth(1 - 0.25, scaling="training", seed=5)
    assert_same(m(x, f), x + timm_drop_path(f, 0.25, True, True, keep))


def test_module_reprs_and_state_dict():
    assert repr(sdt.DropPath(0.12345)) == "DropPath(drop_prob=0.123)"
    assert repr(sdt.DropPath()) == "DropPath(drop_prob=0.000)"
    assert repr(sdt.TorchvisionStochasticDepth(0.2, "row")) == (
        "TorchvisionStochasticDepth(p=0.2, mode=row)")
    assert "seed=3" in repr(sdt.DropPath(0.1, seed=3))
    assert "survival_prob=0.8" in repr(sdt.StochasticDepth(0.8))
    # timm and torchvision modules have no state; an unseeded drop-in neither, so checkpoints
    # load strictly in both directions
    for m in (sdt.DropPath(0.1), sdt.TorchvisionStochasticDepth(0.1, "row"),
              sdt.StochasticDepth(0.9)):
        assert m.state_dict() == {}
        m.load_state_dict({}, strict=True)
    m = sdt.DropPath(0.1, scale_by_keep=False)
    assert (m.drop_prob, m.scale_by_keep) == (0.1, False)
    tv = sdt.TorchvisionStochasticDepth(0.2, "batch")
    assert (tv.p, tv.mode) == (0.2, "batch")


def test_rank_seed_is_documented_mixing():
    def splitmix64(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
        return z ^ (z >> 31)

    for seed in (0, 1, 2**64 - 1):
        keys = [sdt.rank_seed(seed, r) for r in range(8)]
        assert len(set(keys)) == 8 and seed not in keys
        assert keys[3] == splitmix64((seed + 4 * 0x9E3779B97F4A7C15) % 2**64)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_on_current_stream(dtype):
    sc, res = randn((33, 7, 9), dtype, 1), randn((33, 7, 9), dtype, 2)
    expected = sdt.stochastic_depth(sc, res, 0.6, seed=77, offset=3, scaling="training")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        scd, resd = sc.cuda(), res.cuda()
        out = sdt.stochastic_depth(scd, resd, 0.6, seed=77, offset=3, scaling="training")
    side.synchronize()
    assert out.device.type == "cuda"
    assert_same(out.cpu(), expected)
    resd = res.cuda().requires_grad_()
    out = sdt.drop_path(resd, 0.4, True, seed=77)
    out.backward(torch.ones_like(out))
    assert_same(resd.grad.cpu(), sdt.drop_path(torch.ones_like(res), 0.4, True, seed=77))


@cuda
@pytest.mark.cuda
def test_cuda_compile_and_opcheck():
    x = randn((16, 8)).cuda()
    rng = torch.tensor([1, 2], dtype=torch.int64)
    torch.library.opcheck(sdt.drop_path_fwd, (x, x.clone().requires_grad_(), rng, 0.5, True,
                                              False, 0, "training", -1))
    fn = torch.compile(lambda a: sdt.drop_path(a, 0.3, True, seed=4) + 1, fullgraph=True)
    assert_same(fn(x).cpu(), sdt.drop_path(x.cpu(), 0.3, True, seed=4) + 1)
