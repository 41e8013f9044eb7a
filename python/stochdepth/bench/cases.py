"""What the benchmark measures: the cases (shapes), the ops, and the bytes each op must move
together with the read/write mix its ceiling is built from. The rows timed on them are Row
objects in the rows modules (see stochdepth.bench.rows).

Bytes are counted as the op must move them: a dropped sample's residual is never read
(docs/design.md, "Measuring speed"). Every implementation of an op is judged by that count.
"""

from __future__ import annotations

import math

import numpy as np

from stochdepth.bench.rows import Case

__all__ = ["CASES", "DEFAULT_CASES", "OPS", "SEED", "SCALING", "MODE", "BYTES_NOTE", "op_bytes",
           "ceiling_models", "parse_case", "np_dtype", "np_to_torch", "kept_fraction"]

SEED = 0x5EED5EED
SCALING = "training"  # timm's and torchvision's convention, so every row computes the same
MODE = "row"

# name -> (shape, dtype, what it stands for)
CASES = {
    "big-f32": ((256, 197, 768), "float32", "ViT-B/16 tokens, batch >= 256 (past 2x LLC)"),
    "big-bf16": ((512, 197, 768), "bfloat16", "ViT-B/16 tokens, batch >= 512 (past 2x LLC)"),
    "kerasfactory": ((32, 64, 64, 128), "float32", "kerasfactory's example"),
    "vit-f32": ((128, 197, 768), "float32", "ViT-B/16 tokens, batch 128"),
    "vit-bf16": ((128, 197, 768), "bfloat16", "ViT-B/16 tokens, batch 128"),
    "vit256-f32": ((256, 197, 768), "float32", "ViT-B/16 tokens, batch 256"),
    "vit256-bf16": ((256, 197, 768), "bfloat16", "ViT-B/16 tokens, batch 256"),
    "vit1024-bf16": ((1024, 197, 768), "bfloat16", "ViT-B/16 tokens, batch 1024"),
    "launch": ((8, 197, 384), "float32", "small: launch overhead"),
    "small": ((16, 33, 40), "float32", "smoke test (odd sizes)"),
}
# Cases whose batch grows (in steps of 64) until every op's bytes exceed twice the machine's
# last-level cache, so that they measure memory and not cache on hosts with a huge L3.
GROWN_CASES = ("big-f32", "big-bf16")
MAX_GROWN_TENSOR_BYTES = 512 * 2**20  # ~12 such tensors live at once: stay under ~8 GB
DEFAULT_CASES = {
    "cpu": ["big-f32", "big-bf16"],
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

def op_bytes(op, n_elems, itemsize, kept):
    """Bytes an op must move (docs/design.md, "Measuring speed": a dropped sample's residual
    is never read, and in place a dropped sample is not touched)."""
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

# Bytes of one call of each ceiling primitive, in tensors: copy reads one and writes one, add
# reads two and writes one (in place: into one of them), fill only writes.
PRIMITIVE_TENSORS = {"copy": 2, "add": 3, "add_inplace": 3, "fill": 1}


def ceiling_models(op, kept):
    """Ways to move an op's bytes with the ceiling primitives: [(name, {primitive: calls})].

    A primitive call moves one tensor's worth (PRIMITIVE_TENSORS); each model moves exactly
    op_bytes. The op's ceiling time is the least over the models whose primitives were all
    measured, so the ceiling is the most demanding one: "copy rate" (every byte at the copy's
    read+write rate) is always there; the others follow the op's own read/write mix (kept rows
    an add, dropped rows a copy, and in backward a write-only fill for the dropped rows).
    """
    k = float(kept)
    models = {
        "fwd": [("add on kept rows, copy on dropped", {"add": k, "copy": 1.0 - k})],
        "fwd_inplace": [("add in place on kept rows", {"add_inplace": k})],
        "infer": [("add", {"add": 1.0})],
        "bwd": [("copy on kept rows, fill on dropped", {"copy": k, "fill": 1.0 - k})],
        "fwdbwd": [("forward (add + copy) + backward (copy + fill)",
                    {"add": k, "copy": 1.0, "fill": 1.0 - k})],
    }
    models["fwd_out"] = models["fwd"]
    copy_calls = op_bytes(op, 1, 1, k) / PRIMITIVE_TENSORS["copy"]
    return [("copy rate", {"copy": copy_calls})] + models[op]


def primitives_for(op):
    """The ceiling primitives an op's models need, in a fixed order."""
    needed = {p for _, mix in ceiling_models(op, 0.5) for p in mix}
    return [p for p in PRIMITIVE_TENSORS if p in needed]


def _grow_batch(shape, dtype, llc_bytes, p, mem_available):
    """The batch (a multiple of 64, at least shape[0]) whose smallest op moves > 2x the LLC."""
    if not llc_bytes:
        return shape[0]
    row_bytes = math.prod(shape[1:]) * np_dtype(dtype).itemsize
    smallest = min(op_bytes(op, 1, 1, p) for op in OPS["cpu"])  # in tensors
    smallest = max(smallest, 0.25)  # p near 0 would ask for unbounded tensors
    want = math.ceil(2 * llc_bytes / smallest / row_bytes / 64) * 64
    cap = MAX_GROWN_TENSOR_BYTES
    if mem_available:
        cap = min(cap, mem_available // 16)
    return max(shape[0], min(want, max(cap // row_bytes // 64 * 64, 64)))


def parse_case(name, llc_bytes=None, p=0.8, mem_available=None):
    """The Case of a name from CASES or of a custom 'AxBxC:dtype' (e.g. 64x197x768:float16),
    at survival probability `p`. A GROWN_CASES batch is grown past 2x `llc_bytes`."""
    if name in CASES:
        shape, dtype, what = CASES[name]
        if name in GROWN_CASES:
            batch = _grow_batch(shape, dtype, llc_bytes, p, mem_available)
            if batch != shape[0]:
                what = f"{what}; batch {shape[0]} grown to {batch}"
            shape = (batch,) + tuple(shape[1:])
        return Case(name, tuple(shape), dtype, what, p)
    if ":" in name:
        dims, dtype = name.split(":", 1)
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if shape and all(d > 0 for d in shape) and dtype in (
                "float16", "bfloat16", "float32", "float64"):
            return Case(name, shape, dtype, "custom", p)
    raise SystemExit(
        f"--cases: unknown case {name!r}; expected one of {', '.join(CASES)} or a custom "
        "'AxBxC:dtype' with dtype float16|bfloat16|float32|float64")


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def np_to_torch(torch, a):
    """A torch CPU tensor sharing `a`'s memory (bfloat16 through a uint16 view)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def kept_fraction(sd, batch, p, n=256):
    """Mean kept fraction of the stochdepth mask over offsets 0..n-1 (for the byte counts)."""
    total = 0
    for off in range(n):
        total += int(np.count_nonzero(sd.mask(batch, p, seed=SEED, offset=off, mode=MODE)))
    return total / (n * batch)
