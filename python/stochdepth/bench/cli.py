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
import math
import sys

from stochdepth.bench import (
    anchors,
    ceiling,
    cpu_rows,
    cuda_rows,
    fused_rows,
    jax_model_rows,
    jax_rows,
    keras_model_rows,
    keras_rows,
    model_rows,
    tf_rows,
)
from stochdepth.bench import cases as C
from stochdepth.bench._util import Progress, short_error
from stochdepth.bench.env import Env
from stochdepth.bench.machine import machine_info, mem_available_bytes
from stochdepth.bench.report import header, print_case, write_json
from stochdepth.bench.timing import CpuTimer, CudaTimer, Entry, TimingPlan, interleave, summarize

__all__ = ["OP_ROWS", "SECTIONS", "main", "parse_args", "run"]

# The rows of the tables, in their order: the library's, then the anchors.
OP_ROWS = cpu_rows.ROWS + cuda_rows.ROWS + anchors.ROWS
# What runs after the tables, in this order.
SECTIONS = [fused_rows.SECTION, keras_rows.SECTION, jax_rows.SECTION, tf_rows.SECTION,
            keras_model_rows.SECTION, model_rows.SECTION, jax_model_rows.SECTION]


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


def _rows(env, case, op):
    """The rows of `op` on this device that can run, each compare_isas row followed by its
    variants on the other ISAs."""
    out = []
    for row in OP_ROWS:
        if row.skipped(env.args.device, op, case.dtype, env.unavailable) is None:
            out.append(row)
            if row.compare_isas:
                out += [cpu_rows.on_isa(row, isa) for isa in env.compared_isas]
    return out


def _ceiling_rows(env, case, op):
    """[(primitive, Row)] of the ceiling implementations the op's models need."""
    return [(prim, row) for prim in C.primitives_for(op) for row in ceiling.ROWS
            if row.skipped(env.args.device, prim, case.dtype, env.unavailable) is None]


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
    for row in _rows(env, case, op):
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
    for prim, row in _ceiling_rows(env, case, op):
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
    ceiling.cache_flag(op_res, ceiling_res, tensor_bytes, case_res["llc"])
    return op_res


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
    sd_cuda_error = env.check_cuda() if device == "cuda" else None
    machine = machine_info(torch, sd)
    llc = machine["llc"] if device == "cpu" else machine["gpu"]["llc"]
    case_list = _cases(args, env, llc)
    ops = _ops(args)
    plan = _plan(args)
    timer = CpuTimer() if device == "cpu" else CudaTimer(torch)
    progress = Progress(len(case_list) * len(ops) * plan.rounds, enabled=not args.no_progress)
    reasons = [(s.title, s.skipped(args)) for s in SECTIONS if device in s.devices]
    skipped = [(title, why) for title, why in reasons if why]
    print("\n".join(header(env, plan, machine, llc, skipped)))
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
    ap.add_argument("--no-tf", action="store_true",
                    help="skip the Keras-on-TensorFlow rows (stochdepth.keras vs kerasfactory)")
    ap.add_argument("--no-fused", action="store_true",
                    help="skip the fused ops section (layer scale and the pre-norm tail vs the "
                         "unfused sequence)")
    ap.add_argument("--no-model", action="store_true",
                    help="skip the model section (train steps of timm-structured block stacks)")
    ap.add_argument("--model-cases", default=None, metavar="LIST",
                    help="comma-separated model cases (default all: "
                         f"{','.join(c.name for c in model_rows.MODEL_CASES)})")
    ap.add_argument("--model-depth", type=int, default=2,
                    help="blocks per model stack (default 2: small enough for a 2-core CPU)")
    ap.add_argument("--model-batch", type=int, default=8, help="model batch size (default 8)")
    ap.add_argument("--model-optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="the optimizer of the model train steps (default adamw)")
    ap.add_argument("--model-compile-backend", default="inductor", metavar="NAME",
                    help="torch.compile backend of the compiled model rows (default inductor)")
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    if args.min_time is None:
        args.min_time = 0.3 if args.device == "cpu" else 0.1
    if not 0.0 <= args.p <= 1.0 or math.isnan(args.p):
        ap.error(f"--p must be in [0, 1], got {args.p}")
    if args.model_depth < 1 or args.model_batch < 1:
        ap.error(f"--model-depth and --model-batch must be >= 1, got {args.model_depth} and "
                 f"{args.model_batch}")
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
