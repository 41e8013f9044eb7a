"""The model section of `python -m stochdepth.bench` (--no-model): whole train steps (forward,
backward, optimizer step) of block stacks with the structure of timm's (stochdepth.bench._blocks):
ViT-S/16- and ViT-B/16-shaped blocks (197 tokens), with LayerScale and without, and ConvNeXt-T
stage 1 blocks (96 channels, 56 x 56), at drop path rates 0.1 and 0.4, linear over the depth as
timm schedules them.

Each configuration is timed as, interleaved in the same rounds (timing.interleave, one step per
entry per round, the rows rotated by one place per round):

- "floor"          the same stack without drop path (its drop paths are identities)
- "timm formula"   timm's DropPath: x * (bernoulli(keep) / keep), then the add
- "stochdepth op"  patch(model, skip_compute=False): the library's DropPath on the computed branch
- "skip-compute"   the stack written with the library: each residual a StochasticResidual owning
                   its branch (the branch runs on the kept samples only)
- "patch(model)"   the timm-structured stack after stochdepth.torch.patch(model)
- "optimizer step" the optimizer's step alone (for the bound below; not a row of the tables)

in eager mode and under torch.compile (--no-compile or --quick: eager only;
--model-compile-backend, default inductor). Every compiled row, the anchors' too, uses
`fullgraph=True`: without it dynamo breaks the graph before each skipping block's branch (a
data-dependent batch size), and the shared resumed frame specialises on each block's survival
probability until dynamo's recompile limit sends it back to eager mode. With fullgraph the whole
stack is one graph (docs/usage.md, "Skipping dropped samples"). A ConvNeXt stack is compiled with
inductor's layout optimisation off (`layout_optimization=False`), for every row: inductor
mispredicts a convolution's strides for a data-dependent batch. A row's time is the median over
rounds; "vs timm" is the timm row's median over the row's, in the same run.

The bound: dropping a sample skips its branch work and nothing else, so a step cannot take less
than `optimizer + (floor - optimizer) * kept`, kept being the expected fraction of the branches'
samples that are kept (the mean of 1 - rate over the drop paths): the floor's forward and backward
are all branch work but for the residual adds. It is reported as a time and as its own "vs timm".

SECTION: this part of the benchmark; MODEL_CASES and QUICK_SHAPES: what it trains.
"""

from __future__ import annotations

import dataclasses
import time

from stochdepth.bench._util import median, short_error
from stochdepth.bench.rows import Section
from stochdepth.bench.timing import (
    POST_COMPILE_CALLS,
    CpuTimer,
    CudaTimer,
    Entry,
    TimingPlan,
    interleave,
)

__all__ = ["IMPLS", "MODEL_CASES", "ModelCase", "SECTION", "add_plot_panel", "build", "collect",
           "judge", "print_case", "report", "selected_cases"]


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """One stack: family "vit" (dim, heads, tokens) or "convnext" (dim channels, side x side)."""

    arch: str
    family: str
    dim: int
    heads: int
    size: int  # tokens (vit) or the side of the feature map (convnext)
    layer_scale: bool
    rate: float

    @property
    def name(self):
        ls = "-ls" if self.family == "vit" and self.layer_scale else ""
        return f"{self.arch}{ls}-{self.rate}"

    def input_shape(self, batch):
        if self.family == "vit":
            return (batch, self.size, self.dim)
        return (batch, self.dim, self.size, self.size)

    def kept_fraction(self, depth):
        """The expected fraction of the branches' samples kept: the mean of 1 - rate over the
        drop path schedule (every block has the same branch work)."""
        from stochdepth.bench._blocks import drop_rates

        rates = drop_rates(self.rate, depth)
        return sum(1.0 - r for r in rates) / len(rates)


# arch: (family, dim, heads, tokens or side) at full size and under --quick.
SHAPES = {"vit-s16": ("vit", 384, 6, 197), "vit-b16": ("vit", 768, 12, 197),
          "convnext": ("convnext", 96, 0, 56)}
QUICK_SHAPES = {"vit-s16": ("vit", 32, 2, 17), "vit-b16": ("vit", 64, 4, 17),
                "convnext": ("convnext", 16, 0, 8)}
RATES = (0.1, 0.4)


def _cases(shapes):
    out = []
    for arch, (family, dim, heads, size) in shapes.items():
        for ls in ((True, False) if family == "vit" else (True,)):
            for rate in RATES:
                out.append(ModelCase(arch, family, dim, heads, size, ls, rate))
    return out


MODEL_CASES = _cases(SHAPES)
IMPLS = (("floor", "floor (no drop path)"), ("timm", "timm formula"), ("op", "stochdepth op"),
         ("skip", "skip-compute"), ("patch", "patch(model)"))


# --quick is a smoke test: one case unless --model-cases names others.
QUICK_CASES = ("vit-s16-ls-0.4",)


def selected_cases(args):
    """The cases the options ask for (--model-cases, names as ModelCase.name), quick-sized with
    --quick (then QUICK_CASES by default)."""
    cases = _cases(QUICK_SHAPES if args.quick else SHAPES)
    if not args.model_cases:
        return [c for c in cases if c.name in QUICK_CASES] if args.quick else cases
    wanted = [c.strip() for c in args.model_cases.split(",") if c.strip()]
    names = [c.name for c in cases]
    bad = [w for w in wanted if w not in names]
    if bad:
        raise SystemExit(f"--model-cases: unknown {bad}; expected some of {names}")
    return [c for c in cases if c.name in wanted]


def _stack(case, depth, rate):
    from stochdepth.bench import _blocks

    if case.family == "vit":
        return _blocks.vit_stack(case.dim, case.heads, depth, rate,
                                 init_values=1e-5 if case.layer_scale else None)
    return _blocks.convnext_stack(case.dim, depth, rate)


def _skip_stack(stack):
    """The stack written with the library: each residual a StochasticResidual that owns its
    branch (the same submodules, so the same weights), scaling "training" as timm's."""
    from torch import nn

    import stochdepth.torch as sdt
    from stochdepth.bench import _blocks

    class ConvNeXtBranch(nn.Module):
        """A ConvNeXt block's branch (its forward up to the drop path) as one module."""

        def __init__(self, block):
            super().__init__()
            self.conv_dw, self.norm, self.mlp, self.gamma = (block.conv_dw, block.norm,
                                                             block.mlp, block.gamma)

        def forward(self, x):
            x = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            return x.mul(self.gamma.reshape(1, -1, 1, 1))

    def survival(drop):
        return 1.0 - float(getattr(drop, "drop_prob", 0.0))

    layers = []
    for block in stack:
        if isinstance(block, _blocks.Block):
            layers += [sdt.StochasticResidual(nn.Sequential(block.norm1, block.attn, block.ls1),
                                              survival(block.drop_path1), scaling="training"),
                       sdt.StochasticResidual(nn.Sequential(block.norm2, block.mlp, block.ls2),
                                              survival(block.drop_path2), scaling="training")]
        else:
            layers.append(sdt.StochasticResidual(ConvNeXtBranch(block), survival(block.drop_path),
                                                 scaling="training"))
    return nn.Sequential(*layers)


def build(case, impl, depth, device="cpu"):
    """The model of one row: the same weights for every impl (the same seed before building)."""
    import torch

    import stochdepth.torch as sdt

    torch.manual_seed(0)
    model = _stack(case, depth, 0.0 if impl == "floor" else case.rate)
    if impl == "op":
        sdt.patch(model, skip_compute=False)
    elif impl == "patch":
        sdt.patch(model)
    elif impl == "skip":
        model = _skip_stack(model)
    return model.to(device).train()


def _optimizer(torch, name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-4)


def _step_fn(torch, model, opt, x):
    def step():
        model(x).float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _compile_config(torch, case):
    """The inductor settings a case compiles under (see the module's docstring)."""
    if case.family == "convnext":
        import torch._inductor.config as inductor_config

        return inductor_config.patch(layout_optimization=False)
    import contextlib

    return contextlib.nullcontext()


def _time_case(torch, args, case, compiled, timer, plan):
    """{impl: row} of one case in one mode, and the optimizer step's median (ms)."""
    device = args.device
    x = torch.randn(case.input_shape(args.model_batch), device=device)
    rows, entries = {}, []
    for impl, label in IMPLS:
        row = rows[impl] = {"impl": impl, "label": label + (", compiled" if compiled else ""),
                            "compile_s": None}
        try:
            model = build(case, impl, args.model_depth, device)
            opt = _optimizer(torch, args.model_optimizer, model.parameters())
            fn = (torch.compile(model, dynamic=bool(args.compile_dynamic), fullgraph=True,
                                backend=args.model_compile_backend) if compiled else model)
            step = _step_fn(torch, fn, opt, x)
            if compiled:
                with _compile_config(torch, case):
                    t0 = time.perf_counter()
                    step()
                    row["compile_s"] = time.perf_counter() - t0
                    for _ in range(POST_COMPILE_CALLS):
                        step()
            entries.append(Entry(impl, step))
            if impl == "floor":
                # The optimizer step alone, on the floor model's gradients (kept, not zeroed).
                model(x).float().mean().backward()
                entries.insert(0, Entry("optimizer", opt.step))
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
            row["error"] = short_error(exc)
    order, records = interleave(entries, plan, timer, rotate_from=1)
    return rows, collect(rows, records), order


def collect(rows, records):
    """The interleaved records' medians into `rows` ({impl: row}, in place: a row's error, or its
    median, min and per-round medians in ms); returns the "optimizer" entry's median (or None)."""
    opt_ms = None
    for key, rec in records.items():
        if "error" in rec:
            if key in rows:
                rows[key]["error"] = rec["error"]
            continue
        per_round = [median(r) / 1e6 for r in rec["round_calls_ns"]]
        summary = {"median_ms": median(per_round),
                   "min_ms": min(min(r) for r in rec["round_calls_ns"]) / 1e6,
                   "round_median_ms": [round(v, 6) for v in per_round]}
        if key == "optimizer":
            opt_ms = summary["median_ms"]
        else:
            rows[key].update(summary)
    return opt_ms


def judge(rows, opt_ms, kept):
    """The ratios against the timm row and the bound, in place; returns the bound's dict."""
    timm = rows["timm"].get("median_ms")
    floor = rows["floor"].get("median_ms")
    bound = None
    if floor is not None and opt_ms is not None:
        bound = {"ms": opt_ms + max(floor - opt_ms, 0.0) * kept, "optimizer_ms": opt_ms,
                 "kept_fraction": kept}
        bound["vs_timm"] = timm / bound["ms"] if timm and bound["ms"] > 0 else None
    for row in rows.values():
        ms = row.get("median_ms")
        row["vs_timm"] = timm / ms if timm and ms else None
        row["of_bound"] = bound["ms"] / ms if bound and ms else None
    return bound


def print_case(title, rows, bound):
    head = f"  {title}"
    if bound is not None:
        vs = f", {bound['vs_timm']:.2f}x vs timm" if bound["vs_timm"] else ""
        head += (f": bound {bound['ms']:.2f} ms (optimizer {bound['optimizer_ms']:.2f} + "
                 f"branches x {bound['kept_fraction']:.3f} kept{vs})")
    print(head)
    for row in rows.values():
        if "error" in row:
            print(f"    {row['label']:32s} FAILED: {row['error']}")
            continue
        vs = f"{row['vs_timm']:6.2f}x vs timm" if row["vs_timm"] else ""
        of = f"  {100 * row['of_bound']:5.1f}% of bound" if row["of_bound"] else ""
        comp = f"  (compile {row['compile_s']:.1f} s)" if row["compile_s"] is not None else ""
        print(f"    {row['label']:32s} {row['median_ms']:10.2f} ms {vs}{of}{comp}")


def report(args):
    """Takes, prints and returns the model section's results."""
    try:
        import torch

        import stochdepth.torch  # noqa: F401 - the library's rows need the adapter
    except Exception as exc:  # noqa: BLE001 - say why and carry on
        print(f"\nModel rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "--device cuda: torch.cuda.is_available() is False (this torch has no GPU)"
        print(f"\nModel rows skipped: {why}")
        return {"error": why}
    # 9 rounds: on a 2-vCPU VM, 5 rounds of one step each put the floor (less work than the
    # formula) up to 15% behind it, more than the differences this section judges; with 9 they
    # agree within 3% (benchmarks/RESULTS.md).
    rounds = args.rounds or (3 if args.quick else 9)
    plan = TimingPlan(rounds=rounds, burst_time_s=0.0, max_burst=1, warmup=1)
    timer = CpuTimer() if args.device == "cpu" else CudaTimer(torch)
    # --quick is a smoke test: eager only (inductor compiles every graph of every row with a
    # C++ compiler, minutes on a small machine).
    modes = (False,) if args.no_compile or args.quick else (False, True)
    out = {"batch": args.model_batch, "depth": args.model_depth,
           "optimizer": args.model_optimizer, "rounds": rounds,
           "compile_backend": args.model_compile_backend if True in modes else None,
           "cases": []}
    compile_note = ("" if len(modes) == 2 else "; no compiled rows: --no-compile"
                    if args.no_compile else "; no compiled rows: --quick")
    print(f"\nModel train steps on {args.device}: forward + backward + {args.model_optimizer} "
          f"step, batch {args.model_batch}, depth {args.model_depth} (median of {rounds} "
          f"interleaved rounds, ms{compile_note})")
    for case in selected_cases(args):
        kept = case.kept_fraction(args.model_depth)
        for compiled in modes:
            if compiled:
                torch._dynamo.reset()  # the previous case's compiled code
            try:
                rows, opt_ms, order = _time_case(torch, args, case, compiled, timer, plan)
            except Exception as exc:  # noqa: BLE001 - a case that cannot run is reported
                out["cases"].append({"name": case.name, "compiled": compiled,
                                     "error": short_error(exc), "rows": []})
                print(f"  {case.name}: FAILED: {short_error(exc)}")
                continue
            bound = judge(rows, opt_ms, kept)
            res = {"name": case.name, "arch": case.arch, "family": case.family,
                   "shape": list(case.input_shape(args.model_batch)),
                   "layer_scale": case.layer_scale, "drop_path_rate": case.rate,
                   "compiled": compiled, "bound": bound, "rows": list(rows.values()),
                   "round_order": order}
            out["cases"].append(res)
            print_case(f"{case.name} {tuple(res['shape'])}{' compiled' if compiled else ''}",
                        rows, bound)
    return out


def add_plot_panel(fig, results, row):
    """The model section's bars ("vs timm" per case and implementation, the bound as a
    marker) in panel `row` of the figure; False when the results have no model section."""
    model = results.get("model") or {}
    if not model.get("cases"):
        return False
    import plotly.graph_objects as go

    by_impl = {}
    for case in model["cases"]:
        if "error" in case:
            continue
        x = case["name"] + (" compiled" if case["compiled"] else "")
        for r in case["rows"]:
            if r.get("vs_timm"):
                by_impl.setdefault(r["impl"], ([], []))
                by_impl[r["impl"]][0].append(x)
                by_impl[r["impl"]][1].append(r["vs_timm"])
    for impl, (xs, ys) in by_impl.items():
        fig.add_trace(go.Bar(x=xs, y=ys, name=f"model: {dict(IMPLS)[impl]}"), row=row, col=1)
    bx = [c["name"] + (" compiled" if c["compiled"] else "") for c in model["cases"]
          if c.get("bound") and c["bound"].get("vs_timm")]
    by = [c["bound"]["vs_timm"] for c in model["cases"] if c.get("bound")
          and c["bound"].get("vs_timm")]
    fig.add_trace(go.Scatter(x=bx, y=by, mode="markers", name="model: bound (dropped work)"),
                  row=row, col=1)
    fig.update_yaxes(title_text="train step: x vs timm", row=row, col=1)
    return True


def _skipped(args):
    if args.no_model:
        return "disabled by --no-model"
    if args.no_torch:
        return "needs torch, disabled by --no-torch"
    if args.no_adapter:
        return "needs stochdepth.torch, disabled by --no-adapter"
    return None


SECTION = Section(key="model", title="Model train steps", devices=("cpu", "cuda"),
                  skipped=_skipped, run=report)
