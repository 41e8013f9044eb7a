"""The library's CUDA rows (ROWS) and the torch tensors of one CUDA case that every CUDA row is
built on (device time from CUDA events, see timing.CudaTimer).

The library's rows run on torch's current stream, as the adapter does. A builder takes the
CudaTensors and returns (fn, None): CUDA rows need no untimed setup.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from stochdepth.bench.cases import MODE, SCALING, SEED
from stochdepth.bench.rows import Row
from stochdepth.bench.timing import POST_COMPILE_CALLS

__all__ = ["CudaTensors", "ROWS", "cuda_device"]


def cuda_device(torch):
    """(torch.device, ordinal) of the current CUDA device (one place, so a dry run can swap it)."""
    idx = torch.cuda.current_device()
    return torch.device("cuda", idx), idx


class CudaTensors:
    """Tensors of one CUDA case (torch.cuda), named as CpuTensors' torch tensors, and what the
    builders share."""

    def __init__(self, env, case, sd_cuda_error, device=None):
        self.env = env
        self.sd = env.sd
        torch = self.torch = env.torch
        self.p = case.p
        self.drop = 1.0 - case.p
        shape = self.shape = case.shape
        self.dtype_name = case.dtype
        self.B = shape[0]
        self.inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        self.device, self.device_index = device if device is not None else cuda_device(torch)
        tdtype = getattr(torch, case.dtype)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(20261126)
        make = lambda: torch.randn(shape, generator=gen, device=self.device,  # noqa: E731
                                   dtype=torch.float32).to(tdtype)
        self.t_shortcut = make()
        self.t_residual = make()
        self.t_grad = make()
        self.t_out = torch.zeros_like(self.t_shortcut)
        self.t_grad_res = torch.zeros_like(self.t_shortcut)
        self.t_scratch = torch.zeros_like(self.t_shortcut)
        self.t_leaf = self.t_residual.detach().clone().requires_grad_(True)
        self.offsets = itertools.count(1)
        self.stream = torch.cuda.current_stream(self.device).cuda_stream
        self.sd_cuda_error = sd_cuda_error
        self.compile_s = None  # set by compiled(), read by the driver after each build
        torch.cuda.synchronize()

    @property
    def nbytes(self):
        return self.t_shortcut.numel() * self.t_shortcut.element_size()

    def free(self):
        for name in ("t_shortcut", "t_residual", "t_grad", "t_out", "t_grad_res", "t_scratch",
                     "t_leaf"):
            setattr(self, name, None)
        self.torch.cuda.empty_cache()

    def check_library(self):
        """Raises why the library cannot run on this GPU (cli._check_cuda), if it cannot."""
        if self.sd_cuda_error:
            raise RuntimeError(self.sd_cuda_error)

    def sd_kw(self, offset):
        return dict(seed=SEED, offset=offset, mode=MODE, scaling=SCALING, stream=self.stream)

    def compiled(self, fn, first):
        """torch.compile(fn), compiled now by `first(compiled)` (its device time kept as
        compile_s), then a few more calls: a freshly compiled function stays slow at first."""
        cf = self.env.compile(fn)
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        first(cf)
        self.torch.cuda.synchronize()
        self.compile_s = time.perf_counter() - t0
        for _ in range(POST_COMPILE_CALLS):
            first(cf)
        return cf

    def autograd_step(self, forward):
        """A timed forward(t_shortcut, t_leaf) and its autograd backward."""
        grad, sc, leaf, g = self.torch.autograd.grad, self.t_shortcut, self.t_leaf, self.t_grad

        def autograd_step():
            y = forward(sc, leaf)
            (dr,) = grad(y, leaf, g)
            return y, dr

        return autograd_step


def _out_fwd(d):
    d.check_library()
    sd, p, sc, r, out = d.sd, d.p, d.t_shortcut, d.t_residual, d.t_out
    return (lambda: sd.forward(sc, r, p, out=out, **d.sd_kw(next(d.offsets)))), None


def _out_fwdbwd(d):
    d.check_library()
    sd, p, sc, r, g, out, gr = (d.sd, d.p, d.t_shortcut, d.t_residual, d.t_grad, d.t_out,
                                d.t_grad_res)

    def sd_out():
        kw = d.sd_kw(next(d.offsets))
        sd.forward(sc, r, p, out=out, **kw)
        sd.backward(g, p, out=gr, **kw)

    return sd_out, None


def _alloc_fwd(d):
    d.check_library()
    sd, p, torch, sc, r = d.sd, d.p, d.torch, d.t_shortcut, d.t_residual
    return (lambda: torch.from_dlpack(sd.forward(sc, r, p, **d.sd_kw(next(d.offsets))))), None


def _alloc_fwdbwd(d):
    d.check_library()
    sd, p, torch, sc, r, g = d.sd, d.p, d.torch, d.t_shortcut, d.t_residual, d.t_grad

    def sd_alloc():
        kw = d.sd_kw(next(d.offsets))
        y = torch.from_dlpack(sd.forward(sc, r, p, **kw))
        dr = torch.from_dlpack(sd.backward(g, p, **kw)[1])
        return y, dr

    return sd_alloc, None


def _raw_fwd(d):
    d.check_library()
    sd, p = d.sd, d.p
    run_raw = sd._core.run_raw
    ptrs = (d.t_shortcut.data_ptr(), d.t_residual.data_ptr(), d.t_out.data_ptr())
    B, inner, dt = d.B, d.inner, getattr(sd._core.DType, d.dtype_name)
    scaling = getattr(sd._core.Scaling, SCALING)
    dev, st = d.device_index, d.stream

    def raw():
        run_raw(ptrs[0], ptrs[1], ptrs[2], 1, B, inner, dt, p, True, MODE == "batch",
                scaling, SEED, next(d.offsets), dev, st)

    return raw, None


# The adapter is not checked against sd_cuda_error: it reports for itself.
def _adapter_fwd(d):
    f, p, sc, r = d.env.adapter.stochastic_depth, d.p, d.t_shortcut, d.t_residual
    return (lambda: f(sc, r, p, training=True, mode=MODE, scaling=SCALING)), None


def _adapter_fwdbwd(d):
    f, p = d.env.adapter.stochastic_depth, d.p

    def fwd(a, b):
        return f(a, b, p, training=True, mode=MODE, scaling=SCALING)

    return d.autograd_step(fwd), None


# In the order of the tables (the anchors follow, anchors.ROWS).
ROWS = [
    Row("sd_out", "stochdepth (out=)", framework="torch", devices=("cuda",), ours=True,
        ops={"fwd": _out_fwd, "fwdbwd": _out_fwdbwd}),
    Row("sd_alloc", "stochdepth (allocating)", framework="torch", devices=("cuda",), ours=True,
        ops={"fwd": _alloc_fwd, "fwdbwd": _alloc_fwdbwd}),
    Row("sd_raw", "stochdepth _core.run_raw", framework="torch", devices=("cuda",), ours=True,
        ops={"fwd": _raw_fwd}),
    Row("sd_adapter", "stochdepth.torch adapter", framework="stochdepth.torch",
        devices=("cuda",), ours=True, ops={"fwd": _adapter_fwd, "fwdbwd": _adapter_fwdbwd}),
]
