"""stochdepth.torch's modules and randomness: unseeded draws follow torch's generator, seeded
modules give a reproducible, resumable sequence, and the drop-in modules compute what timm's and
torchvision's formulas compute for the same mask (the formulas are written here from the
libraries' documented behaviour; nothing is downloaded).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from torch_util import assert_same, randn  # noqa: E402

import stochdepth  # noqa: E402

pytestmark = pytest.mark.torch


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
