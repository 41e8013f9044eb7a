"""The last thing benchmarks/gpu_check.sh prints: each step and each GPU target, the measured
value, PASS / FAIL / NOT RUN. Reads what the steps left in OUT: steps.tsv, pytest.xml (JUnit),
bench_cuda.json (python -m stochdepth.bench) and compact.json (benchmarks/gpu_compact.py).

Usage: python benchmarks/gpu_table.py OUT DRY   (DRY = 1: CPU stand-ins, not GPU numbers)
Exit status 1 if a file a step claims to have written cannot be read.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The GPU targets, set from the bytes each implementation moves (docs/design.md, "CUDA"): the
# training forward >= 90% of copy bandwidth counting bytes moved; forward+backward >= 1.45x
# torch eager (torchvision's formula moves about 7 tensor passes forward and backward, the
# library 4.6 at p = 0.8: 7 / 4.6 = 1.52x is the bytes' bound) and >= 1.2x torch.compile of the
# formula; the compact gather and scatter >= 80% of copy.
CASE = "vit1024-bf16"  # the anchors' case: (1024, 197, 768) bf16
FWD_PCT, COMPACT_PCT = 90.0, 80.0
FWDBWD_X = {"torchvision": (1.45, "torch eager"), "compile": (1.2, "torch.compile")}


def load_json(path):
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, "no file"
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {exc}"


def junit_counts(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    get = lambda k: sum(int(s.get(k, 0)) for s in suites)  # noqa: E731
    return {"tests": get("tests"), "failures": get("failures"), "errors": get("errors"),
            "skipped": get("skipped")}


def verdict(value, ok):
    return "NOT RUN" if value is None else ("PASS" if ok else "FAIL")


def bench_targets(bench, why):
    """[(target, measured, status)] from the benchmark's JSON (None: not measured)."""
    cases = (bench or {}).get("cases") or []
    case = next((c for c in cases if c.get("name") == CASE), cases[0] if cases else None)
    name = case["name"] if case else CASE

    def row(op, impl):
        rows = ((case or {}).get("ops", {}).get(op) or {}).get("rows", [])
        return next((r for r in rows if r.get("impl") == impl and "error" not in r), None)

    out = []
    fwd = row("fwd", "sd_out")
    copy = (((case or {}).get("ops", {}).get("fwd") or {}).get("ceiling", {})
            .get("primitives", {}).get("copy", {}).get("gbps"))
    pct = 100.0 * fwd["gbps"] / copy if fwd and copy else None
    out.append((f"training forward >= {FWD_PCT:.0f}% of copy ({name}, out=)",
                f"{pct:.1f}% ({fwd['gbps']:.0f} of {copy:.0f} GB/s)" if pct is not None
                else why or "not measured", verdict(pct, pct is not None and pct >= FWD_PCT)))
    for anchor, (goal, anchor_name) in FWDBWD_X.items():
        for impl, label in (("sd_out", "out="), ("sd_adapter", "torch adapter")):
            r = row("fwdbwd", impl)
            x = (r or {}).get("speedup", {}).get(anchor)
            out.append((f"forward+backward >= {goal:g}x {anchor_name} ({name}, {label})",
                        f"{x:.2f}x ({r['median_ms']:.3f} ms)" if x is not None
                        else why or "not measured", verdict(x, x is not None and x >= goal)))
    return out


def compact_targets(compact, why):
    out = []
    for op in ("scatter", "gather"):
        r = ((compact or {}).get("ops") or {}).get(op) or {}
        pct = r.get("pct_of_copy")
        out.append((f"compact {op} >= {COMPACT_PCT:.0f}% of copy",
                    f"{pct:.1f}% ({r['gbps']:.0f} GB/s)" if pct is not None
                    else why or "not measured",
                    verdict(pct, pct is not None and pct >= COMPACT_PCT)))
    return out


def main(out_dir, dry):
    out = Path(out_dir)
    lines = []
    steps = {}
    if (out / "steps.tsv").exists():
        for line in (out / "steps.tsv").read_text(encoding="utf-8").splitlines():
            name, status, note = (line.split("\t") + ["", ""])[:3]
            steps[name] = (status, note)
    for name in ("wheels", "build", "compact", "bench", "pytest", "sanitize"):  # as they run
        status, note = steps.get(name, ("NOT RUN", "did not start"))
        if name == "pytest":
            c = junit_counts(out / "pytest.xml")
            if c:
                note += (f"; {c['tests']} tests, {c['failures']} failed, {c['errors']} errors, "
                         f"{c['skipped']} skipped")
        lines.append((f"step {name}", note, status))
    bench, bench_why = load_json(out / "bench_cuda.json")
    compact, compact_why = load_json(out / "compact.json")
    lines += bench_targets(bench, None if bench else f"bench_cuda.json: {bench_why}")
    lines += compact_targets(compact, None if compact else f"compact.json: {compact_why}")

    width = max(len(t) for t, _, _ in lines) + 2
    print()
    if dry:
        print("==== DRY RUN: CPU stand-ins checked the plumbing; these are NOT GPU numbers")
    print(f"==== gpu_check targets ({out})")
    print(f"{'target':<{width}}{'status':<9}measured")
    for target, measured, status in lines:
        print(f"{target:<{width}}{status:<9}{measured}")
    unreadable = [w for w in (bench_why, compact_why) if w and w.startswith("unreadable")]
    return 1 if unreadable else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] == "1" if len(sys.argv) > 2 else False))
