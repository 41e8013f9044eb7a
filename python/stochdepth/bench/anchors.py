"""The anchors, defined once: timm's `drop_path` and torchvision's `stochastic_depth`.

They come from the installed packages where those import. timm's `timm.layers` imports
torchvision, so where only torchvision is missing or broken timm's own `timm/layers/drop.py`
(which needs only torch) is loaded by path. Where neither works, the documented formula below
stands in and the row is labelled "(formula)" (docs/design.md, "Measuring speed").
STOCHDEPTH_BENCH_NO_TIMM=1 / STOCHDEPTH_BENCH_NO_TORCHVISION=1 force the formula.

ROWS: the anchor rows (Row objects, stochdepth.bench.rows), on the CPU and the GPU: the NumPy
expression, torchvision's and timm's functions in eager PyTorch followed by the add, and
torch.compile of the torchvision function plus the add. Backward rows are torch autograd with
respect to the residual. Each anchor row is a "vs" column of the tables.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import numpy as np

from stochdepth.bench._util import short_error
from stochdepth.bench.rows import Row

__all__ = ["Anchor", "ROWS", "load_anchors", "timm_formula", "torchvision_formula"]

NO_TIMM = "STOCHDEPTH_BENCH_NO_TIMM"
NO_TORCHVISION = "STOCHDEPTH_BENCH_NO_TORCHVISION"


class Anchor:
    """`fn(x, drop_p, training)` with its provenance: `real` (the package's own code) or the
    formula, and `source`, one line saying which and why."""

    def __init__(self, name, fn, real, source):
        self.name = name
        self.fn = fn
        self.real = real
        self.source = source

    def label(self, base):
        return base if self.real else f"{base} (formula)"

    def as_dict(self):
        return {"real": self.real, "source": self.source}


def torchvision_formula(torch):
    """What torchvision.ops.stochastic_depth(x, drop_p, "row", training) computes.

    The identity when not training or drop_p == 0; otherwise x * noise, noise of shape
    [B, 1, ...] made by torch.empty + bernoulli_(1 - drop_p) in x's dtype, divided in place by
    1 - drop_p if > 0.
    """

    def stochastic_depth(x, drop_p, training=True):
        if drop_p == 0.0 or not training:
            return x
        keep = 1.0 - drop_p
        noise_shape = [x.shape[0]] + [1] * (x.ndim - 1)
        noise = torch.empty(noise_shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0:
            noise.div_(keep)
        return x * noise

    return stochastic_depth


def timm_formula(x, drop_p, training=True):
    """What timm.layers.drop_path(x, drop_p, training, scale_by_keep=True) computes.

    The identity when drop_p == 0 or not training; otherwise x * r with r of shape [B, 1, ...]
    made by x.new_empty + bernoulli_(1 - drop_p), divided in place by 1 - drop_p when > 0.
    """
    if drop_p == 0.0 or not training:
        return x
    keep = 1.0 - drop_p
    r = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        r.div_(keep)
    return x * r


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _timm_drop_file():
    """timm's drop_path from timm/layers/drop.py, loaded alone (timm's __init__ is not run)."""
    spec = importlib.util.find_spec("timm")  # a top-level find_spec imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "layers", "drop.py")
    file_spec = importlib.util.spec_from_file_location("_stochdepth_bench_timm_drop", path)
    if file_spec is None or not os.path.isfile(path):
        raise ImportError(f"no {path}")
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.drop_path


def _load_timm():
    if os.environ.get(NO_TIMM, "") not in ("", "0"):
        return Anchor("timm", timm_formula, False, f"formula ({NO_TIMM} is set)")
    try:
        from timm.layers import drop_path
    except Exception as exc:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        import_error = short_error(exc)
        try:
            drop_path = _timm_drop_file()
        except Exception as exc2:  # noqa: BLE001
            return Anchor("timm", timm_formula, False,
                          f"formula (timm.layers: {import_error}; drop.py: {short_error(exc2)})")
        source = (f"timm {_version('timm')}: timm/layers/drop.py loaded by path "
                  f"(timm.layers: {import_error})")
    else:
        source = f"timm {_version('timm')}: timm.layers.drop_path"

    def fn(x, drop_p, training=True):
        return drop_path(x, drop_p, training, scale_by_keep=True)

    return Anchor("timm", fn, True, source)


def _load_torchvision(torch):
    if os.environ.get(NO_TORCHVISION, "") not in ("", "0"):
        return Anchor("torchvision", torchvision_formula(torch), False,
                      f"formula ({NO_TORCHVISION} is set)")
    try:
        from torchvision.ops import stochastic_depth
    except Exception as exc:  # noqa: BLE001 - torchvision built for another torch raises RuntimeError
        return Anchor("torchvision", torchvision_formula(torch), False,
                      f"formula (torchvision.ops: {short_error(exc)})")

    def fn(x, drop_p, training=True):
        return stochastic_depth(x, drop_p, "row", training)

    return Anchor("torchvision", fn, True,
                  f"torchvision {_version('torchvision')}: torchvision.ops.stochastic_depth")


def load_anchors(torch):
    """{"timm": Anchor, "torchvision": Anchor} for the rows that run on torch tensors."""
    return {"torchvision": _load_torchvision(torch), "timm": _load_timm()}


# -- the anchor rows. A builder takes the case's tensors (cpu_rows.CpuTensors or
# cuda_rows.CudaTensors); the torch rows use only what both have (t_shortcut, ..., compiled).
def _numpy_rows():
    def fwd(d):
        sc, r = d.shortcut, d.residual
        return (lambda: sc + d.np_mask() * r), None

    def fwd_out(d):
        sc, r, out = d.shortcut, d.residual, d.out

        def numpy_out():
            np.multiply(d.np_mask(), r, out=out)
            np.add(sc, out, out=out)

        return numpy_out, None

    def fwd_inplace(d):
        r = d.residual
        buf, restore = d.inplace_numpy()
        return (lambda: np.add(buf, d.np_mask() * r, out=buf)), restore

    def infer(d):
        sc, r = d.shortcut, d.residual
        return (lambda: sc + r), None  # inference factor 1 with scaling="training"

    def bwd(d):
        g = d.grad
        return (lambda: d.np_mask() * g), None

    return {"fwd": fwd, "fwd_out": fwd_out, "fwd_inplace": fwd_inplace, "infer": infer,
            "bwd": bwd}


def _eager_rows(source):
    """The ops of an anchor `fn(x, drop_p, training)` in eager PyTorch, followed by the add."""

    def anchor(d):
        return d.env.anchors[source].fn, d.drop

    def fwd(d):
        f, drop = anchor(d)
        sc, r = d.t_shortcut, d.t_residual
        return (lambda: sc + f(r, drop, True)), None

    def fwd_out(d):
        f, drop = anchor(d)
        torch, sc, r, out = d.torch, d.t_shortcut, d.t_residual, d.t_out
        return (lambda: torch.add(sc, f(r, drop, True), out=out)), None

    def fwd_inplace(d):
        f, drop = anchor(d)
        r = d.t_residual
        buf, restore = d.inplace_torch()
        return (lambda: buf.add_(f(r, drop, True))), restore

    def infer(d):
        f, drop = anchor(d)
        sc, r = d.t_shortcut, d.t_residual
        return (lambda: sc + f(r, drop, False)), None

    def bwd(d):
        f, drop = anchor(d)
        sc, leaf = d.t_shortcut, d.t_leaf
        return d.autograd_backward(lambda: sc + f(leaf, drop, True))

    def fwdbwd(d):
        f, drop = anchor(d)
        return d.autograd_step(lambda a, b: a + f(b, drop, True)), None

    return {"fwd": fwd, "fwd_out": fwd_out, "fwd_inplace": fwd_inplace, "infer": infer,
            "bwd": bwd, "fwdbwd": fwdbwd}


def _compiled_rows(source):
    """The same ops, torch.compile'd (compiled by an untimed first call, see compiled())."""

    def anchor(d):
        return d.env.anchors[source].fn, d.drop

    def fwd(d):
        f, drop = anchor(d)
        sc, r = d.t_shortcut, d.t_residual
        cf = d.compiled(lambda a, b: a + f(b, drop, True), lambda c: c(sc, r))
        return (lambda: cf(sc, r)), None

    def fwd_out(d):
        f, drop = anchor(d)
        sc, r, out = d.t_shortcut, d.t_residual, d.t_out

        def add_out(a, b, o):
            o.copy_(a + f(b, drop, True))
            return o

        cf = d.compiled(add_out, lambda c: c(sc, r, out))
        return (lambda: cf(sc, r, out)), None

    def fwd_inplace(d):
        f, drop = anchor(d)
        r = d.t_residual
        buf, restore = d.inplace_torch()

        def add_inplace(a, b):
            a.add_(f(b, drop, True))
            return a

        cf = d.compiled(add_inplace, lambda c: c(buf, r))
        return (lambda: cf(buf, r)), restore

    def infer(d):
        f, drop = anchor(d)
        sc, r = d.t_shortcut, d.t_residual
        cf = d.compiled(lambda a, b: a + f(b, drop, False), lambda c: c(sc, r))
        return (lambda: cf(sc, r)), None

    def compiled_forward(d):
        f, drop = anchor(d)
        grad, sc, leaf, g = d.torch.autograd.grad, d.t_shortcut, d.t_leaf, d.t_grad
        return d.compiled(lambda a, b: a + f(b, drop, True),
                          lambda c: grad(c(sc, leaf), leaf, g))

    def bwd(d):
        cf = compiled_forward(d)
        sc, leaf = d.t_shortcut, d.t_leaf
        return d.autograd_backward(lambda: cf(sc, leaf))

    def fwdbwd(d):
        return d.autograd_step(compiled_forward(d)), None

    return {"fwd": fwd, "fwd_out": fwd_out, "fwd_inplace": fwd_inplace, "infer": infer,
            "bwd": bwd, "fwdbwd": fwdbwd}


# In the order of the tables and their "vs" columns.
ROWS = [
    Row("numpy", "NumPy expression", framework="numpy", anchor="numpy", column="vs NumPy",
        ops=_numpy_rows()),
    Row("tv", "torchvision stochastic_depth, eager", framework="torch", devices=("cpu", "cuda"),
        anchor="torchvision", column="vs tv", source="torchvision",
        ops=_eager_rows("torchvision")),
    Row("timm", "timm drop_path, eager", framework="torch", devices=("cpu", "cuda"),
        anchor="timm", column="vs timm", source="timm", ops=_eager_rows("timm")),
    Row("compile", "torch.compile(torchvision stochastic_depth)", framework="torch.compile",
        devices=("cpu", "cuda"), anchor="compile", column="vs compile", source="torchvision",
        ops=_compiled_rows("torchvision")),
]
