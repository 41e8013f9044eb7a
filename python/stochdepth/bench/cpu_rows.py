"""The CPU rows: one case's arrays and, for each (op, implementation), the function to time.

Every row computes the same function (scaling="training", the anchors' convention); the
library's rows advance the offset on each call, the anchors draw a fresh mask each call.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from stochdepth.bench.cases import MODE, SCALING, SEED, np_dtype, np_to_torch
from stochdepth.bench.timing import POST_COMPILE_CALLS

__all__ = ["CpuCase"]

def _every(n, action):
    """A setup that runs `action` (untimed) before every n-th call."""
    calls = itertools.count()

    def setup():
        if next(calls) % n == n - 1:
            action()
        return ()

    return setup


class CpuCase:
    """Arrays of one CPU case and a builder for every (op, implementation)."""

    def __init__(self, env, shape, dtype):
        self.env = env
        self.sd = env.sd
        self.torch = env.torch
        self.p = env.p
        self.drop = 1.0 - env.p
        self.shape = shape
        self.dtype_name = dtype
        self.dtype = np_dtype(dtype)
        self.B = shape[0]
        self.inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        rng = np.random.default_rng(20261126)
        make = lambda: rng.standard_normal(shape, dtype=np.float32).astype(self.dtype)  # noqa: E731
        self.shortcut = make()
        self.residual = make()
        self.grad = make()
        # Touched once, so that out= rows and the ceilings do not pay first-touch faults.
        self.out = np.zeros_like(self.shortcut)
        self.scratch = np.zeros_like(self.shortcut)
        self.mask_rng = np.random.default_rng(7)
        self.offsets = itertools.count(1)
        self.mask_shape = (self.B,) + (1,) * (len(shape) - 1)
        s = 1.0 / self.p if self.p > 0 else 0.0
        self.train_scale = np.float32(s) if self.dtype != np.float64 else np.float64(s)
        if self.torch is not None:
            t = self.torch
            # Views of the NumPy arrays (nothing writes to them): one copy of each in memory.
            self.t_shortcut = np_to_torch(t, self.shortcut)
            self.t_residual = np_to_torch(t, self.residual)
            self.t_grad = np_to_torch(t, self.grad)
            self.t_scratch = np_to_torch(t, self.scratch)
            self.t_out = t.zeros_like(self.t_shortcut)
            self.t_leaf = self.t_residual.detach().clone().requires_grad_(True)
        self.compile_s = None

    @property
    def nbytes(self):
        return self.shortcut.nbytes

    def free(self):
        for name in list(vars(self)):
            if name.startswith("t_") or name in ("shortcut", "residual", "grad", "out", "scratch"):
                setattr(self, name, None)

    # -- helpers
    def _np_mask(self):
        keep = self.mask_rng.random(self.B) < self.p
        scaled = keep.astype(np.float32) * self.train_scale
        return scaled.astype(self.dtype).reshape(self.mask_shape)

    def _sd_kw(self):
        return dict(seed=SEED, offset=next(self.offsets), mode=MODE, scaling=SCALING)

    def _tv(self, x, training=True):
        return self.env.anchors["torchvision"].fn(x, self.drop, training)

    def _timm(self, x, training=True):
        return self.env.anchors["timm"].fn(x, self.drop, training)

    def _compiled(self, fn, *first_args):
        """torch.compile(fn), compiled now by a first call whose time is kept as compile_s.

        A few more calls follow: a freshly compiled function stays slow for its first calls."""
        cf = self.env.compile(fn)
        t0 = time.perf_counter()
        cf(*first_args)
        self.compile_s = time.perf_counter() - t0
        for _ in range(POST_COMPILE_CALLS):
            cf(*first_args)
        return cf

    def build(self, op, impl):
        """Returns (fn, setup): setup (or None) runs untimed before each timed fn(*setup()).

        "sd@isa" is the "sd" row with the CPU ISA switched to `isa` for the call and back
        (an atomic store each way: microseconds against calls of milliseconds)."""
        self.compile_s = None
        base, _, isa = impl.partition("@")
        fn, setup = getattr(self, f"_{op}")(base)
        if not isa:
            return fn, setup
        sd, active = self.sd, self.sd.get_isa()

        def on_isa(*args):
            sd.set_isa(isa)
            try:
                return fn(*args)
            finally:
                sd.set_isa(active)

        return on_isa, setup

    # -- ops
    def _fwd(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        sc, r = self.shortcut, self.residual
        if impl == "sd":
            return (lambda: sd.forward(sc, r, p, **self._sd_kw())), None
        if impl == "numpy":
            return (lambda: sc + self._np_mask() * r), None
        tsc, tr = self.t_shortcut, self.t_residual
        if impl == "sd_torch":
            return (lambda: torch.from_dlpack(sd.forward(tsc, tr, p, **self._sd_kw()))), None
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth
            return (lambda: f(tsc, tr, p, training=True, mode=MODE, scaling=SCALING)), None
        if impl == "tv":
            return (lambda: tsc + self._tv(tr)), None
        if impl == "timm":
            return (lambda: tsc + self._timm(tr)), None
        if impl == "compile":
            cf = self._compiled(lambda a, b: a + self._tv(b), tsc, tr)
            return (lambda: cf(tsc, tr)), None
        raise KeyError(impl)

    def _fwd_out(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        sc, r, out = self.shortcut, self.residual, self.out
        if impl == "sd":
            return (lambda: sd.forward(sc, r, p, out=out, **self._sd_kw())), None
        if impl == "sd_raw":
            run_raw = sd._core.run_raw
            ptrs = (sc.ctypes.data, r.ctypes.data, out.ctypes.data)
            B, inner, dt = self.B, self.inner, getattr(sd._core.DType, self.dtype_name)
            scaling = getattr(sd._core.Scaling, SCALING)

            def raw():
                run_raw(ptrs[0], ptrs[1], ptrs[2], 1, B, inner, dt, p, True, MODE == "batch",
                        scaling, SEED, next(self.offsets), -1, 0)

            return raw, None
        if impl == "numpy":
            def numpy_out():
                np.multiply(self._np_mask(), r, out=out)
                np.add(sc, out, out=out)

            return numpy_out, None
        tsc, tr, tout = self.t_shortcut, self.t_residual, self.t_out
        if impl == "sd_torch":
            return (lambda: sd.forward(tsc, tr, p, out=tout, **self._sd_kw())), None
        if impl == "tv":
            return (lambda: torch.add(tsc, self._tv(tr), out=tout)), None
        if impl == "timm":
            return (lambda: torch.add(tsc, self._timm(tr), out=tout)), None
        if impl == "compile":
            def f(a, b, o):
                o.copy_(a + self._tv(b))
                return o

            cf = self._compiled(f, tsc, tr, tout)
            return (lambda: cf(tsc, tr, tout)), None
        raise KeyError(impl)

    def _fwd_inplace(self, impl):
        # In place on the same buffer, call after call (the op is defined for any values). Each
        # call adds up to 1/p times the residual, so an untimed setup restores the buffer every
        # 256 calls: no float16 overflow however many calls a tiny case takes.
        sd, p = self.sd, self.p
        r = self.residual
        if impl in ("sd", "numpy"):
            buf = self.shortcut.copy()
            restore = lambda: np.copyto(buf, self.shortcut)  # noqa: E731
            if impl == "sd":
                fn = lambda: sd.forward(buf, r, p, out=buf, **self._sd_kw())  # noqa: E731
            else:
                fn = lambda: np.add(buf, self._np_mask() * r, out=buf)  # noqa: E731
            return fn, _every(256, restore)
        tr = self.t_residual
        tbuf = self.t_shortcut.clone()
        restore = lambda: tbuf.copy_(self.t_shortcut)  # noqa: E731
        if impl == "sd_torch":
            fn = lambda: sd.forward(tbuf, tr, p, out=tbuf, **self._sd_kw())  # noqa: E731
        elif impl == "tv":
            fn = lambda: tbuf.add_(self._tv(tr))  # noqa: E731
        elif impl == "timm":
            fn = lambda: tbuf.add_(self._timm(tr))  # noqa: E731
        elif impl == "compile":
            def f(a, b):
                a.add_(self._tv(b))
                return a

            cf = self._compiled(f, tbuf, tr)
            fn = lambda: cf(tbuf, tr)  # noqa: E731
        else:
            raise KeyError(impl)
        return fn, _every(256, restore)

    def _infer(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        sc, r = self.shortcut, self.residual
        if impl == "sd":
            return (lambda: sd.forward(sc, r, p, training=False, seed=None, mode=MODE,
                                       scaling=SCALING)), None
        if impl == "numpy":
            return (lambda: sc + r), None  # inference factor 1 with scaling="training"
        tsc, tr = self.t_shortcut, self.t_residual
        if impl == "sd_torch":
            return (lambda: torch.from_dlpack(sd.forward(tsc, tr, p, training=False, seed=None,
                                                         mode=MODE, scaling=SCALING))), None
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth
            return (lambda: f(tsc, tr, p, training=False, mode=MODE, scaling=SCALING)), None
        if impl == "tv":
            return (lambda: tsc + self._tv(tr, training=False)), None
        if impl == "timm":
            return (lambda: tsc + self._timm(tr, training=False)), None
        if impl == "compile":
            cf = self._compiled(lambda a, b: a + self._tv(b, training=False), tsc, tr)
            return (lambda: cf(tsc, tr)), None
        raise KeyError(impl)

    def _bwd(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        g = self.grad
        if impl == "sd":
            return (lambda: sd.backward(g, p, **self._sd_kw())[1]), None
        if impl == "sd_out":
            out = self.out
            return (lambda: sd.backward(g, p, out=out, **self._sd_kw())[1]), None
        if impl == "numpy":
            return (lambda: self._np_mask() * g), None
        tg, tsc, leaf = self.t_grad, self.t_shortcut, self.t_leaf
        if impl == "sd_torch":
            return (lambda: torch.from_dlpack(sd.backward(tg, p, **self._sd_kw())[1])), None
        # Autograd rows: an untimed forward builds a fresh graph, the timed part is the backward.
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth
            fwd = lambda: f(tsc, leaf, p, training=True, mode=MODE, scaling=SCALING)  # noqa: E731
        elif impl == "tv":
            fwd = lambda: tsc + self._tv(leaf)  # noqa: E731
        elif impl == "timm":
            fwd = lambda: tsc + self._timm(leaf)  # noqa: E731
        elif impl == "compile":
            cf = self.env.compile(lambda a, b: a + self._tv(b))
            t0 = time.perf_counter()
            torch.autograd.grad(cf(tsc, leaf), leaf, tg)
            self.compile_s = time.perf_counter() - t0
            for _ in range(POST_COMPILE_CALLS):
                torch.autograd.grad(cf(tsc, leaf), leaf, tg)
            fwd = lambda: cf(tsc, leaf)  # noqa: E731
        else:
            raise KeyError(impl)

        def setup():
            return (fwd(),)

        return (lambda out: torch.autograd.grad(out, leaf, tg)[0]), setup
