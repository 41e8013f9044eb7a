"""The ceiling an op is judged against, measured in the same rounds as the op's rows.

Four primitives, each timed on one tensor of the case with several implementations (the best
median counts): copy (read + write), add (two reads, one write), add in place, and a
write-only fill. An op's ceiling time is the least over the ways `cases.ceiling_models` gives
to move its bytes with these primitives (docs/design.md, "Measuring speed"), so the ceiling
has the op's own read/write mix and is the most demanding of the honest choices.

ROWS: the implementations, one Row per primitive and implementation (its `ops` keyed by the
primitive); the driver times those of an op's primitives in the same rounds as the op's rows.
"""

from __future__ import annotations

import numpy as np

from stochdepth.bench.cases import PRIMITIVE_TENSORS, SCALING, SEED, ceiling_models
from stochdepth.bench.rows import Row

__all__ = ["ROWS", "SD_ADD", "SD_ADD_INPLACE", "cache_flag", "op_ceiling"]

# The library's inference forward with factor 1 is an add with its streaming stores and threads,
# as _core.stream_copy is its copy: without it no add here would have both, and rows whose mix
# leans on reads would pass 100% of a ceiling that was merely slow.
SD_ADD = "stochdepth forward at inference (a + 1*b)"
SD_ADD_INPLACE = "stochdepth forward at inference, in place (a += 1*b)"
SD_FILL = "stochdepth backward, p=0 (writes zeros only)"
_INFER = {"training": False, "seed": None, "scaling": SCALING}
# NumPy's add computes float16 and bfloat16 in software, one thread: never the best, it would
# only lengthen the run.
_NUMPY_ADD_DTYPES = ("float32", "float64")


# -- on the CPU (cpu_rows.CpuTensors: the case's arrays, written into its scratch buffer)
def _sd_copy(d):
    sd, sc, dst = d.sd, d.shortcut, d.scratch
    return (lambda: sd._core.stream_copy(dst, sc)), None


def _np_copy(d):
    sc, dst = d.shortcut, d.scratch
    return (lambda: np.copyto(dst, sc)), None


def _sd_add(d):
    sd, sc, r, dst = d.sd, d.shortcut, d.residual, d.scratch
    return (lambda: sd.forward(sc, r, 1.0, **_INFER, out=dst)), None


def _np_add(d):
    sc, r, dst = d.shortcut, d.residual, d.scratch
    return (lambda: np.add(sc, r, out=dst)), None


def _sd_add_inplace(d):
    sd, r, dst = d.sd, d.residual, d.scratch
    return (lambda: sd.forward(dst, r, 1.0, **_INFER, out=dst)), None


def _np_add_inplace(d):
    r, dst = d.residual, d.scratch
    return (lambda: np.add(dst, r, out=dst)), None


def _np_fill(d):
    dst = d.scratch
    return (lambda: dst.fill(0)), None


def _sd_fill(d):
    sd, r, dst = d.sd, d.residual, d.scratch
    return (lambda: sd.backward(r, 0.0, seed=SEED, scaling=SCALING, out=dst)), None


# -- torch, on either device (t_scratch is the destination)
def _torch_copy(d):
    sc, dst = d.t_shortcut, d.t_scratch
    return (lambda: dst.copy_(sc)), None


def _torch_add(d):
    torch, sc, r, dst = d.torch, d.t_shortcut, d.t_residual, d.t_scratch
    return (lambda: torch.add(sc, r, out=dst)), None


def _torch_add_inplace(d):
    r, dst = d.t_residual, d.t_scratch
    return (lambda: dst.add_(r)), None


def _torch_zero(d):
    dst = d.t_scratch
    return (lambda: dst.zero_()), None


# -- the library on the GPU (cuda_rows.CudaTensors, the case's stream); a library that cannot
# run there fails in the call, so that the primitive's other implementations still count.
def _cuda_copy(d):
    sd, sc, dst, nbytes = d.sd, d.t_shortcut, d.t_scratch, d.nbytes

    def sd_copy():
        d.check_library()
        sd._core.stream_copy_raw(dst.data_ptr(), sc.data_ptr(), nbytes, d.device_index,
                                 d.stream)

    return sd_copy, None


def _cuda_add(d):
    sd, sc, r, dst = d.sd, d.t_shortcut, d.t_residual, d.t_scratch

    def sd_add():
        d.check_library()
        sd.forward(sc, r, 1.0, **_INFER, out=dst, stream=d.stream)

    return sd_add, None


def _cuda_fill(d):
    sd, r, dst = d.sd, d.t_residual, d.t_scratch

    def sd_fill():
        d.check_library()
        sd.backward(r, 0.0, seed=SEED, scaling=SCALING, out=dst, stream=d.stream)

    return sd_fill, None


def _impl(name, prim, build, framework, devices=("cpu",), **kw):
    """A ceiling row: one implementation of one primitive, named (and labelled) as listed."""
    return Row(name, name, ops={prim: build}, framework=framework, devices=devices, **kw)


# Within a primitive, in the order they are timed and listed; the library's own are `ours`.
CPU, CUDA, BOTH = ("cpu",), ("cuda",), ("cpu", "cuda")
ROWS = [
    _impl("stochdepth _core.stream_copy", "copy", _sd_copy, "stochdepth", ours=True),
    _impl("np.copyto (1 thread)", "copy", _np_copy, "numpy"),
    _impl("torch .copy_", "copy", _torch_copy, "torch", BOTH),
    _impl("stochdepth _core.stream_copy_raw", "copy", _cuda_copy, "torch", CUDA, ours=True),
    _impl(SD_ADD, "add", _sd_add, "stochdepth", ours=True),
    _impl("np.add(out=) (1 thread)", "add", _np_add, "numpy", dtypes=_NUMPY_ADD_DTYPES),
    _impl("torch.add(out=)", "add", _torch_add, "torch", BOTH),
    _impl(SD_ADD, "add", _cuda_add, "torch", CUDA, ours=True),
    _impl(SD_ADD_INPLACE, "add_inplace", _sd_add_inplace, "stochdepth", ours=True),
    _impl("np.add(a, b, out=a) (1 thread)", "add_inplace", _np_add_inplace, "numpy",
          dtypes=_NUMPY_ADD_DTYPES),
    _impl("torch .add_", "add_inplace", _torch_add_inplace, "torch", BOTH),
    _impl("ndarray.fill(0) (1 thread)", "fill", _np_fill, "numpy"),
    _impl(SD_FILL, "fill", _sd_fill, "stochdepth", ours=True),
    _impl("torch .zero_()", "fill", _torch_zero, "torch", BOTH),
    _impl(SD_FILL, "fill", _cuda_fill, "torch", CUDA, ours=True),
]


def op_ceiling(op, kept, tensor_bytes, nbytes, measured):
    """The op's ceiling from its primitives' summaries, {primitive: {implementation name:
    timing.summarize(...)}}.

    Returns {"ms", "gbps", "model", "models", "primitives"}; "ms" is None when no model had all
    of its primitives measured.
    """
    prims = {}
    for prim, impls in measured.items():
        p = prims[prim] = {"impls": dict(impls), "best": None, "ms": None, "gbps": None}
        for label, s in impls.items():
            if "error" not in s and (p["ms"] is None or s["median_ms"] < p["ms"]):
                p["best"], p["ms"] = label, s["median_ms"]
                p["gbps"] = PRIMITIVE_TENSORS[prim] * tensor_bytes / (s["median_ms"] * 1e6)
    models = []
    for name, mix in ceiling_models(op, kept):
        if all(prims.get(p, {}).get("ms") is not None for p in mix):
            ms = sum(calls * prims[p]["ms"] for p, calls in mix.items())
            models.append({"name": name, "mix": mix, "ms": ms,
                           "gbps": nbytes / (ms * 1e6) if ms > 0 else None})
        else:
            models.append({"name": name, "mix": mix, "ms": None, "gbps": None,
                           "missing": sorted(p for p in mix if prims.get(p, {}).get("ms") is None)})
    done = [m for m in models if m["ms"] is not None]
    best = min(done, key=lambda m: m["ms"]) if done else None
    return {"ms": best["ms"] if best else None, "gbps": best["gbps"] if best else None,
            "model": best["name"] if best else None, "models": models, "primitives": prims}


def cache_flag(op_res, ceiling, tensor_bytes, llc):
    """Marks an op whose bytes, or one of its ceiling primitives' bytes, are under 2x the LLC."""
    sets = [("the op", op_res["bytes"])]
    sets += [(f"the {p} ceiling", PRIMITIVE_TENSORS[p] * tensor_bytes)
             for p in ceiling["primitives"]]
    name, smallest = min(sets, key=lambda s: s[1])
    op_res["working_set_bytes"] = smallest
    op_res["fits_in_cache"] = bool(llc["bytes"]) and smallest < 2 * llc["bytes"]
    op_res["cache_note"] = (
        f"{name} moves {smallest / 1e6:.1f} MB, under 2x the last-level cache "
        f"({llc['bytes'] / 2**20:.1f} MiB): partly cache bandwidth, not memory"
        if op_res["fits_in_cache"] else None)
