"""stochdepth.torch: numerics against the reference, errors, the custom ops' machinery
(opcheck, gradcheck, saved tensors), torch.compile and torch.export, autocast, CUDA.

Every numeric check is exact: the adapter must give what `stochdepth.reference` gives. The
modules and their randomness are in test_torch_modules.py, the eager-or-op paths in
test_torch_paths.py.
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
from stochdepth.torch import _kernels, _seeded  # noqa: E402
from torch_util import DTYPES, assert_same, count_saved, randn, to_numpy  # noqa: E402

import stochdepth  # noqa: E402
from stochdepth import reference as ref  # noqa: E402

pytestmark = pytest.mark.torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


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
    for bad in (1.5, 1.0, True, "1"):  # never truncated to an int
        with pytest.raises(TypeError, match="axis must be an integer"):
            sdt.stochastic_depth(x, x, 0.5, axis=bad, seed=1)
        with pytest.raises(TypeError, match="axis must be an integer"):
            sdt.StochasticDepth(0.5, axis=bad)
    assert sdt.StochasticDepth(0.5, axis=np.int64(-1)).axis == -1
    assert_same(sdt.stochastic_depth(x, x, 0.5, axis=np.int32(1), seed=1),
                sdt.stochastic_depth(x, x, 0.5, axis=1, seed=1))
    with pytest.raises(ValueError, match="scaling"):
        sdt.StochasticDepth(0.5, scaling="paper")
    with pytest.raises(ValueError, match="scaling"):
        sdt.StochasticResidual(torch.nn.Identity(), 0.5, scaling="paper")
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
    torch.library.opcheck(_seeded.rng_snapshot, (rng,))


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
@pytest.mark.timeout(300)  # torch.compile: tens of seconds cold
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


@pytest.mark.timeout(300)  # torch.compile: tens of seconds cold
@cuda
@pytest.mark.cuda
def test_cuda_compile_and_opcheck():
    x = randn((16, 8)).cuda()
    rng = torch.tensor([1, 2], dtype=torch.int64)
    torch.library.opcheck(sdt.drop_path_fwd, (x, x.clone().requires_grad_(), rng, 0.5, True,
                                              False, 0, "training", -1))
    fn = torch.compile(lambda a: sdt.drop_path(a, 0.3, True, seed=4) + 1, fullgraph=True)
    assert_same(fn(x).cpu(), sdt.drop_path(x.cpu(), 0.3, True, seed=4) + 1)

