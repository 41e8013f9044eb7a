"""`python -m stochdepth.bench`: the command line and the driver, a loop over Case and Row
objects (stochdepth.bench.rows says how to add a row or a section).

For every Case and op, the rows of the device that have the op and can run (Row.skipped) and the
ceiling rows of the op's primitives are built, timed together in interleaved rounds
(timing.interleave), judged (ceiling.op_ceiling), printed (report) and saved to --json after
every op. Then each Section in SECTIONS that the options leave in runs. What a row means:
docs/design.md, "Measuring speed".
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

from stochdepth.bench import anchors, ceiling, cpu_rows, cuda_rows, jax_rows, keras_rows
from stochdepth.bench import cases as C
from stochdepth.bench._util import Progress, short_error
from stochdepth.bench.machine import machine_info, mem_available_bytes
from stochdepth.bench.report import print_case, write_json
from stochdepth.bench.rows import ALWAYS_AVAILABLE
from stochdepth.bench.timing import CpuTimer, CudaTimer, Entry, TimingPlan, interleave, summarize

__all__ = ["OP_ROWS", "SECTIONS", "main", "parse_args", "run"]

# The rows of the tables, in their order: the library's, then the anchors.
OP_ROWS = cpu_rows.ROWS + cuda_rows.ROWS + anchors.ROWS
# What runs after the tables, in this order.
SECTIONS = [keras_rows.SECTION, jax_rows.SECTION]


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
        self.anchors = anchors.load_anchors(self.torch) if self.torch is not None else {}

    def unavailable(self, framework):
        """Why a Row's framework cannot run here, or None."""
        if framework in ALWAYS_AVAILABLE:
            return None
        why = {"torch": self.torch_error, "stochdepth.torch": self.adapter_error,
               "torch.compile": self.compile_error}
        if framework not in why:
            raise ValueError(f"no framework {framework!r} in the tables")
        return why[framework]

    @functools.cached_property
    def compared_isas(self):
        """The other CPU ISAs whose variants of the compare_isas rows run beside them
        (--compare-isas). Worked out once, after --isa has been applied (run() asks first)."""
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

    def rows_for(self, case, op):
        """The rows of `op` on this device that can run, each compare_isas row followed by its
        variants on the other ISAs."""
        out = []
        for row in OP_ROWS:
            if row.skipped(self.args.device, op, case.dtype, self.unavailable) is None:
                out.append(row)
                if row.compare_isas:
                    out += [cpu_rows.on_isa(row, isa) for isa in self.compared_isas]
        return out

    def ceiling_rows_for(self, case, op):
        """[(primitive, Row)] of the ceiling implementations the op's models need."""
        return [(prim, row) for prim in C.primitives_for(op) for row in ceiling.ROWS
                if row.skipped(self.args.device, prim, case.dtype, self.unavailable) is None]

    def label(self, row):
        """The row's label; an anchor running the formula instead of its package says so, and
        a compare_isas row names its ISA when other ISAs are compared."""
        label = row.label
        if row.compare_isas and self.compared_isas:
            label += f" [{self.sd.get_isa()}]"
        source = self.anchors.get(row.source) if row.source else None
        return source.label(label) if source is not None else label

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


def _entry_key(row, prim=None):
    """An entry's name in the JSON's round_order (and in failures)."""
    return f"ceiling:{prim}:{row.name}" if prim else f"row:{row.name}"


def _run_op(env, case, tensors, op, case_res, plan, timer, progress, failures):
    device = env.args.device
    tensor_bytes = tensors.nbytes
    kept = case_res["kept_fraction"]
    nbytes = C.op_bytes(op, case.n_elems, tensor_bytes // case.n_elems, kept)
    where = f"{case.name}: {op}"
    timed = []  # (Row, its JSON row, its Entry or None when building it failed)
    for row in env.rows_for(case, op):
        res = {"op": op, "impl": row.name, "label": env.label(row), "anchor": row.anchor}
        if row.source in env.anchors:
            res["anchor_source"] = env.anchors[row.source].source
        progress.note(f"{where}: building {res['label']}", key=where)
        entry = None
        tensors.compile_s = None
        try:
            fn, setup = row.build(op, tensors)
            entry = Entry(_entry_key(row), fn, setup)
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
            res["error"] = short_error(exc)
        res["compile_s"] = tensors.compile_s
        timed.append((row, res, entry))
    ceilings = []  # (primitive, Row, its Entry or the error building it)
    for prim, row in env.ceiling_rows_for(case, op):
        try:
            fn, setup = row.build(prim, tensors)
            ceilings.append((prim, row, Entry(_entry_key(row, prim), fn, setup)))
        except Exception as exc:  # noqa: BLE001 - recorded like an error while timing
            ceilings.append((prim, row, short_error(exc)))
    ceiling_entries = [e for _, _, e in ceilings if isinstance(e, Entry)]
    progress.note(f"{where}: {plan.rounds} interleaved rounds")
    order, records = interleave(ceiling_entries + [e for _, _, e in timed if e is not None],
                                plan, timer, on_round=lambda r: progress.step(),
                                rotate_from=len(ceiling_entries))
    del ceiling_entries

    measured = {}  # {primitive: {implementation: summary}}, in the order timed
    for prim, row, entry in ceilings:
        s = ({"error": entry} if not isinstance(entry, Entry)
             else summarize(records[entry.key], C.PRIMITIVE_TENSORS[prim] * tensor_bytes))
        measured.setdefault(prim, {})[row.name] = s
    ceiling_res = ceiling.op_ceiling(op, kept, tensor_bytes, nbytes, measured)
    rows = []
    for row, res, entry in timed:
        rows.append(res)
        if entry is not None:
            res.update(summarize(records[entry.key], nbytes))
        if "error" in res:
            if row.ours:
                failures.append(f"{case.name}/{op}/{res['label']}: {res['error']}")
            continue
        pct = 100.0 * ceiling_res["ms"] / res["median_ms"] if ceiling_res["ms"] else None
        res["pct_ceiling"] = pct
        res["over_ceiling"] = pct is not None and pct > 100.0
    del timed
    anchor_ms = {r["anchor"]: r["median_ms"] for r in rows if r["anchor"] and "error" not in r}
    for r in rows:
        if "error" not in r:
            r["speedup"] = {k: v / r["median_ms"] for k, v in anchor_ms.items()
                            if r["median_ms"] > 0}
    for prim, row, _ in ceilings:
        s = measured[prim][row.name]
        if "error" in s and row.ours:
            failures.append(f"{case.name}/{op}/{_entry_key(row, prim)}: {s['error']}")
    del ceilings
    op_res = {"title": C.OPS[device][op], "bytes": nbytes, "bytes_counted": C.BYTES_NOTE[op],
              "ceiling": ceiling_res, "rows": rows, "round_order": order}
    _cache_flag(op_res, ceiling_res, tensor_bytes, case_res["llc"])
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
    for section in SECTIONS:
        why = section.skipped(args) if args.device in section.devices else None
        if why:
            lines.append(f"{section.title}: skipped ({why})")
    lines.append(f"method: per op, {plan.rounds} rounds of [ceiling primitives, then every row], "
                 f"medians over rounds; timing {plan.as_dict()}"
                 + (" (--quick: numbers are not meaningful)" if args.quick else ""))
    return lines


def _cases(args, env, llc):
    names = args.cases.split(",") if args.cases else C.DEFAULT_CASES[args.device]
    if names == ["all"]:
        names = C.DEFAULT_CASES[args.device]
    llc_bytes = llc["bytes"] if args.device == "cpu" else None
    return [C.parse_case(c.strip(), llc_bytes, env.p, mem_available_bytes())
            for c in names if c.strip()]


def _ops(args):
    device = args.device
    if not args.ops:
        return list(C.OPS[device])
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in C.OPS[device]]
    if bad:
        raise SystemExit(f"--ops: unknown op(s) {bad} for --device {device}; "
                         f"expected some of {list(C.OPS[device])}")
    return ops


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
    case_list = _cases(args, env, llc)
    ops = _ops(args)
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
    columns = [a for a in anchors.ROWS if device in a.devices]
    for case in case_list:
        progress.note(f"{case.name}: allocating {case.shape} {case.dtype}",
                      key=f"{case.name}: allocating")
        if env.compile_error is None:
            torch._dynamo.reset()  # drop the last case's compiled code (and what it holds)
        tensors = (cpu_rows.CpuTensors(env, case) if device == "cpu"
                   else cuda_rows.CudaTensors(env, case, sd_cuda_error))
        case_res = {"name": case.name, "shape": list(case.shape), "dtype": case.dtype,
                    "what": case.what, "p": case.p, "n_elems": case.n_elems,
                    "tensor_bytes": tensors.nbytes,
                    "kept_fraction": C.kept_fraction(sd, case.shape[0], case.p), "llc": llc,
                    "fits_in_cache": False, "ops": {}}
        results["cases"].append(case_res)
        for op in ops:
            op_res = _run_op(env, case, tensors, op, case_res, plan, timer, progress, failures)
            case_res["ops"][op] = op_res
            case_res["fits_in_cache"] = case_res["fits_in_cache"] or op_res["fits_in_cache"]
            save()
        tensors.free()
        del tensors
        progress.clear()
        print_case(case, case_res, columns)
    progress.finish()
    for section in SECTIONS:
        if device in section.devices and not section.skipped(args):
            results[section.key] = section.run(args)
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


def main(argv=None):
    args = parse_args(argv)
    results, failures = run(args)
    if args.json:
        print(f"\nwrote {args.json}")
    return 1 if failures else 0
