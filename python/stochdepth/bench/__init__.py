"""Benchmark stochdepth against what users run today, in one process and one run.

    python -m stochdepth.bench                          # CPU: the cases of issue 2
    python -m stochdepth.bench --device cuda            # GPU: the cases of issue 3
    python -m stochdepth.bench --quick --cases small --json /tmp/b.json     # smoke test
    python -m stochdepth.bench --cases 64x197x768:float16 --ops fwd,bwd     # any shape/dtype

What a row means:
- time: CPU rows are wall time per call (time.perf_counter_ns) after warm-up calls, repeated
  until at least --min-time seconds were timed; CUDA rows are device time between two
  torch.cuda.Events around each call. The tables give the median and the minimum.
- GB/s: the bytes the op must move, over the median time. A dropped sample's residual is never
  read, so a training forward moves shortcut + kept residual rows + output, and a backward moves
  the kept rows of grad_out + grad_residual. The same count is used for every implementation of
  an op (the anchors move more than that: their GB/s is "effective").
- % copy: GB/s over the copy bandwidth measured in the same run on a buffer the size of one
  tensor (read + write bytes): on the CPU stochdepth's own streaming copy (`_core.stream_copy`,
  non-temporal stores, stochdepth's thread count); on CUDA the larger of torch's `.copy_` and
  `_core.stream_copy_raw`.
- vs X: X's median time over this row's median time (above 1: this row is faster).

Anchors (written here from the documented behaviour of each library, not imported):
- NumPy: `shortcut + mask[:, None, ...] * residual`, the mask drawn with NumPy's generator, in
  the tensor's dtype and scaled by 1/p.
- torchvision's `stochastic_depth(residual, 1 - p, "row", training)` (noise = empty([B, 1, ...])
  .bernoulli_(p), noise.div_(p) when p > 0, residual * noise) followed by the add.
- timm's `drop_path(residual, 1 - p, training, scale_by_keep=True)` (new_empty + bernoulli_ +
  div_, x * random_tensor) followed by the add.
- torch.compile of the torchvision formula plus the add (dynamic=False, compile time excluded
  and reported). Backward anchors are torch autograd (torch.autograd.grad w.r.t. the residual).
Both scalings cost the same; the rows use scaling="training" (timm/torchvision convention) so
that every implementation computes the same function. Seed fixed, offset advanced on each call.
torch keeps its default thread count (it is printed); stochdepth keeps its own default unless
--threads is given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import numpy as np

from stochdepth.bench._util import (
    Progress,
    TimingPlan,
    format_table,
    machine_info,
    median,
    short_error,
    time_cpu,
    time_cuda,
)

SEED = 0x5EED5EED
SCALING = "training"
POST_COMPILE_CALLS = 5  # untimed calls right after torch.compile's first (compiling) call
MODE = "row"

# name -> (shape, dtype, what it stands for)
CASES = {
    "kerasfactory": ((32, 64, 64, 128), "float32", "kerasfactory's example"),
    "vit-f32": ((128, 197, 768), "float32", "ViT-B/16 tokens, batch 128"),
    "vit-bf16": ((128, 197, 768), "bfloat16", "ViT-B/16 tokens, batch 128"),
    "vit256-f32": ((256, 197, 768), "float32", "ViT-B/16 tokens, batch 256"),
    "vit256-bf16": ((256, 197, 768), "bfloat16", "ViT-B/16 tokens, batch 256"),
    "vit1024-bf16": ((1024, 197, 768), "bfloat16", "ViT-B/16 tokens, batch 1024"),
    "launch": ((8, 197, 384), "float32", "small: launch overhead"),
    "small": ((16, 33, 40), "float32", "smoke test (odd sizes)"),
}
DEFAULT_CASES = {
    "cpu": ["kerasfactory", "vit-f32", "vit-bf16"],
    "cuda": ["kerasfactory", "vit256-f32", "vit256-bf16", "vit1024-bf16", "launch"],
}

# op -> title, per device
OPS = {
    "cpu": {
        "fwd": "training forward, allocating",
        "fwd_out": "training forward, out=",
        "fwd_inplace": "training forward, in place (out=shortcut)",
        "infer": "inference forward, allocating",
        "bwd": "backward (grad_residual), allocating",
    },
    "cuda": {
        "fwd": "training forward",
        "fwdbwd": "training forward + backward",
    },
}

# implementation key -> (label, anchor key or None, what it needs)
IMPLS = {
    "sd": ("stochdepth", None, ()),
    "sd_out": ("stochdepth (out=)", None, ()),
    "sd_alloc": ("stochdepth (allocating)", None, ()),
    "sd_raw": ("stochdepth _core.run_raw", None, ()),
    "sd_torch": ("stochdepth (torch via DLPack)", None, ("torch",)),
    "sd_adapter": ("stochdepth.torch adapter", None, ("torch", "adapter")),
    "numpy": ("NumPy expression", "numpy", ()),
    "tv": ("torchvision formula, eager", "torchvision", ("torch",)),
    "timm": ("timm drop_path, eager", "timm", ("torch",)),
    "compile": ("torch.compile(torchvision formula)", "compile", ("torch", "compile")),
}
ANCHORS = [("numpy", "vs NumPy"), ("torchvision", "vs tv"), ("timm", "vs timm"),
           ("compile", "vs compile")]

ROWS = {
    "cpu": {
        "fwd": ["sd", "sd_torch", "sd_adapter", "numpy", "tv", "timm", "compile"],
        "fwd_out": ["sd", "sd_raw", "sd_torch", "numpy", "tv", "timm", "compile"],
        "fwd_inplace": ["sd", "sd_torch", "numpy", "tv", "timm", "compile"],
        "infer": ["sd", "sd_torch", "sd_adapter", "numpy", "tv", "timm", "compile"],
        "bwd": ["sd", "sd_out", "sd_torch", "sd_adapter", "numpy", "tv", "timm", "compile"],
    },
    "cuda": {
        "fwd": ["sd_out", "sd_alloc", "sd_raw", "sd_adapter", "tv", "timm", "compile"],
        "fwdbwd": ["sd_out", "sd_alloc", "sd_adapter", "tv", "timm", "compile"],
    },
}


def op_bytes(op, n_elems, itemsize, kept):
    """Bytes an op must move (DESIGN.md: a dropped sample's residual is never read)."""
    t = n_elems * itemsize
    if op in ("fwd", "fwd_out"):
        return t * (2.0 + kept)  # shortcut + kept residual rows + output
    if op == "fwd_inplace":
        return t * 3.0 * kept  # dropped samples are not touched at all
    if op == "infer":
        return t * 3.0
    if op == "bwd":
        return t * (1.0 + kept)  # kept rows of grad_out + grad_residual
    if op == "fwdbwd":
        return t * (3.0 + 2.0 * kept)
    raise ValueError(op)


BYTES_NOTE = {
    "fwd": "shortcut + kept residual rows + output",
    "fwd_out": "shortcut + kept residual rows + output",
    "fwd_inplace": "kept rows of shortcut and residual read, kept rows written",
    "infer": "shortcut + residual + output",
    "bwd": "kept rows of grad_out + grad_residual",
    "fwdbwd": "forward + backward bytes",
}


# ---------------------------------------------------------------------------------------------
# The anchors' formulas, written from the libraries' documented behaviour


def torchvision_stochastic_depth(torch, x, drop_p, mode="row", training=True):
    """What torchvision.ops.stochastic_depth(x, drop_p, mode, training) computes.

    `drop_p` is the probability of zeroing. The identity when not training or drop_p == 0;
    otherwise x * noise, noise of shape [B, 1, ...] ("row") or [1, ...] ("batch") made by
    torch.empty + bernoulli_(1 - drop_p) in x's dtype, divided in place by 1 - drop_p if > 0.
    """
    if drop_p == 0.0 or not training:
        return x
    keep = 1.0 - drop_p
    noise_shape = [x.shape[0] if mode == "row" else 1] + [1] * (x.ndim - 1)
    noise = torch.empty(noise_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
    if keep > 0.0:
        noise.div_(keep)
    return x * noise


def timm_drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):
    """What timm.layers.drop_path(x, drop_prob, training, scale_by_keep) computes.

    The identity when drop_prob == 0 or not training; otherwise x * r with r of shape
    [B, 1, ...] made by x.new_empty + bernoulli_(1 - drop_prob), divided in place by
    1 - drop_prob when scale_by_keep and 1 - drop_prob > 0.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if scale_by_keep and keep > 0.0:
        r.div_(keep)
    return x * r


# ---------------------------------------------------------------------------------------------
# Cases


def parse_case(name):
    """A name from CASES, or 'AxBxC:dtype' (e.g. 64x197x768:float16)."""
    if name in CASES:
        shape, dtype, what = CASES[name]
        return name, tuple(shape), dtype, what
    if ":" in name:
        dims, dtype = name.split(":", 1)
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if shape and all(d > 0 for d in shape) and dtype in (
                "float16", "bfloat16", "float32", "float64"):
            return name, shape, dtype, "custom"
    raise SystemExit(
        f"--cases: unknown case {name!r}; expected one of {', '.join(CASES)} or a custom "
        "'AxBxC:dtype' with dtype float16|bfloat16|float32|float64")


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def np_to_torch(torch, a):
    """A torch CPU tensor holding a copy of `a` (bfloat16 through a uint16 view)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


class Env:
    """What the run has: the library, torch (or why not), the adapter (or why not), options."""

    def __init__(self, args):
        import stochdepth

        self.sd = stochdepth
        self.args = args
        self.p = float(args.p)
        self.torch = None
        self.torch_error = None
        if not args.no_torch:
            try:
                import torch

                self.torch = torch
            except Exception as exc:  # noqa: BLE001 - any import failure means "no torch rows"
                self.torch_error = short_error(exc)
        else:
            self.torch_error = "disabled by --no-torch"
        self.adapter = None
        self.adapter_error = None
        if self.torch is not None and not args.no_adapter:
            try:
                import stochdepth.torch as sdt

                if not hasattr(sdt, "stochastic_depth"):
                    raise AttributeError("stochdepth.torch has no stochastic_depth")
                self.adapter = sdt
            except Exception as exc:  # noqa: BLE001 - optional rows
                self.adapter_error = short_error(exc)
        elif self.torch is None:
            self.adapter_error = "needs torch"
        else:
            self.adapter_error = "disabled by --no-adapter"
        self.compile_error = None
        if self.torch is None:
            self.compile_error = "needs torch"
        elif args.no_compile:
            self.compile_error = "disabled by --no-compile"

    def has(self, need):
        if need == "torch":
            return self.torch is not None
        if need == "adapter":
            return self.adapter is not None
        if need == "compile":
            return self.compile_error is None
        raise ValueError(need)

    def rows_for(self, device, op):
        return [k for k in ROWS[device][op] if all(self.has(n) for n in IMPLS[k][2])]

    def compile(self, fn):
        return self.torch.compile(fn, dynamic=bool(self.args.compile_dynamic))


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
        self.out = np.empty_like(self.shortcut)
        self.out.fill(0)  # touched once: out= rows do not pay first-touch faults
        self.mask_rng = np.random.default_rng(7)
        self.offsets = itertools.count(1)
        self.mask_shape = (self.B,) + (1,) * (len(shape) - 1)
        s = 1.0 / self.p if self.p > 0 else 0.0
        self.train_scale = np.float32(s) if self.dtype != np.float64 else np.float64(s)
        if self.torch is not None:
            t = self.torch
            self.t_shortcut = np_to_torch(t, self.shortcut)
            self.t_residual = np_to_torch(t, self.residual)
            self.t_grad = np_to_torch(t, self.grad)
            self.t_out = t.zeros_like(self.t_shortcut)
            self.t_leaf = self.t_residual.detach().clone().requires_grad_(True)
        self.compile_s = None

    @property
    def nbytes(self):
        return self.shortcut.nbytes

    def free(self):
        for name in list(vars(self)):
            if name.startswith("t_") or name in ("shortcut", "residual", "grad", "out"):
                setattr(self, name, None)

    # -- helpers
    def _np_mask(self):
        keep = self.mask_rng.random(self.B) < self.p
        scaled = keep.astype(np.float32) * self.train_scale
        return scaled.astype(self.dtype).reshape(self.mask_shape)

    def _sd_kw(self):
        return dict(seed=SEED, offset=next(self.offsets), mode=MODE, scaling=SCALING)

    def _tv(self, x, training=True):
        return torchvision_stochastic_depth(self.torch, x, self.drop, MODE, training)

    def _timm(self, x, training=True):
        return timm_drop_path(x, self.drop, training)

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
        """Returns (fn, setup): setup (or None) runs untimed before each timed fn(*setup())."""
        self.compile_s = None
        return getattr(self, f"_{op}")(impl)

    # -- ops
    def _fwd(self, impl):
        sd, p, torch = self.sd, self.p, self.torch
        sc, r = self.shortcut, self.residual
        if impl == "sd":
            return (lambda: sd.forward(sc, r, p, **self._sd_kw())), None
        tsc, tr = getattr(self, "t_shortcut", None), getattr(self, "t_residual", None)
        if impl == "sd_torch":
            return (lambda: torch.from_dlpack(sd.forward(tsc, tr, p, **self._sd_kw()))), None
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth
            return (lambda: f(tsc, tr, p, training=True, mode=MODE, scaling=SCALING)), None
        if impl == "numpy":
            return (lambda: sc + self._np_mask() * r), None
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

            def raw():
                run_raw(ptrs[0], ptrs[1], ptrs[2], 1, B, inner, dt, p, True, MODE == "batch",
                        getattr(sd._core.Scaling, SCALING), SEED, next(self.offsets), -1, 0)

            return raw, None
        tsc, tr, tout = (getattr(self, n, None) for n in ("t_shortcut", "t_residual", "t_out"))
        if impl == "sd_torch":
            return (lambda: sd.forward(tsc, tr, p, out=tout, **self._sd_kw())), None
        if impl == "numpy":
            def numpy_out():
                np.multiply(self._np_mask(), r, out=out)
                np.add(sc, out, out=out)

            return numpy_out, None
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
        # In place on the same buffer, rep after rep (the op is defined for any values). Each
        # call adds up to 1/p times the residual, so an untimed setup restores the buffer every
        # 256 calls: no float16 overflow however many reps a tiny case takes.
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


def _every(n, action):
    """A setup for time_cpu that runs `action` (untimed) before every n-th call."""
    calls = itertools.count()

    def setup():
        if next(calls) % n == n - 1:
            action()
        return ()

    return setup


def _cuda_device(torch):
    """(torch.device, ordinal) of the current CUDA device (one place, so a dry run can swap it)."""
    idx = torch.cuda.current_device()
    return torch.device("cuda", idx), idx


class CudaCase:
    """Tensors of one CUDA case (torch.cuda) and a builder for every (op, implementation)."""

    def __init__(self, env, shape, dtype, sd_cuda_error):
        self.env = env
        self.sd = env.sd
        torch = self.torch = env.torch
        self.p = env.p
        self.drop = 1.0 - env.p
        self.shape = shape
        self.dtype_name = dtype
        self.B = shape[0]
        self.inner = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        self.device, self.device_index = _cuda_device(torch)
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
        for name in ("shortcut", "residual", "grad", "out", "grad_res", "leaf"):
            setattr(self, name, None)
        self.torch.cuda.empty_cache()

    def _sd_kw(self, offset):
        return dict(seed=SEED, offset=offset, mode=MODE, scaling=SCALING, stream=self.stream)

    def _tv(self, x):
        return torchvision_stochastic_depth(self.torch, x, self.drop, MODE, True)

    def build(self, op, impl):
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
            dev, st = self.device_index, self.stream

            def raw():
                run_raw(ptrs[0], ptrs[1], ptrs[2], 1, B, inner, dt, p, True, MODE == "batch",
                        getattr(sd._core.Scaling, SCALING), SEED, next(self.offsets), dev, st)

            return raw
        if impl == "sd_adapter":
            f = self.env.adapter.stochastic_depth
            return lambda: f(sc, r, p, training=True, mode=MODE, scaling=SCALING)
        if impl == "tv":
            return lambda: sc + self._tv(r)
        if impl == "timm":
            return lambda: sc + timm_drop_path(r, self.drop, True)
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
                return a + timm_drop_path(b, self.drop, True)
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


# ---------------------------------------------------------------------------------------------
# Running


def _plan(quick, device, min_time):
    if device == "cpu":
        if quick:
            return TimingPlan(warmup=1, min_reps=2, max_reps=3, min_time_s=0.0)
        return TimingPlan(warmup=2, min_reps=5, max_reps=10000, min_time_s=min_time,
                          warmup_time_s=0.1)
    if quick:
        return TimingPlan(warmup=1, min_reps=3, max_reps=3, min_time_s=0.0)
    return TimingPlan(warmup=5, min_reps=20, max_reps=1000, min_time_s=min_time,
                      warmup_time_s=0.05)


def _summary(times_ns, nbytes, ceiling_gbps):
    med = median(times_ns) / 1e6
    row = {
        "median_ms": med,
        "min_ms": min(times_ns) / 1e6,
        "mean_ms": sum(times_ns) / len(times_ns) / 1e6,
        "reps": len(times_ns),
        "bytes": nbytes,
        "gbps": nbytes / (med * 1e-3) / 1e9 if med > 0 else math.inf,
    }
    row["pct_copy"] = 100.0 * row["gbps"] / ceiling_gbps if ceiling_gbps else None
    return row


def _kept_fraction(sd, batch, p, n=256):
    """Mean kept fraction of the stochdepth mask over offsets 0..n-1 (for the byte counts)."""
    total = 0
    for off in range(n):
        total += int(np.count_nonzero(sd.mask(batch, p, seed=SEED, offset=off, mode=MODE)))
    return total / (n * batch)


def _copy_rows_cpu(env, case, plan):
    """Bandwidth ceiling: stochdepth's streaming copy (and np.copyto, for information)."""
    src = case.shortcut
    dst = np.empty_like(src)
    dst.fill(0)
    rows = []
    for name, fn in (("stochdepth _core.stream_copy", lambda: env.sd._core.stream_copy(dst, src)),
                     ("np.copyto (1 thread)", lambda: np.copyto(dst, src))):
        entry = {"impl": name, "bytes": 2 * src.nbytes}
        try:
            times = time_cpu(fn, plan)
            entry.update(_summary(times, 2 * src.nbytes, None))
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            entry["error"] = short_error(exc)
        rows.append(entry)
    return rows


def _copy_rows_cuda(env, case, plan):
    torch = env.torch
    src = case.shortcut
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    rows = []

    def sd_copy():
        env.sd._core.stream_copy_raw(dst.data_ptr(), src.data_ptr(), nbytes, case.device_index,
                                     case.stream)

    for name, fn in (("torch .copy_", lambda: dst.copy_(src)),
                     ("stochdepth _core.stream_copy_raw", sd_copy)):
        entry = {"impl": name, "bytes": 2 * nbytes}
        try:
            if name.startswith("stochdepth") and case.sd_cuda_error:
                raise RuntimeError(case.sd_cuda_error)
            times = time_cuda(fn, plan, torch)
            entry.update(_summary(times, 2 * nbytes, None))
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            entry["error"] = short_error(exc)
        rows.append(entry)
    return rows


def _fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 1 else (f"{x:.3f}" if x < 100 else f"{x:.1f}")


def _fmt_x(x):
    return "-" if x is None else f"{x:.2f}x"


def _print_case(case_res, device, out=None):
    out = sys.stdout if out is None else out
    shape = tuple(case_res["shape"])
    n = case_res["n_elems"]
    tb = case_res["tensor_bytes"]
    lines = [
        "",
        f"== {case_res['name']}: {shape} {case_res['dtype']} ({case_res['what']}); "
        f"{n / 1e6:.2f} M elements, {tb / 1e6:.1f} MB per tensor; p = {case_res['p']}, "
        f"mode={MODE!r}, scaling={SCALING!r}",
        f"   kept fraction {case_res['kept_fraction']:.4f} (stochdepth mask, mean over 256 "
        "offsets; used for the byte counts)",
    ]
    copy_bits = []
    for c in case_res["copy"]:
        if "error" in c:
            copy_bits.append(f"{c['impl']}: FAILED ({c['error']})")
        else:
            copy_bits.append(f"{c['impl']}: {_fmt_ms(c['median_ms'])} ms = {c['gbps']:.1f} GB/s")
    lines.append("   copy (read + write, one tensor): " + "; ".join(copy_bits))
    ceiling = case_res["copy_gbps"]
    lines.append(f"   % copy is against {ceiling:.1f} GB/s ({case_res['copy_ceiling_from']})"
                 if ceiling else "   % copy: no copy bandwidth measured")
    print("\n".join(lines), file=out)

    anchors = [(k, h) for k, h in ANCHORS if device == "cpu" or k != "numpy"]
    headers = ["implementation", "median ms", "min ms", "reps", "GB/s", "% copy"]
    headers += [h for _, h in anchors]
    table = []
    for op, op_res in case_res["ops"].items():
        table.append(f"[{op}] {op_res['title']}: {op_res['bytes'] / 1e6:.1f} MB "
                     f"({BYTES_NOTE[op]})")
        for row in op_res["rows"]:
            label = row["label"]
            if row.get("compile_s") is not None:
                label += f" [compile {row['compile_s']:.1f}s]"
            if "error" in row:
                table.append(f"  {label}: FAILED: {row['error']}")
                continue
            cells = ["  " + label, _fmt_ms(row["median_ms"]), _fmt_ms(row["min_ms"]),
                     str(row["reps"]), f"{row['gbps']:.2f}",
                     "-" if row["pct_copy"] is None else f"{row['pct_copy']:.1f}%"]
            cells += [_fmt_x(row["speedup"].get(k)) for k, _ in anchors]
            table.append(cells)
    print(format_table(headers, table), file=out)
    out.flush()


def run(args):
    env = Env(args)
    sd = env.sd
    torch = env.torch
    device = args.device
    if args.threads is not None:
        sd.set_num_threads(args.threads)
    if args.isa is not None:
        sd.set_isa(args.isa)

    sd_cuda_error = None
    if device == "cuda":
        if torch is None:
            raise SystemExit(f"--device cuda needs PyTorch (CUDA tensors and events): "
                             f"{env.torch_error}")
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False "
                             "(no NVIDIA GPU or driver visible to PyTorch)")
        info = sd.build_info()
        if not info.get("cuda_compiled"):
            sd_cuda_error = ("stochdepth was built without CUDA (build_info()['cuda_compiled'] is "
                             "False): rebuild with nvcc on PATH (STOCHDEPTH_CUDA=ON)")
        elif not info.get("cuda_device_count"):
            sd_cuda_error = ("stochdepth sees no CUDA device "
                             "(build_info()['cuda_device_count'] == 0)")
        if sd_cuda_error:
            print(f"WARNING: {sd_cuda_error}; stochdepth rows will fail, anchors still run",
                  file=sys.stderr)

    case_names = args.cases.split(",") if args.cases else DEFAULT_CASES[device]
    if case_names == ["all"]:
        case_names = DEFAULT_CASES[device]
    cases = [parse_case(c.strip()) for c in case_names if c.strip()]
    ops = list(OPS[device])
    if args.ops:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        bad = [o for o in ops if o not in OPS[device]]
        if bad:
            raise SystemExit(f"--ops: unknown op(s) {bad} for --device {device}; "
                             f"expected some of {list(OPS[device])}")
    plan = _plan(args.quick, device, args.min_time)

    per_case_rows = sum(len(env.rows_for(device, op)) for op in ops) + 2
    progress = Progress(per_case_rows * len(cases), enabled=not args.no_progress)

    header = [
        f"stochdepth {getattr(sd, '__version__', '?')} benchmark, device={device}, "
        f"p={env.p}, seed={SEED:#x}, offset advanced per call",
    ]
    bi = sd.build_info()
    header.append(f"stochdepth: ISA {bi.get('cpu_isa')}, threads={bi.get('num_threads')}"
                  f"{' (set by --threads)' if args.threads is not None else ' (its default)'}, "
                  f"CUDA compiled: {bi.get('cuda_compiled')}")
    if torch is not None:
        header.append(f"torch {torch.__version__}: threads={torch.get_num_threads()} "
                      "(torch's default, left as is)")
    else:
        header.append(f"torch: not used ({env.torch_error})")
    if env.adapter is None:
        header.append(f"stochdepth.torch adapter rows: skipped ({env.adapter_error})")
    if env.compile_error:
        header.append(f"torch.compile rows: skipped ({env.compile_error})")
    header.append(f"timing: {plan.as_dict()}" + (" (--quick: numbers are not meaningful)"
                                                 if args.quick else ""))
    if device == "cpu":
        mi = machine_info(None, None)
        header.append(f"machine: {mi['cpu_model']}, {mi['cpu_count']} CPUs "
                      f"({mi['cpu_affinity']} usable), {mi['mem_total_gib']} GiB")
    else:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        header.append(f"GPU: {props.name} (cc {props.major}.{props.minor}), torch CUDA "
                      f"{torch.version.cuda}; device-event timing")
    print("\n".join(header))
    sys.stdout.flush()

    results = {
        "schema": 1,
        "device": device,
        "argv": sys.argv[1:] if args.argv is None else args.argv,
        "config": {"p": env.p, "seed": SEED, "mode": MODE, "scaling": SCALING,
                   "timing": plan.as_dict(), "quick": bool(args.quick),
                   "compile_dynamic": bool(args.compile_dynamic),
                   "skipped": {"adapter": env.adapter_error, "compile": env.compile_error,
                               "torch": env.torch_error}},
        "machine": machine_info(torch, sd),
        "cases": [],
    }
    failures = []
    for name, shape, dtype, what in cases:
        progress.note(f"{name}: allocating {shape} {dtype}")
        if env.compile_error is None:
            torch._dynamo.reset()  # drop the last case's compiled code (and what it holds)
        if device == "cpu":
            case = CpuCase(env, shape, dtype)
        else:
            case = CudaCase(env, shape, dtype, sd_cuda_error)
        n_elems = int(np.prod(shape, dtype=np.int64))
        kept = _kept_fraction(sd, shape[0], env.p)
        case_res = {"name": name, "shape": list(shape), "dtype": dtype, "what": what,
                    "p": env.p, "n_elems": n_elems, "tensor_bytes": case.nbytes,
                    "kept_fraction": kept, "ops": {}}

        progress.note(f"{name}: copy bandwidth")
        copy_rows = (_copy_rows_cpu if device == "cpu" else _copy_rows_cuda)(env, case, plan)
        progress.step()
        progress.step()
        ok = [c for c in copy_rows if "error" not in c]
        if device == "cpu":
            ok = [c for c in ok if c["impl"].startswith("stochdepth")]
        best = max(ok, key=lambda c: c["gbps"]) if ok else None
        case_res["copy"] = copy_rows
        case_res["copy_gbps"] = best["gbps"] if best else None
        case_res["copy_ceiling_from"] = best["impl"] if best else None
        for c in copy_rows:
            if "error" in c and c["impl"].startswith("stochdepth"):
                failures.append(f"{name}/copy/{c['impl']}: {c['error']}")

        for op in ops:
            nbytes = op_bytes(op, n_elems, case.nbytes // n_elems, kept)
            op_res = {"title": OPS[device][op], "bytes": nbytes, "bytes_counted": BYTES_NOTE[op],
                      "rows": []}
            for impl in env.rows_for(device, op):
                label, anchor, _ = IMPLS[impl]
                progress.note(f"{name}: {op}: {label}", key=f"{name}: {op}")
                row = {"op": op, "impl": impl, "label": label, "anchor": anchor}
                try:
                    if device == "cpu":
                        fn, setup = case.build(op, impl)
                        times = time_cpu(fn, plan, setup=setup)
                    else:
                        fn, _ = case.build(op, impl)
                        times = time_cuda(fn, plan, torch)
                    row.update(_summary(times, nbytes, case_res["copy_gbps"]))
                except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
                    row["error"] = short_error(exc)
                    if anchor is None:
                        failures.append(f"{name}/{op}/{label}: {row['error']}")
                row["compile_s"] = case.compile_s
                op_res["rows"].append(row)
                progress.step()
            anchors = {r["anchor"]: r["median_ms"] for r in op_res["rows"]
                       if r["anchor"] and "error" not in r}
            for r in op_res["rows"]:
                if "error" not in r:
                    r["speedup"] = {k: v / r["median_ms"] for k, v in anchors.items()
                                    if r["median_ms"] > 0}
            case_res["ops"][op] = op_res
        case.free()
        del case
        progress.clear()
        _print_case(case_res, device)
        results["cases"].append(case_res)
    progress.finish()
    if device == "cpu" and not args.no_keras and not args.no_torch:
        results["keras"] = _keras_rows(args.p, 3 if args.quick else 10)
    results["failures"] = failures
    if failures:
        print("\nstochdepth rows that FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
    return results, failures


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m stochdepth.bench",
        description="stochdepth vs NumPy / torchvision / timm / torch.compile: time, GB/s of "
                    "the bytes the op must move, % of the measured copy bandwidth, speed-ups.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated: {', '.join(CASES)}, 'all' (the device's defaults), "
                         "or a custom AxBxC:dtype. Default: cpu "
                         f"{','.join(DEFAULT_CASES['cpu'])}; "
                         f"cuda {','.join(DEFAULT_CASES['cuda'])}")
    ap.add_argument("--ops", default=None,
                    help=f"comma-separated subset; cpu: {','.join(OPS['cpu'])}; "
                         f"cuda: {','.join(OPS['cuda'])}")
    ap.add_argument("--p", type=float, default=0.8, help="survival probability (default 0.8)")
    ap.add_argument("--quick", action="store_true",
                    help="a few reps per row: a smoke test, not a measurement")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of timed work per row (default 0.3 on cpu, 0.1 on cuda)")
    ap.add_argument("--json", metavar="FILE", default=None,
                    help="write every number and the machine's description to FILE")
    ap.add_argument("--threads", type=int, default=None,
                    help="stochdepth.set_num_threads(N) first (torch keeps its default)")
    ap.add_argument("--isa", default=None, help="stochdepth.set_isa(ISA) first (scalar|avx2)")
    ap.add_argument("--no-torch", action="store_true", help="NumPy and stochdepth rows only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-adapter", action="store_true", help="skip the stochdepth.torch rows")
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="torch.compile(dynamic=True): one compile for all shapes (faster to "
                         "compile; default dynamic=False, a kernel specialised per case)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--no-keras", action="store_true",
                    help="skip the Keras rows (stochdepth.keras vs kerasfactory, torch backend)")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    if args.min_time is None:
        args.min_time = 0.3 if args.device == "cpu" else 0.1
    if not 0.0 <= args.p <= 1.0 or math.isnan(args.p):
        ap.error(f"--p must be in [0, 1], got {args.p}")
    return args


def _keras_rows(p, reps):
    """stochdepth.keras vs kerasfactory's layer on Keras's torch backend (issue 5's rows)."""
    try:
        from stochdepth.bench.keras_rows import KERASFACTORY_SHAPE, keras_adapter_rows

        rows = keras_adapter_rows(KERASFACTORY_SHAPE, "float32", p, reps)
    except Exception as exc:  # noqa: BLE001 - keras or a backend missing: say so, carry on
        print(f"\nKeras rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    print(f"\nKeras layer on the torch backend, {KERASFACTORY_SHAPE} float32, p={p} "
          f"(median of {reps}, ms)")
    base = {(r["op"]): r.get("median_ms") for r in rows if r["impl"] == "kerasfactory"}
    for r in rows:
        if "error" in r:
            print(f"  {r['impl']:18s} {r['op']:17s} FAILED: {r['error']}")
            continue
        ref = base.get(r["op"])
        vs = ""
        if ref and r["impl"] != "kerasfactory":
            vs = f"  {ref / r['median_ms']:5.1f}x vs kerasfactory"
        print(f"  {r['impl']:18s} {r['op']:17s} {r['median_ms']:9.2f}{vs}")
    return {"shape": list(KERASFACTORY_SHAPE), "rows": rows}


def main(argv=None):
    args = parse_args(argv)
    results, failures = run(args)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 1 if failures else 0

