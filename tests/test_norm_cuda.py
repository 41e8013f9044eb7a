"""The fused norm's CUDA kernels on a GPU (docs/design.md, "Fused residual and norm"): the raw
API on torch.cuda tensors and the PyTorch adapter, bit for bit against stochdepth.reference.
Skipped where no GPU is present (the same kernel bodies run in the CPU emulation on every run:
tests/test_norm_cuda_emulated.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import BF16, DTYPE_IDS, DTYPES, assert_bits_equal, random_array

import stochdepth
from stochdepth import reference

if stochdepth.build_info()["cuda_device_count"] == 0:
    pytest.skip("no CUDA device", allow_module_level=True)
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("ieee_overflow_ok")]


def to_cuda(a):
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a.view(np.int16) if a.dtype == BF16 else a)
    if a.dtype == BF16:
        t = t.view(torch.bfloat16)
    return t.cuda()


def to_numpy(x, dtype):
    if x is None:
        return None
    t = torch.from_dlpack(x) if not isinstance(x, torch.Tensor) else x
    t = t.cpu()
    if dtype == BF16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("width", [1, 3, 16, 17, 65, 768, 1023, 16384])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("with_gamma", [False, True], ids=["nogamma", "gamma"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_raw_api_matches_reference(dtype, width, norm, with_gamma, mode):
    rng = np.random.default_rng([width, 3])
    per = 3 if width <= 1024 else 1
    shape = (70, per, width)
    sc, res, gy, gn = (random_array(rng, shape, dtype, special=False) for _ in range(4))
    w = (1 + 0.2 * rng.standard_normal(width)).astype(dtype)
    b = None if norm == "rms" else (0.1 * rng.standard_normal(width)).astype(dtype)
    g = (0.5 + rng.random(width)).astype(dtype) if with_gamma else None
    kw = dict(norm=norm, eps=1e-5, seed=2**63 + 5, offset=2**32 + 1, mode=mode,
              scaling="training")
    for p in (0.0, 0.5, 1.0):
        y, n = stochdepth.forward_norm(to_cuda(sc), to_cuda(res), p, to_cuda(w), to_cuda(b),
                                       gamma=to_cuda(g), **kw)
        ey, en = reference.forward_norm(sc, res, p, w, b, gamma=g, **kw)
        assert_bits_equal(to_numpy(y, dtype), ey, "y")
        assert_bits_equal(to_numpy(n, dtype), en, "n")
        got = stochdepth.backward_norm(to_cuda(gy), to_cuda(gn), to_cuda(ey), to_cuda(res), p,
                                       to_cuda(w), to_cuda(b), gamma=to_cuda(g), **kw)
        want = reference.backward_norm(gy, gn, ey, res, p, w, b, gamma=g, **kw)
        for a, e in zip(got, want):
            assert (a is None) == (e is None)
            if e is not None:
                assert_bits_equal(to_numpy(a, dtype), e)


def test_torch_adapter_on_cuda_matches_cpu():
    from stochdepth.torch import StochasticDepthNorm

    for dtype in (torch.float32, torch.bfloat16):
        cpu = StochasticDepthNorm(64, 0.5, layer_scale_init=0.1, seed=9)
        gpu = StochasticDepthNorm(64, 0.5, layer_scale_init=0.1, seed=9).cuda()
        x = torch.randn(8, 5, 64).to(dtype)
        r = torch.randn(8, 5, 64).to(dtype).requires_grad_(True)
        rc = r.detach().cuda().requires_grad_(True)
        y1, n1 = cpu(x, r)
        y2, n2 = gpu(x.cuda(), rc)
        assert torch.equal(y1, y2.cpu()) and torch.equal(n1, n2.cpu())
        (n1.float().sum() + y1.float().sum()).backward()
        (n2.float().sum() + y2.float().sum()).backward()
        assert torch.equal(r.grad, rc.grad.cpu())
        assert torch.equal(cpu.weight.grad, gpu.weight.grad.cpu())
        assert torch.equal(cpu.gamma.grad, gpu.gamma.grad.cpu())

