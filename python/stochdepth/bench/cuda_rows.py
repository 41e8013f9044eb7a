"""The CUDA rows: one case's torch tensors on the GPU and, for each (op, implementation), the
function to time (device time from CUDA events, see timing.CudaTimer).

The library's rows run on torch's current stream, as the adapter does.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from stochdepth.bench.cases import MODE, SCALING, SEED
from stochdepth.bench.timing import POST_COMPILE_CALLS

__all__ = ["CudaCase", "cuda_device"]

def cuda_device(torch):
    """(torch.device, ordinal) of the current CUDA device (one place, so a dry run can swap it)."""
    idx = torch.cuda.current_device()
    return torch.device("cuda", idx), idx


class CudaCase:
    """Tensors of one CUDA case (torch.cuda) and a builder for every (op, implementation)."""

    def __init__(self, env, shape, dtype, sd_cuda_error, device=None):
        self.env = env
        self.sd = env.sd
        torch = self.torch = env.torch
        self.p = env.p
        self.drop = 1.0 - env.p
        self.shape = shape
        self.dtype_name = dtype
        self.B = shape[0]
        self.inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        self.device, self.device_index = device if device is not None else cuda_device(torch)
        tdtype = getattr(torch, dtype)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(20261126)
        make = lambda: torch.randn(shape, generator=gen, device=self.device,  # noqa: E731
                                   dtype=torch.float32).to(tdtype)
        self.shortcut = make()
        self.residual = make()
        self.grad = make()
        self.out = torch.zeros_like(self.shortcut)
        self.grad_res = torch.zeros_like(self.shortcut)
        self.scratch = torch.zeros_like(self.shortcut)
        self.leaf = self.residual.detach().clone().requires_grad_(True)
        self.offsets = itertools.count(1)
        self.stream = torch.cuda.current_stream(self.device).cuda_stream
        self.sd_cuda_error = sd_cuda_error
        self.compile_s = None
        torch.cuda.synchronize()

    @property
    def nbytes(self):
        return self.shortcut.numel() * self.shortcut.element_size()

    def free(self):
        for name in ("shortcut", "residual", "grad", "out", "grad_res", "scratch", "leaf"):
            setattr(self, name, None)
        self.torch.cuda.empty_cache()

    def _sd_kw(self, offset):
        return dict(seed=SEED, offset=offset, mode=MODE, scaling=SCALING, stream=self.stream)

    def _tv(self, x):
        return self.env.anchors["torchvision"].fn(x, self.drop, True)

    def _timm(self, x):
        return self.env.anchors["timm"].fn(x, self.drop, True)

    def build(self, op, impl):
        """Returns (fn, None): CUDA rows need no untimed setup."""
        self.compile_s = None
        if impl.startswith("sd") and impl != "sd_adapter" and self.sd_cuda_error:
            raise RuntimeError(self.sd_cuda_error)
        return getattr(self, f"_{op}")(impl), None

    def _compiled(self, fn, first):
        cf = self.env.compile(fn)
        self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        first(cf)
        self.torch.cuda.synchronize()
        self.compile_s = time.perf_counter() - t0
        for _ in range(POST_COMPILE_CALLS):
            first(cf)
        return cf

    def _fwd(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        sc, r, out = self.shortcut, self.residual, self.out
        kw = lambda: self._sd_kw(next(self.offsets))  # noqa: E731
        if impl == "sd_out":
            return lambda: sd.forward(sc, r, p, out=out, **kw())
        if impl == "sd_alloc":
            return lambda: torch.from_dlpack(sd.forward(sc, r, p, **kw()))
        if impl == "sd_raw":
            run_raw = sd._core.run_raw
            ptrs = (sc.data_ptr(), r.data_ptr(), out.data_ptr())
            B, inner, dt = self.B, self.inner, getattr(sd._core.DType, self.dtype_name)
            scaling = getattr(sd._core.Scaling, SCALING)
            dev, st = self.device_index, self.stream

            def raw():
                run_raw(ptrs[0], ptrs[1], ptrs[2], 1, B, inner, dt, p, True, MODE == "batch",
                        scaling, SEED, next(self.offsets), dev, st)

            return raw
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth
            return lambda: f(sc, r, p, training=True, mode=MODE, scaling=SCALING)
        if impl == "tv":
            return lambda: sc + self._tv(r)
        if impl == "timm":
            return lambda: sc + self._timm(r)
        if impl == "compile":
            cf = self._compiled(lambda a, b: a + self._tv(b), lambda f: f(sc, r))
            return lambda: cf(sc, r)
        raise KeyError(impl)

    def _fwdbwd(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        sc, r, g, out, gr, leaf = (self.shortcut, self.residual, self.grad, self.out,
                                   self.grad_res, self.leaf)
        if impl == "sd_out":
            def sd_out():
                kw = self._sd_kw(next(self.offsets))
                sd.forward(sc, r, p, out=out, **kw)
                sd.backward(g, p, out=gr, **kw)

            return sd_out
        if impl == "sd_alloc":
            def sd_alloc():
                kw = self._sd_kw(next(self.offsets))
                y = torch.from_dlpack(sd.forward(sc, r, p, **kw))
                dr = torch.from_dlpack(sd.backward(g, p, **kw)[1])
                return y, dr

            return sd_alloc
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth

            def fwd(a, b):
                return f(a, b, p, training=True, mode=MODE, scaling=SCALING)
        elif impl == "tv":
            def fwd(a, b):
                return a + self._tv(b)
        elif impl == "timm":
            def fwd(a, b):
                return a + self._timm(b)
        elif impl == "compile":
            fwd = self._compiled(lambda a, b: a + self._tv(b),
                                 lambda f: torch.autograd.grad(f(sc, leaf), leaf, g))
        else:
            raise KeyError(impl)

        def autograd_step():
            y = fwd(sc, leaf)
            (dr,) = torch.autograd.grad(y, leaf, g)
            return y, dr

        return autograd_step
