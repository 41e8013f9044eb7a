#!/usr/bin/env python3
"""Checks the global stores nvcc emits for the vector kernels (docs/design.md, "CUDA").

Compiles cuda/drop_path.cu to PTX with the build's CUDA options for each architecture asked
(default sm_90), then, for each vector kernel (DenseKernel<T, V, kG> with and without the layer
scale and CompactKernel<T, V> with V > 1, CopyKernel<true>), counts its global stores by width:

- every whole chunk is one 16-byte store: at least `sites x kChunksPerThread` of them, where
  `sites` is the number of vector store statements the kernel has in cuda/*.cuh;
- the only other stores a vector kernel may have are of its element width (the dense and copy
  kernels' element-by-element path for a chunk cut by the tensor's ends, or in place with a
  partial keep mask); the compact kernels have no such path, so none at all.

A 16-byte store split into narrower ones (nvcc 13 did this to the first unrolled chunk of a
plain `*(Packed*)p = v` store) fails the check. Exit status 0 when every kernel passes, 1 when
one fails, 2 when nvcc is missing or fails. Run by tests/test_cuda_ptx.py in CI.

    python tools/check_ptx.py [--arch 90] [--arch 80] [--nvcc PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What CMakeLists.txt gives nvcc for the kernels (STOCHDEPTH_CUDA_OPTIONS), plus the language
# level and include folders of the _core target.
NVCC_FLAGS = ["-std=c++17", "-fmad=false", "--expt-relaxed-constexpr",
              "-Xcompiler=-ffp-contract=off,-fno-strict-aliasing", "-DSTOCHDEPTH_WITH_CUDA=1",
              f"-I{ROOT / 'src'}", f"-I{ROOT / 'cuda'}"]
CHUNKS_PER_THREAD = 4  # launch::kChunksPerThread (cuda/launch_config.h)
# Vector store statements in each kernel's source (store_vec calls), per family.
SITES = {"DenseKernel": 1, "DenseKernel+gamma": 1, "CompactKernel": 3, "CopyKernel": 1}
ELEMENT_TYPES = {"6__half": ("half", 2), "13__nv_bfloat16": ("bfloat16", 2), "f": ("float", 4),
                 "d": ("double", 8)}
TYPE_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8}

ENTRY = re.compile(r"^(?:\.visible\s+)?\.entry\s+(\S+?)\(", re.M)
STORE = re.compile(r"\bst\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.(?:[a-z]+)(\d+)\b")
KERNEL = re.compile(r"run_kernelINS_(\d+)(\w+?)I(.+?)EEEEEvNT_4ArgsE")


def kernel_of(mangled: str):
    """(family, element type, element bytes, V) of a run_kernel<K> entry, or None."""
    m = KERNEL.search(mangled)
    if not m:
        return None
    n, rest = int(m.group(1)), m.group(2) + "I" + m.group(3)
    family, args = rest[:n], rest[n + 1:]
    if family == "CopyKernel":  # CopyKernel<kVector>: ILb1 / ILb0
        return (family, "byte", 1, 16) if args.startswith("Lb1") else (family, "byte", 1, 1)
    if family == "DenseKernel":  # DenseKernel<T, V, kG>: the layer scale's flag last
        args, _, flag = args.rpartition("ELb")
        if flag not in ("0", "1"):
            raise SystemExit(f"check_ptx: cannot read the template arguments of {mangled}")
        family += "+gamma" if flag == "1" else ""
    t, _, v = args.rpartition("Li")
    if t not in ELEMENT_TYPES or not v.isdigit():
        raise SystemExit(f"check_ptx: cannot read the template arguments of {mangled}")
    return (family, *ELEMENT_TYPES[t], int(v))


def stores_by_entry(ptx: str) -> dict:
    """{entry name: [store width in bytes, ...]} for every kernel entry of a PTX file."""
    starts = [(m.start(), m.group(1)) for m in ENTRY.finditer(ptx)]
    out = {}
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        widths = []
        for m in STORE.finditer(ptx, start, end):
            lanes = int(m.group(1) or 1)
            widths.append(lanes * TYPE_BYTES[m.group(2)])
        out[name] = widths
    return out


def check(ptx: str) -> list:
    """Rows (kernel, 16-byte stores, other widths, verdict) for the vector kernels."""
    rows = []
    for name, widths in stores_by_entry(ptx).items():
        kind = kernel_of(name)
        if kind is None:
            continue
        family, type_name, elem, v = kind
        if v * elem != 16:
            continue  # a scalar kernel (V == 1): element stores only, nothing to check
        vec = sum(1 for w in widths if w == 16)
        other = sorted({w for w in widths if w != 16})
        want = SITES[family] * CHUNKS_PER_THREAD
        allowed = set() if family == "CompactKernel" else {elem}
        problems = []
        if vec < want:
            problems.append(f"{vec} 16-byte stores, expected >= {want}")
        bad = [w for w in other if w not in allowed]
        if bad:
            problems.append(f"stores of {bad} bytes (a split vector store)")
        base, _, gamma = family.partition("+")
        label = f"{base}<{type_name}, {v}{', ' + gamma if gamma else ''}>"
        rows.append((label, vec, other, "; ".join(problems) or "ok"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", help="compute capability, e.g. 90 (repeatable)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC") or shutil.which("nvcc"))
    ap.add_argument("--keep", help="write the PTX files into this folder")
    args = ap.parse_args(argv)
    if not args.nvcc:
        print("check_ptx: nvcc not found (PATH or NVCC)", file=sys.stderr)
        return 2
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ["90"]:
            ptx_path = Path(args.keep or tmp) / f"drop_path_sm{arch}.ptx"
            ptx_path.parent.mkdir(parents=True, exist_ok=True)
            cmd = [args.nvcc, "-ptx", f"-arch=sm_{arch}", *NVCC_FLAGS,
                   str(ROOT / "cuda" / "drop_path.cu"), "-o", str(ptx_path)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"check_ptx: nvcc failed for sm_{arch}:\n{r.stderr}", file=sys.stderr)
                return 2
            rows = check(ptx_path.read_text())
            if not rows:
                print(f"check_ptx: no vector kernel found in the sm_{arch} PTX", file=sys.stderr)
                return 2
            print(f"sm_{arch}: global stores of the vector kernels")
            for label, vec, other, verdict in rows:
                print(f"  {label:34} 16-byte: {vec:3}  other widths: {str(other):8} {verdict}")
                failed = failed or verdict != "ok"
    print("check_ptx:", "FAILED" if failed else "every vector store is one 16-byte store")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
