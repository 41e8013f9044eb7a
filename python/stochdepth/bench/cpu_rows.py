"""The library's CPU rows (ROWS) and the tensors of one CPU case that every CPU row is built on.

Every row computes the same function (scaling="training", the anchors' convention); the
library's rows advance the offset on each call, the anchors draw a fresh mask each call.
A builder takes the CpuTensors and returns (fn, setup), see stochdepth.bench.rows.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from stochdepth.bench.cases import MODE, SCALING, SEED, np_dtype, np_to_torch
from stochdepth.bench.rows import Row
from stochdepth.bench.timing import POST_COMPILE_CALLS

__all__ = ["CpuTensors", "ROWS", "on_isa"]


def every(n, action):
    """A setup that runs `action` (untimed) before every n-th call."""
    calls = itertools.count()

    def setup():
        if next(calls) % n == n - 1:
            action()
        return ()

    return setup


class CpuTensors:
    """Arrays of one CPU case (and torch views of them), and what the builders share."""

    def __init__(self, env, case):
        self.env = env
        self.sd = env.sd
        self.torch = env.torch
        self.p = case.p
        self.drop = 1.0 - case.p
        shape = self.shape = case.shape
        self.dtype_name = case.dtype
        self.dtype = np_dtype(case.dtype)
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
        self.compile_s = None  # set by compiled(), read by the driver after each build

    @property
    def nbytes(self):
        return self.shortcut.nbytes

    def free(self):
        for name in list(vars(self)):
            if name.startswith("t_") or name in ("shortcut", "residual", "grad", "out", "scratch"):
                setattr(self, name, None)

    def np_mask(self):
        keep = self.mask_rng.random(self.B) < self.p
        scaled = keep.astype(np.float32) * self.train_scale
        return scaled.astype(self.dtype).reshape(self.mask_shape)

    def sd_kw(self):
        return dict(seed=SEED, offset=next(self.offsets), mode=MODE, scaling=SCALING)

    def compiled(self, fn, first):
        """torch.compile(fn), compiled now by `first(compiled)`, whose time is kept as
        compile_s. A few more calls follow: a freshly compiled function stays slow for its first
        calls."""
        cf = self.env.compile(fn)
        t0 = time.perf_counter()
        first(cf)
        self.compile_s = time.perf_counter() - t0
        for _ in range(POST_COMPILE_CALLS):
            first(cf)
        return cf

    def inplace_numpy(self):
        """A copy of the shortcut to add into call after call, and a setup restoring it every
        256 calls: each call adds up to 1/p times the residual, so no float16 overflow however
        many calls a tiny case takes (the op is defined for any values)."""
        buf = self.shortcut.copy()
        return buf, every(256, lambda: np.copyto(buf, self.shortcut))

    def inplace_torch(self):
        """The same for torch rows."""
        buf = self.t_shortcut.clone()
        return buf, every(256, lambda: buf.copy_(self.t_shortcut))

    def autograd_backward(self, forward):
        """An autograd row's backward: an untimed `forward()` builds a fresh graph (with respect
        to t_leaf), the timed part is the backward."""
        grad, leaf, tg = self.torch.autograd.grad, self.t_leaf, self.t_grad

        def setup():
            return (forward(),)

        return (lambda out: grad(out, leaf, tg)[0]), setup


# -- the library on NumPy arrays
def _sd_fwd(d):
    sd, p, sc, r = d.sd, d.p, d.shortcut, d.residual
    return (lambda: sd.forward(sc, r, p, **d.sd_kw())), None


def _sd_fwd_out(d):
    sd, p, sc, r, out = d.sd, d.p, d.shortcut, d.residual, d.out
    return (lambda: sd.forward(sc, r, p, out=out, **d.sd_kw())), None


def _sd_fwd_inplace(d):
    sd, p, r = d.sd, d.p, d.residual
    buf, restore = d.inplace_numpy()
    return (lambda: sd.forward(buf, r, p, out=buf, **d.sd_kw())), restore


def _sd_infer(d):
    sd, p, sc, r = d.sd, d.p, d.shortcut, d.residual
    return (lambda: sd.forward(sc, r, p, training=False, seed=None, mode=MODE,
                               scaling=SCALING)), None


def _sd_bwd(d):
    sd, p, g = d.sd, d.p, d.grad
    return (lambda: sd.backward(g, p, **d.sd_kw())[1]), None


def _sd_bwd_out(d):
    sd, p, g, out = d.sd, d.p, d.grad, d.out
    return (lambda: sd.backward(g, p, out=out, **d.sd_kw())[1]), None


def _sd_raw_fwd_out(d):
    sd, p = d.sd, d.p
    run_raw = sd._core.run_raw
    ptrs = (d.shortcut.ctypes.data, d.residual.ctypes.data, d.out.ctypes.data)
    B, inner, dt = d.B, d.inner, getattr(sd._core.DType, d.dtype_name)
    scaling = getattr(sd._core.Scaling, SCALING)

    def raw():
        run_raw(ptrs[0], ptrs[1], ptrs[2], 1, B, inner, dt, p, True, MODE == "batch",
                scaling, SEED, next(d.offsets), -1, 0)

    return raw, None


# -- the library on torch CPU tensors, through DLPack
def _torch_fwd(d):
    sd, p, torch, tsc, tr = d.sd, d.p, d.torch, d.t_shortcut, d.t_residual
    return (lambda: torch.from_dlpack(sd.forward(tsc, tr, p, **d.sd_kw()))), None


def _torch_fwd_out(d):
    sd, p, tsc, tr, tout = d.sd, d.p, d.t_shortcut, d.t_residual, d.t_out
    return (lambda: sd.forward(tsc, tr, p, out=tout, **d.sd_kw())), None


def _torch_fwd_inplace(d):
    sd, p, tr = d.sd, d.p, d.t_residual
    tbuf, restore = d.inplace_torch()
    return (lambda: sd.forward(tbuf, tr, p, out=tbuf, **d.sd_kw())), restore


def _torch_infer(d):
    sd, p, torch, tsc, tr = d.sd, d.p, d.torch, d.t_shortcut, d.t_residual
    return (lambda: torch.from_dlpack(sd.forward(tsc, tr, p, training=False, seed=None,
                                                 mode=MODE, scaling=SCALING))), None


def _torch_bwd(d):
    sd, p, torch, tg = d.sd, d.p, d.torch, d.t_grad
    return (lambda: torch.from_dlpack(sd.backward(tg, p, **d.sd_kw())[1])), None


# -- the torch adapter
def _adapter_fwd(d):
    f, p, tsc, tr = d.env.adapter.stochastic_depth, d.p, d.t_shortcut, d.t_residual
    return (lambda: f(tsc, tr, p, training=True, mode=MODE, scaling=SCALING)), None


def _adapter_infer(d):
    f, p, tsc, tr = d.env.adapter.stochastic_depth, d.p, d.t_shortcut, d.t_residual
    return (lambda: f(tsc, tr, p, training=False, mode=MODE, scaling=SCALING)), None


def _adapter_bwd(d):
    f, p, tsc, leaf = d.env.adapter.stochastic_depth, d.p, d.t_shortcut, d.t_leaf
    return d.autograd_backward(lambda: f(tsc, leaf, p, training=True, mode=MODE,
                                         scaling=SCALING))


# In the order of the tables (the anchors follow, anchors.ROWS).
ROWS = [
    Row("sd", "stochdepth", framework="stochdepth", ours=True, compare_isas=True,
        ops={"fwd": _sd_fwd, "fwd_out": _sd_fwd_out, "fwd_inplace": _sd_fwd_inplace,
             "infer": _sd_infer, "bwd": _sd_bwd}),
    Row("sd_out", "stochdepth (out=)", framework="stochdepth", ours=True,
        ops={"bwd": _sd_bwd_out}),
    Row("sd_raw", "stochdepth _core.run_raw", framework="stochdepth", ours=True,
        ops={"fwd_out": _sd_raw_fwd_out}),
    Row("sd_torch", "stochdepth (torch via DLPack)", framework="torch", ours=True,
        ops={"fwd": _torch_fwd, "fwd_out": _torch_fwd_out, "fwd_inplace": _torch_fwd_inplace,
             "infer": _torch_infer, "bwd": _torch_bwd}),
    Row("sd_adapter", "stochdepth.torch adapter", framework="stochdepth.torch", ours=True,
        ops={"fwd": _adapter_fwd, "infer": _adapter_infer, "bwd": _adapter_bwd}),
]


def on_isa(row, isa):
    """`row` run on another CPU ISA ("sd@avx2", labelled "stochdepth [avx2]"): the ISA is
    switched to `isa` for each call and back (an atomic store each way: microseconds against
    calls of milliseconds), so that the ISAs are compared in the same rounds."""

    def wrap(build):
        def build_on_isa(d):
            fn, setup = build(d)
            sd, active = d.sd, d.sd.get_isa()

            def call(*args):
                sd.set_isa(isa)
                try:
                    return fn(*args)
                finally:
                    sd.set_isa(active)

            return call, setup

        return build_on_isa

    return dataclasses.replace(row, name=f"{row.name}@{isa}", label=f"{row.label} [{isa}]",
                               ops={op: wrap(b) for op, b in row.ops.items()},
                               compare_isas=False)
