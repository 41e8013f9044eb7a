"""`python -m stochdepth.bench`: the command line and the driver.

For every case and op, the rows and the ceiling primitives are built, timed together in
interleaved rounds (timing.interleave), judged (ceiling.op_ceiling), printed (report) and saved
to --json after every op. What a row means: docs/design.md, "Measuring speed".
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

from stochdepth.bench import cases as C
from stochdepth.bench._util import Progress, short_error
from stochdepth.bench.anchors import load_anchors
from stochdepth.bench.ceiling import cpu_entries, cuda_entries, op_ceiling, split_key
from stochdepth.bench.machine import machine_info, mem_available_bytes
from stochdepth.bench.report import print_case, write_json
from stochdepth.bench.timing import CpuTimer, CudaTimer, Entry, TimingPlan, interleave, summarize

__all__ = ["main", "parse_args", "run"]

ROW_PREFIX = "row:"


class Env:
    """What the run has: the library, torch (or why not), the adapter, the anchors, options."""

    def __init__(self, args):
        import stochdepth

        self.sd = stochdepth
        self.args = args
        self.p = float(args.p)
        self.torch = None
        self.torch_error = "disabled by --no-torch" if args.no_torch else None
        self.torch_thp = _torch_huge_pages(args.torch_thp)
        if not args.no_torch:
            try:
                import torch

                self.torch = torch
            except Exception as exc:  # noqa: BLE001 - any import failure means "no torch rows"
                self.torch_error = short_error(exc)
        self.adapter = None
        self.adapter_error = ("needs torch" if self.torch is None
                              else "disabled by --no-adapter" if args.no_adapter else None)
        if self.adapter_error is None:
            try:
                import stochdepth.torch as sdt

                if not hasattr(sdt, "stochastic_depth"):
                    raise AttributeError("stochdepth.torch has no stochastic_depth")
                self.adapter = sdt
            except Exception as exc:  # noqa: BLE001 - optional rows
                self.adapter_error = short_error(exc)
        self.compile_error = ("needs torch" if self.torch is None
                              else "disabled by --no-compile" if args.no_compile else None)
        self.anchors = load_anchors(self.torch) if self.torch is not None else {}

    def has(self, need):
        if need == "torch":
            return self.torch is not None
        if need == "adapter":
            return self.adapter is not None
        if need == "compile":
            return self.compile_error is None
        raise ValueError(need)

    @functools.cached_property
    def compared_isas(self):
        """The other CPU ISAs whose "sd" rows run beside the active one's (--compare-isas).
        Worked out once, after --isa has been applied (run() asks for it first)."""
        if self.args.device != "cpu" or self.args.compare_isas == "none":
            return []
        supported = self.sd.build_info()["cpu_isas_supported"]
        if self.args.compare_isas == "vector":
            wanted = [i for i in supported if i != "scalar"]
        else:
            wanted = [i.strip() for i in self.args.compare_isas.split(",") if i.strip()]
            bad = [i for i in wanted if i not in supported]
            if bad:
                raise SystemExit(f"--compare-isas: {bad} not supported here ({supported})")
        return [i for i in wanted if i != self.sd.get_isa()]

    def rows_for(self, device, op):
        rows = []
        for k in C.ROWS[device][op]:
            if all(self.has(n) for n in C.IMPLS[k][2]):
                rows.append(k)
                if k == "sd":
                    rows += [f"sd@{isa}" for isa in self.compared_isas]
        return rows

    def label(self, impl):
        """The row's label; an anchor running the formula instead of its package says so, and
        the library's own row names its ISA when other ISAs are compared."""
        base, anchor, _ = C.impl_info(impl)
        if impl == "sd" and self.compared_isas:
            base += f" [{self.sd.get_isa()}]"
        source = self.anchor_of(impl)
        return source.label(base) if source is not None else base

    def anchor_of(self, impl):
        anchor = C.impl_info(impl)[1]
        return self.anchors.get("torchvision" if anchor == "compile" else anchor)

    def compile(self, fn):
        return self.torch.compile(fn, dynamic=bool(self.args.compile_dynamic))


def _torch_huge_pages(choice):
    """THP_MEM_ALLOC_ENABLE for torch's CPU allocator, which without it does not ask for huge
    pages: on the Zen 4 VM of benchmarks/RESULTS.md that made torch's own rows (the anchors)
    up to 2.9x slower. The anchors get their best configuration unless --torch-thp default; an
    explicit THP_MEM_ALLOC_ENABLE in the environment wins. Read by torch at its first
    allocation, so it is set before torch is imported. Returns what the run used."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']} (from the environment)"
    if choice == "default":
        return "torch's default (THP_MEM_ALLOC_ENABLE unset: no huge pages; --torch-thp default)"
    if "torch" in sys.modules:
        return "torch's default (torch was imported before the benchmark could set it)"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # inherited by the Keras subprocess rows too
    return "THP_MEM_ALLOC_ENABLE=1 (set by the benchmark: huge pages for torch's allocator)"


def _plan(args):
    if args.device == "cpu":
        if args.quick:
            return TimingPlan(rounds=args.rounds or 3, burst_time_s=0.0, max_burst=1, warmup=1)
        rounds = args.rounds or 7
        return TimingPlan(rounds=rounds, burst_time_s=args.min_time / rounds, max_burst=1000,
                          warmup=2, warmup_time_s=0.05)
    if args.quick:
        return TimingPlan(rounds=args.rounds or 3, burst_time_s=0.0, max_burst=2, warmup=1)
    rounds = args.rounds or 7
    return TimingPlan(rounds=rounds, burst_time_s=args.min_time / rounds, max_burst=500,
                      warmup=5, warmup_time_s=0.05)


def _cache_flag(op_res, ceiling, tensor_bytes, llc):
    """Marks an op whose bytes, or one of its ceiling primitives' bytes, are under 2x the LLC."""
    sets = [("the op", op_res["bytes"])]
    sets += [(f"the {p} ceiling", C.PRIMITIVE_TENSORS[p] * tensor_bytes)
             for p in ceiling["primitives"]]
    name, smallest = min(sets, key=lambda s: s[1])
    op_res["working_set_bytes"] = smallest
    op_res["fits_in_cache"] = bool(llc["bytes"]) and smallest < 2 * llc["bytes"]
    op_res["cache_note"] = (
        f"{name} moves {smallest / 1e6:.1f} MB, under 2x the last-level cache "
        f"({llc['bytes'] / 2**20:.1f} MiB): partly cache bandwidth, not memory"
        if op_res["fits_in_cache"] else None)


def _run_op(env, case, op, case_res, plan, timer, progress, failures):
    device = env.args.device
    tensor_bytes = case.nbytes
    kept = case_res["kept_fraction"]
    nbytes = C.op_bytes(op, case_res["n_elems"], tensor_bytes // case_res["n_elems"], kept)
    rows, entries = [], []
    for impl in env.rows_for(device, op):
        label, anchor, _ = C.impl_info(impl)
        row = {"op": op, "impl": impl, "label": env.label(impl), "anchor": anchor}
        source = env.anchor_of(impl)
        if source is not None:
            row["anchor_source"] = source.source
        progress.note(f"{case_res['name']}: {op}: building {row['label']}",
                      key=f"{case_res['name']}: {op}")
        try:
            fn, setup = case.build(op, impl)
            entries.append(Entry(ROW_PREFIX + impl, fn, setup))
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
            row["error"] = short_error(exc)
        row["compile_s"] = case.compile_s
        rows.append(row)
    make = cpu_entries if device == "cpu" else cuda_entries
    ceiling_entries = make(env, case, C.primitives_for(op))
    progress.note(f"{case_res['name']}: {op}: {plan.rounds} interleaved rounds")
    order, records = interleave(ceiling_entries + entries, plan, timer,
                                on_round=lambda r: progress.step(),
                                rotate_from=len(ceiling_entries))
    del entries, ceiling_entries
    summaries = {key: summarize(rec, C.PRIMITIVE_TENSORS[split_key(key)[0]] * tensor_bytes)
                 for key, rec in records.items() if not key.startswith(ROW_PREFIX)}
    ceiling = op_ceiling(op, kept, tensor_bytes, nbytes, summaries)
    for row in rows:
        if "error" not in row:
            row.update(summarize(records[ROW_PREFIX + row["impl"]], nbytes))
        if "error" in row:
            if row["anchor"] is None:
                failures.append(f"{case_res['name']}/{op}/{row['label']}: {row['error']}")
            continue
        pct = 100.0 * ceiling["ms"] / row["median_ms"] if ceiling["ms"] else None
        row["pct_ceiling"] = pct
        row["over_ceiling"] = pct is not None and pct > 100.0
    anchors = {r["anchor"]: r["median_ms"] for r in rows if r["anchor"] and "error" not in r}
    for r in rows:
        if "error" not in r:
            r["speedup"] = {k: v / r["median_ms"] for k, v in anchors.items() if r["median_ms"] > 0}
    for key, s in summaries.items():
        if "error" in s and "stochdepth" in key:
            failures.append(f"{case_res['name']}/{op}/{key}: {s['error']}")
    op_res = {"title": C.OPS[device][op], "bytes": nbytes, "bytes_counted": C.BYTES_NOTE[op],
              "ceiling": ceiling, "rows": rows, "round_order": order}
    _cache_flag(op_res, ceiling, tensor_bytes, case_res["llc"])
    return op_res


def _check_cuda(env):
    torch, sd = env.torch, env.sd
    if torch is None:
        raise SystemExit(f"--device cuda needs PyTorch (CUDA tensors and events): "
                         f"{env.torch_error}")
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False "
                         "(no NVIDIA GPU or driver visible to PyTorch)")
    info = sd.build_info()
    error = None
    if not info.get("cuda_compiled"):
        error = ("stochdepth was built without CUDA (build_info()['cuda_compiled'] is False): "
                 "rebuild with nvcc on PATH (STOCHDEPTH_CUDA=ON)")
    elif not info.get("cuda_device_count"):
        error = "stochdepth sees no CUDA device (build_info()['cuda_device_count'] == 0)"
    if error:
        print(f"WARNING: {error}; stochdepth rows will fail, anchors still run", file=sys.stderr)
    return error


def _header(env, plan, machine, llc):
    sd, torch, args = env.sd, env.torch, env.args
    bi = sd.build_info()
    lines = [f"stochdepth {getattr(sd, '__version__', '?')} benchmark, device={args.device}, "
             f"p={env.p}, seed={C.SEED:#x}, offset advanced per call, {machine['date_utc']}",
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
    lines.append(f"method: per op, {plan.rounds} rounds of [ceiling primitives, then every row], "
                 f"medians over rounds; timing {plan.as_dict()}"
                 + (" (--quick: numbers are not meaningful)" if args.quick else ""))
    return lines


def run(args):
    env = Env(args)
    sd, torch, device = env.sd, env.torch, args.device
    if args.threads is not None:
        sd.set_num_threads(args.threads)
    if args.isa is not None:
        sd.set_isa(args.isa)
    env.compared_isas  # noqa: B018 - a bad --compare-isas fails here, before any work
    sd_cuda_error = _check_cuda(env) if device == "cuda" else None
    machine = machine_info(torch, sd)
    llc = machine["llc"] if device == "cpu" else machine["gpu"]["llc"]

    names = args.cases.split(",") if args.cases else C.DEFAULT_CASES[device]
    if names == ["all"]:
        names = C.DEFAULT_CASES[device]
    case_list = [C.parse_case(c.strip(), llc["bytes"] if device == "cpu" else None, env.p,
                              mem_available_bytes()) for c in names if c.strip()]
    ops = list(C.OPS[device])
    if args.ops:
        ops = [o.strip() for o in args.ops.split(",") if o.strip()]
        bad = [o for o in ops if o not in C.OPS[device]]
        if bad:
            raise SystemExit(f"--ops: unknown op(s) {bad} for --device {device}; "
                             f"expected some of {list(C.OPS[device])}")
    plan = _plan(args)
    timer = CpuTimer() if device == "cpu" else CudaTimer(torch)
    progress = Progress(len(case_list) * len(ops) * plan.rounds, enabled=not args.no_progress)
    print("\n".join(_header(env, plan, machine, llc)))
    sys.stdout.flush()

    results = {
        "schema": 2,
        "device": device,
        "argv": sys.argv[1:] if args.argv is None else args.argv,
        "config": {"p": env.p, "seed": C.SEED, "mode": C.MODE, "scaling": C.SCALING,
                   "timing": plan.as_dict(), "quick": bool(args.quick),
                   "compile_dynamic": bool(args.compile_dynamic),
                   "torch_huge_pages": env.torch_thp,
                   "anchors": {k: a.as_dict() for k, a in env.anchors.items()},
                   "skipped": {"adapter": env.adapter_error, "compile": env.compile_error,
                               "torch": env.torch_error}},
        "machine": machine,
        "cases": [],
    }
    failures = results["failures"] = []
    save = (lambda: write_json(args.json, results)) if args.json else (lambda: None)
    save()
    for name, shape, dtype, what in case_list:
        progress.note(f"{name}: allocating {shape} {dtype}", key=f"{name}: allocating")
        if env.compile_error is None:
            torch._dynamo.reset()  # drop the last case's compiled code (and what it holds)
        if device == "cpu":
            from stochdepth.bench.cpu_rows import CpuCase

            case = CpuCase(env, shape, dtype)
        else:
            from stochdepth.bench.cuda_rows import CudaCase

            case = CudaCase(env, shape, dtype, sd_cuda_error)
        n_elems = math.prod(shape)
        case_res = {"name": name, "shape": list(shape), "dtype": dtype, "what": what,
                    "p": env.p, "n_elems": n_elems, "tensor_bytes": case.nbytes,
                    "kept_fraction": C.kept_fraction(sd, shape[0], env.p), "llc": llc,
                    "fits_in_cache": False, "ops": {}}
        results["cases"].append(case_res)
        for op in ops:
            op_res = _run_op(env, case, op, case_res, plan, timer, progress, failures)
            case_res["ops"][op] = op_res
            case_res["fits_in_cache"] = case_res["fits_in_cache"] or op_res["fits_in_cache"]
            save()
        case.free()
        del case
        progress.clear()
        print_case(case_res, device)
    progress.finish()
    if device == "cpu" and not args.no_keras and not args.no_torch:
        results["keras"] = _keras_rows(args.p, 3 if args.quick else 10)
    if device == "cpu" and not args.no_jax:
        from stochdepth.bench.jax_rows import report as jax_report

        results["jax"] = jax_report(args.p, 3 if args.quick else 10, quick=args.quick,
                                    keras=not args.no_keras)
    if args.plot:
        from stochdepth.bench.plot import write_plot

        try:
            print(f"\nwrote {write_plot(results, args.plot)}")
        except Exception as exc:  # noqa: BLE001 - the numbers are kept; the plot is reported
            failures.append(f"--plot {args.plot}: {short_error(exc)}")
    save()
    if failures:
        print("\nFAILED (stochdepth rows, its ceiling implementations, or the plot):",
              file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
    return results, failures


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m stochdepth.bench",
        description="stochdepth vs NumPy / torchvision / timm / torch.compile: time, GB/s of "
                    "the bytes the op must move, % of a ceiling measured in the same rounds, "
                    "speed-ups.",
        epilog="STOCHDEPTH_BENCH_NO_TIMM=1 / STOCHDEPTH_BENCH_NO_TORCHVISION=1: use the "
               "anchors' formulas even where the packages import.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated: {', '.join(C.CASES)}, 'all' (the device's "
                         "defaults), or a custom AxBxC:dtype. Default: cpu "
                         f"{','.join(C.DEFAULT_CASES['cpu'])} (batch grown past 2x the "
                         f"last-level cache); cuda {','.join(C.DEFAULT_CASES['cuda'])}")
    ap.add_argument("--ops", default=None,
                    help=f"comma-separated subset; cpu: {','.join(C.OPS['cpu'])}; "
                         f"cuda: {','.join(C.OPS['cuda'])}")
    ap.add_argument("--p", type=float, default=0.8, help="survival probability (default 0.8)")
    ap.add_argument("--quick", action="store_true",
                    help="3 rounds of one call: a smoke test, not a measurement")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per op (default 7; 3 with --quick)")
    ap.add_argument("--min-time", type=float, default=None,
                    help="seconds of timed work per implementation and op, spread over the "
                         "rounds (default 0.3 on cpu, 0.1 on cuda)")
    ap.add_argument("--json", metavar="FILE", default=None,
                    help="write every number and the machine's description to FILE (rewritten "
                         "after every op, so a killed run keeps what it measured)")
    ap.add_argument("--plot", metavar="FILE", default=None,
                    help="write a plotly figure of %% of ceiling per op and implementation "
                         "(HTML; PNG if FILE ends in .png and kaleido is installed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="stochdepth.set_num_threads(N) first (torch keeps its default)")
    ap.add_argument("--isa", default=None,
                    help="stochdepth.set_isa(ISA) first (e.g. avx2; build_info() lists them)")
    ap.add_argument("--compare-isas", default="vector", metavar="LIST",
                    help="also time the library's main row of each op on these other CPU ISAs, "
                         "in the same rounds: 'vector' (default: every supported ISA but "
                         "scalar), 'none', or a comma-separated list")
    ap.add_argument("--no-torch", action="store_true", help="NumPy and stochdepth rows only")
    ap.add_argument("--torch-thp", choices=("on", "default"), default="on",
                    help="huge pages for torch's CPU allocator (THP_MEM_ALLOC_ENABLE=1; default "
                         "on, the anchors' best configuration), or torch's default")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--no-adapter", action="store_true", help="skip the stochdepth.torch rows")
    ap.add_argument("--compile-dynamic", action="store_true",
                    help="torch.compile(dynamic=True): one compile for all shapes (faster to "
                         "compile; default dynamic=False, a kernel specialised per case)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--no-jax", action="store_true",
                    help="skip the JAX rows (stochdepth.jax vs jax.jit of the formula)")
    ap.add_argument("--no-keras", action="store_true",
                    help="skip the Keras rows (stochdepth.keras vs kerasfactory, torch backend)")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    if args.min_time is None:
        args.min_time = 0.3 if args.device == "cpu" else 0.1
    if not 0.0 <= args.p <= 1.0 or math.isnan(args.p):
        ap.error(f"--p must be in [0, 1], got {args.p}")
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.plot:
        from stochdepth.bench.plot import check_plot_path

        why = check_plot_path(args.plot)
        if why:
            ap.error(why)
    return args


def _keras_rows(p, reps):
    """stochdepth.keras vs kerasfactory's layer on Keras's torch backend."""
    try:
        from stochdepth.bench.keras_rows import KERASFACTORY_SHAPE, keras_adapter_rows

        rows = keras_adapter_rows(KERASFACTORY_SHAPE, "float32", p, reps)
    except Exception as exc:  # noqa: BLE001 - keras or a backend missing: say so, carry on
        print(f"\nKeras rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    print(f"\nKeras layer on the torch backend, {KERASFACTORY_SHAPE} float32, p={p} "
          f"(median of {reps}, ms; not interleaved with a ceiling)")
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
        print(f"\nwrote {args.json}")
    return 1 if failures else 0
