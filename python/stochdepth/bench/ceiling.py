"""The ceiling an op is judged against, measured in the same rounds as the op's rows.

Four primitives, each timed on one tensor of the case with several implementations (the best
median counts): copy (read + write), add (two reads, one write), add in place, and a
write-only fill. An op's ceiling time is the least over the ways `cases.ceiling_models` gives
to move its bytes with these primitives (docs/design.md, "Measuring speed"), so the ceiling
has the op's own read/write mix and is the most demanding of the honest choices.
"""

from __future__ import annotations

import numpy as np

from stochdepth.bench.cases import PRIMITIVE_TENSORS, SCALING, SEED, ceiling_models
from stochdepth.bench.timing import Entry

__all__ = ["CEILING_PREFIX", "cpu_entries", "cuda_entries", "op_ceiling"]

CEILING_PREFIX = "ceiling:"
# The library's inference forward with factor 1 is an add with its streaming stores and threads,
# as _core.stream_copy is its copy: without it no add here would have both, and rows whose mix
# leans on reads would pass 100% of a ceiling that was merely slow.
SD_ADD = "stochdepth forward at inference (a + 1*b)"
SD_ADD_INPLACE = "stochdepth forward at inference, in place (a += 1*b)"
_INFER = {"training": False, "seed": None, "scaling": SCALING}


def _key(prim, label):
    return f"{CEILING_PREFIX}{prim}:{label}"


def split_key(key):
    """'ceiling:copy:np.copyto' -> ('copy', 'np.copyto')."""
    prim, label = key[len(CEILING_PREFIX):].split(":", 1)
    return prim, label


def cpu_entries(env, case, prims):
    """Entries timing each primitive in `prims` on the CPU case's tensors and scratch buffer.

    NumPy's add is left out for float16 and bfloat16: it computes them in software, one
    thread, so it is never the best and would only lengthen the run.
    """
    sd, torch = env.sd, env.torch
    sc, r, dst = case.shortcut, case.residual, case.scratch
    half = case.dtype.itemsize == 2
    impls = {
        "copy": [("stochdepth _core.stream_copy", lambda: sd._core.stream_copy(dst, sc)),
                 ("np.copyto (1 thread)", lambda: np.copyto(dst, sc))],
        "add": [(SD_ADD, lambda: sd.forward(sc, r, 1.0, **_INFER, out=dst))]
        + ([] if half else [("np.add(out=) (1 thread)", lambda: np.add(sc, r, out=dst))]),
        "add_inplace": [(SD_ADD_INPLACE, lambda: sd.forward(dst, r, 1.0, **_INFER, out=dst))]
        + ([] if half else [("np.add(a, b, out=a) (1 thread)", lambda: np.add(dst, r, out=dst))]),
        "fill": [("ndarray.fill(0) (1 thread)", lambda: dst.fill(0)),
                 ("stochdepth backward, p=0 (writes zeros only)",
                  lambda: sd.backward(r, 0.0, seed=SEED, scaling=SCALING, out=dst))],
    }
    if torch is not None:
        tsc, tr, tdst = case.t_shortcut, case.t_residual, case.t_scratch
        impls["copy"].append(("torch .copy_", lambda: tdst.copy_(tsc)))
        impls["add"].append(("torch.add(out=)", lambda: torch.add(tsc, tr, out=tdst)))
        impls["add_inplace"].append(("torch .add_", lambda: tdst.add_(tr)))
        impls["fill"].append(("torch .zero_()", lambda: tdst.zero_()))
    return [Entry(_key(p, label), fn) for p in prims for label, fn in impls[p]]


def cuda_entries(env, case, prims):
    """The same on a CUDA case (torch tensors on the device, the case's stream)."""
    sd, torch = env.sd, env.torch
    sc, r, dst = case.shortcut, case.residual, case.scratch
    nbytes = case.nbytes

    def sd_copy():
        if case.sd_cuda_error:
            raise RuntimeError(case.sd_cuda_error)
        sd._core.stream_copy_raw(dst.data_ptr(), sc.data_ptr(), nbytes, case.device_index,
                                 case.stream)

    def sd_fill():
        if case.sd_cuda_error:
            raise RuntimeError(case.sd_cuda_error)
        sd.backward(r, 0.0, seed=SEED, scaling=SCALING, out=dst, stream=case.stream)

    def sd_add():
        if case.sd_cuda_error:
            raise RuntimeError(case.sd_cuda_error)
        sd.forward(sc, r, 1.0, **_INFER, out=dst, stream=case.stream)

    impls = {
        "copy": [("torch .copy_", lambda: dst.copy_(sc)),
                 ("stochdepth _core.stream_copy_raw", sd_copy)],
        "add": [("torch.add(out=)", lambda: torch.add(sc, r, out=dst)), (SD_ADD, sd_add)],
        "add_inplace": [("torch .add_", lambda: dst.add_(r))],
        "fill": [("torch .zero_()", lambda: dst.zero_()),
                 ("stochdepth backward, p=0 (writes zeros only)", sd_fill)],
    }
    return [Entry(_key(p, label), fn) for p in prims for label, fn in impls[p]]


def op_ceiling(op, kept, tensor_bytes, nbytes, summaries):
    """The op's ceiling from its primitives' summaries ({entry key: timing.summarize(...)}).

    Returns {"ms", "gbps", "model", "models", "primitives"}; "ms" is None when no model had all
    of its primitives measured.
    """
    prims = {}
    for key, s in summaries.items():
        prim, label = split_key(key)
        p = prims.setdefault(prim, {"impls": {}, "best": None, "ms": None, "gbps": None})
        p["impls"][label] = s
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
