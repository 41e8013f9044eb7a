"""The compact (StochasticResidual) CUDA kernels' bandwidth, as a fraction of the library's own
device copy timed in the same interleaved rounds (benchmarks/gpu_check.sh, target ">= 80% of
copy"). Bytes counted are the bytes each op must move (docs/design.md, "Measuring speed"):

    copy     2 x the tensor (read + write)
    scatter  shortcut + kept residual rows + output  (forward, compact_input)
    gather   kept rows of grad_out + the compact grad (backward, compact_output)

The JSON is rewritten after every round, so a run killed by its deadline keeps what it measured.
`--dry-run` runs the same code on the CPU (NumPy buffers, wall-clock timing): plumbing only, its
numbers are not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import stochdepth
from stochdepth import reference


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-in: plumbing only")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--inner", type=int, default=197 * 768)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--p", type=float, default=0.8)
    ap.add_argument("--rounds", type=int, default=15)
    return ap.parse_args(argv)


class Buffers:
    """The op's buffers on the device (torch.cuda) or, in a dry run, on the CPU (NumPy)."""

    def __init__(self, args, n_kept):
        self.dry = args.dry_run
        itemsize = 4 if args.dtype == "float32" else 2
        self.row_bytes = args.inner * itemsize
        shapes = {"sc": args.batch, "res": n_kept, "out": args.batch, "grad": args.batch,
                  "gout": n_kept, "src": args.batch, "dst": args.batch}
        if self.dry:
            self.bufs = {k: np.ones(max(rows, 1) * self.row_bytes, np.uint8)
                         for k, rows in shapes.items()}
            self.device, self.stream = -1, 0
        else:
            import torch

            self.torch = torch
            self.bufs = {k: torch.ones(max(rows, 1) * self.row_bytes, dtype=torch.uint8,
                                       device="cuda") for k, rows in shapes.items()}
            self.device = torch.cuda.current_device()
            self.stream = torch.cuda.current_stream().cuda_stream

    def ptr(self, name):
        b = self.bufs[name]
        return b.ctypes.data if self.dry else b.data_ptr()

    def time_ms(self, fn):
        if self.dry:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def main(argv=None):
    args = parse_args(argv)
    core = stochdepth._core
    keep = reference.mask(args.batch, args.p, seed=1, offset=0)
    n_kept = int(keep.sum())
    b = Buffers(args, n_kept)
    dt, scaling = getattr(core.DType, args.dtype), core.Scaling.training
    common = (1, args.batch, args.inner, dt, args.p, True, False, scaling, 1, 0, b.device,
              b.stream)
    tensor = args.batch * b.row_bytes
    ops = {
        "copy": (lambda: core.stream_copy_raw(b.ptr("dst"), b.ptr("src"), tensor, b.device,
                                              b.stream), 2 * tensor),
        "scatter": (lambda: core.run_raw(b.ptr("sc"), b.ptr("res"), b.ptr("out"), *common,
                                         compact_input=True),
                    (2 * args.batch + n_kept) * b.row_bytes),
        "gather": (lambda: core.run_raw(0, b.ptr("grad"), b.ptr("gout"), *common,
                                        compact_output=True), 2 * n_kept * b.row_bytes),
    }
    for fn, _ in ops.values():  # warm-up: first launches, page faults
        fn()
    times = {name: [] for name in ops}
    result = {"dry_run": args.dry_run, "batch": args.batch, "inner": args.inner,
              "dtype": args.dtype, "p": args.p, "kept": n_kept, "ops": {}}
    for _ in range(args.rounds):
        for name, (fn, _) in ops.items():  # interleaved: each round times every op once
            times[name].append(b.time_ms(fn))
        for name, (_, nbytes) in ops.items():
            ms = statistics.median(times[name])
            result["ops"][name] = {"median_ms": ms, "bytes": nbytes, "rounds": len(times[name]),
                                   "gbps": nbytes / (ms * 1e6) if ms > 0 else None}
        copy = result["ops"]["copy"]["gbps"]
        for name in ("scatter", "gather"):
            g = result["ops"][name]["gbps"]
            result["ops"][name]["pct_of_copy"] = 100.0 * g / copy if g and copy else None
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    for name, r in result["ops"].items():
        pct = r.get("pct_of_copy")
        print(f"{name:<8} {r['median_ms']:9.3f} ms {r['gbps'] or 0:8.1f} GB/s"
              + (f" {pct:6.1f}% of copy" if pct is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
