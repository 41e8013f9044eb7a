"""What the benchmark prints and writes: the header, one table per case, and the JSON file.

The JSON keeps every number (each call's time, per round) and is rewritten after every op, so
that a run killed by a time limit keeps what it measured. What a row means is described in
docs/design.md, "Measuring speed".
"""

from __future__ import annotations

import json
import os
import re
import sys

from stochdepth.bench.cases import MODE, SCALING, SEED

__all__ = ["format_table", "header", "print_case", "write_json", "OVER_NOTE"]

OVER_NOTE = ("! above 100% of the ceiling: the row moved its bytes faster than the primitives "
             "measured in the same rounds (data still in cache, or a read/write mix the "
             "primitives do not capture); the number is printed as measured, not clamped")


def format_table(headers, rows, align=None):
    """Plain-text table with aligned columns. `align`: per column '<' or '>' (default: '<' for the
    first column, '>' for the rest). A row that is a str is printed as is (a note line)."""
    ncol = len(headers)
    if align is None:
        align = ["<"] + [">"] * (ncol - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        if isinstance(row, str):
            continue
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells):
        parts = []
        for i, cell in enumerate(cells):
            parts.append(cell.ljust(widths[i]) if align[i] == "<" else cell.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append(row if isinstance(row, str) else fmt(row))
    return "\n".join(out)


def fmt_ms(x):
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 1 else (f"{x:.3f}" if x < 100 else f"{x:.1f}")


def _fmt_x(x):
    return "-" if x is None else f"{x:.2f}x"


def _mb(n):
    return f"{n / 1e6:.1f} MB"


def _ceiling_lines(op_res):
    c = op_res["ceiling"]
    if c["ms"] is None:
        return ["   ceiling: not measured (every primitive implementation failed)"]
    prims = []
    for name, p in c["primitives"].items():
        if p["ms"] is not None:
            prims.append(f"{name} {p['gbps']:.1f} GB/s ({p['best']})")
        failed = [f"{label}: {s['error']}" for label, s in p["impls"].items() if "error" in s]
        prims += [f"{name} FAILED {f}" for f in failed]
    return [f"   ceiling {c['gbps']:.1f} GB/s = {fmt_ms(c['ms'])} ms for these bytes "
            f"({c['model']}); measured in the same rounds: " + "; ".join(prims)]


def header(env, plan, machine, llc, skipped_sections=()):
    """The lines printed before the tables: the run, the machine, the library, torch and the
    anchors, what is skipped and why ([(section title, why)] for the sections), the method."""
    sd, torch, args = env.sd, env.torch, env.args
    bi = sd.build_info()
    lines = [f"stochdepth {getattr(sd, '__version__', '?')} benchmark, device={args.device}, "
             f"p={env.p}, seed={SEED:#x}, offset advanced per call, {machine['date_utc']}",
             f"machine: {machine['cpu_model']}, {machine['cpu_count']} CPUs "
             f"({machine['cpu_affinity']} usable), {machine['mem_total_gib']} GiB, "
             f"LLC {machine['llc']['text']}"]
    if args.device == "cuda":
        g = machine["gpu"]
        lines.append(f"GPU: {g['name']} (cc {g['capability']}), L2 {llc['text']}, torch CUDA "
                     f"{torch.version.cuda}; device-event timing")
    lines.append(f"stochdepth: ISA {bi.get('cpu_isa')}, threads={bi.get('num_threads')}"
                 f"{' (set by --threads)' if args.threads is not None else ' (its default)'}, "
                 f"CUDA compiled: {bi.get('cuda_compiled')}")
    if torch is not None:
        lines.append(f"torch {torch.__version__}: threads={torch.get_num_threads()} "
                     f"(torch's default, left as is); CPU allocator: {env.torch_thp}")
        for a in env.anchors.values():
            lines.append(f"anchor {a.name}: {a.source}")
    else:
        lines.append(f"torch: not used ({env.torch_error})")
    if env.adapter is None:
        lines.append(f"stochdepth.torch adapter rows: skipped ({env.adapter_error})")
    if env.compile_error:
        lines.append(f"torch.compile rows: skipped ({env.compile_error})")
    for title, why in skipped_sections:
        lines.append(f"{title}: skipped ({why})")
    lines.append(f"method: per op, {plan.rounds} rounds of [ceiling primitives, then every row], "
                 f"medians over rounds; timing {plan.as_dict()}"
                 + (" (--quick: numbers are not meaningful)" if args.quick else ""))
    return lines


def print_case(case, case_res, anchors, out=None):
    """The table of one Case from its results (the dict the JSON keeps), one "vs" column per
    anchor Row in `anchors`."""
    out = sys.stdout if out is None else out
    lines = [
        "",
        f"== {case.name}: {case.shape} {case.dtype} ({case.what}); "
        f"{case.n_elems / 1e6:.2f} M elements, {_mb(case_res['tensor_bytes'])} per tensor; "
        f"p = {case.p}, mode={MODE!r}, scaling={SCALING!r}",
        f"   kept fraction {case_res['kept_fraction']:.4f} (stochdepth mask, mean over 256 "
        "offsets; used for the byte counts)",
    ]
    print("\n".join(lines), file=out)

    headers = ["implementation", "median ms", "min ms", "reps", "GB/s", "% ceiling"]
    headers += [a.column for a in anchors]
    table = []
    over = False
    for op, op_res in case_res["ops"].items():
        table.append(f"[{op}] {op_res['title']}: {_mb(op_res['bytes'])} "
                     f"({op_res['bytes_counted']})")
        table += _ceiling_lines(op_res)
        if op_res["fits_in_cache"]:
            table.append(f"   FITS IN CACHE: {op_res['cache_note']}")
        for row in op_res["rows"]:
            label = row["label"]
            if row.get("compile_s") is not None:
                label += f" [compile {row['compile_s']:.1f}s]"
            if "error" in row:
                table.append(f"  {label}: FAILED: {row['error']}")
                continue
            pct = row["pct_ceiling"]
            pct_cell = "-" if pct is None else f"{pct:.1f}%" + (" !" if row["over_ceiling"] else "")
            over = over or row["over_ceiling"]
            cells = ["  " + label, fmt_ms(row["median_ms"]), fmt_ms(row["min_ms"]),
                     str(row["reps"]), f"{row['gbps']:.2f}", pct_cell]
            cells += [_fmt_x(row["speedup"].get(a.anchor)) for a in anchors]
            table.append(cells)
    print(format_table(headers, table), file=out)
    if over:
        print(OVER_NOTE, file=out)
    out.flush()


_NUM = r"-?[0-9][0-9eE.+\-]*"
_NUMBER_LIST = re.compile(rf"\[\s*({_NUM}(?:,\s*{_NUM})*)\s*\]")
_LIST_OF_NUMBER_LISTS = re.compile(r"\[\s*(\[[^\[\]{}\"]*\](?:,\s*\[[^\[\]{}\"]*\])*)\s*\]")
_STRING_LIST = re.compile(r'\[\s*("[^"\n]*"(?:,\s*"[^"\n]*")*)\s*\]')


def _one_line(match, limit=None):
    text = "[" + ", ".join(x.strip() for x in re.split(r",\s*\n\s*", match.group(1))) + "]"
    return text if limit is None or len(text) <= limit else match.group(0)


def write_json(path, results):
    """Writes `results` to `path` (atomically: a killed run leaves the last complete file), with
    lists of numbers on one line each."""
    text = json.dumps(results, indent=1, default=str)
    text = _NUMBER_LIST.sub(_one_line, text)
    text = _LIST_OF_NUMBER_LISTS.sub(_one_line, text)
    text = _STRING_LIST.sub(lambda m: _one_line(m, limit=100), text)
    text = re.sub(r"\[\s+\]", "[]", text)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.write("\n")
    os.replace(tmp, path)
