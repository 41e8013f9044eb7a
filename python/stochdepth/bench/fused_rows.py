"""The fused section of `python -m stochdepth.bench` (--no-fused): the fused residual-stream ops
on ViT-B/16 shapes, forward and backward, against the unfused sequence that users write today.

The ops (docs/design.md, "Layer scale" and "Fused residual and norm"):

- "layer scale"  out = shortcut + keep * s * (gamma * residual):
                 stochdepth.torch.stochastic_depth(..., gamma=)
- "layer norm"   y = the same, n = LayerNorm(y): stochdepth.torch.stochastic_depth_norm
- "rms norm"     y = the same, n = RMSNorm(y): stochastic_depth_norm(..., norm="rms")

each timed, interleaved in the same rounds (timing.interleave, the rows rotated by one place per
round), as:

- "stochdepth"     the library's fused op (one custom op forward, one backward)
- "eager unfused"  timm's block written out: ls = residual * gamma, drop path as timm's
                   (x * bernoulli(p) / p over a (B, 1, ...) mask), the add, then F.layer_norm or
                   F.rms_norm of the sum
- "compile unfused"  torch.compile(fullgraph=True) of that same function (inductor fuses the
                   chain into its own loops)

and the bytes ceiling, measured in the same rounds: the best of a streaming copy (the library's
`_core.stream_copy`) and torch's `copy_` on one tensor of the case gives the copy bandwidth (read
plus write bytes per second), and the ceiling is the op's bytes at that bandwidth. The op's
bytes, in tensors of the case (p kept): forward 2 + p (layer scale: read the shortcut, the kept
residual rows, write the output) and 3 + p (norm: y and n written); backward 2 + p (read grad,
the kept residual rows for grad_gamma, write grad_residual; grad_shortcut is the incoming grad,
plus 2 where the PyTorch adapter copies it into a library buffer: large CPU tensors) and 5 + p
(norm: read grad_y, grad_n, y and the kept residual rows, write grad_shortcut and
grad_residual). "backward" times `torch.autograd.grad` of one forward's outputs (retained), for
every row alike.

Rows: op, pass, shape, dtype, impl, median_ms, min_ms, and per case the ceiling, "vs eager",
"vs compile" (their median over ours) and "% of ceiling". SECTION: this part of the benchmark.
"""

from __future__ import annotations

from stochdepth.bench._util import short_error
from stochdepth.bench.rows import Section
from stochdepth.bench.timing import (
    POST_COMPILE_CALLS,
    CpuTimer,
    Entry,
    TimingPlan,
    interleave,
    summarize,
)

__all__ = ["CASES", "OPS", "QUICK_CASES", "SECTION", "add_plot_panel", "op_bytes", "report"]

CASES = (((128, 197, 768), "float32"), ((128, 197, 768), "bfloat16"),
         ((1024, 197, 768), "float32"), ((1024, 197, 768), "bfloat16"))
QUICK_CASES = (((16, 17, 64), "float32"), ((16, 17, 64), "bfloat16"))
OPS = ("layer scale", "layer norm", "rms norm")
PASSES = ("forward", "backward")
IMPLS = (("ours", "stochdepth"), ("eager", "eager unfused"), ("compile", "compile unfused"))
SEED = 1234
EPS = 1e-6


def op_bytes(op, pass_, p, shortcut_copy=False):
    """The op's traffic in tensors of the case (see the module docstring); `shortcut_copy`:
    the layer scale's backward also hands grad_shortcut back as a copy (2 tensors more)."""
    norm = op != "layer scale"
    if pass_ == "forward":
        return (3.0 if norm else 2.0) + p
    return (5.0 if norm else 2.0 + 2.0 * shortcut_copy) + p


def _unfused(torch, op):
    """timm's block tail, written out: LayerScale, timm's drop path, the add, the norm."""
    F = torch.nn.functional

    def drop_path(x, p):
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(p).div_(p)

    if op == "layer scale":
        def fn(shortcut, residual, gamma, p):
            return shortcut + drop_path(residual * gamma, p)
    elif op == "layer norm":
        def fn(shortcut, residual, gamma, weight, bias, p):
            y = shortcut + drop_path(residual * gamma, p)
            return y, F.layer_norm(y, (y.shape[-1],), weight, bias, EPS)
    else:
        def fn(shortcut, residual, gamma, weight, p):
            y = shortcut + drop_path(residual * gamma, p)
            return y, F.rms_norm(y, (y.shape[-1],), weight, EPS)
    return fn


def _ours(sdt, op):
    if op == "layer scale":
        def fn(shortcut, residual, gamma, p):
            return sdt.stochastic_depth(shortcut, residual, p, gamma=gamma, seed=SEED)
    elif op == "layer norm":
        def fn(shortcut, residual, gamma, weight, bias, p):
            return sdt.stochastic_depth_norm(shortcut, residual, p, weight, bias, norm="layer",
                                             eps=EPS, gamma=gamma, seed=SEED)
    else:
        def fn(shortcut, residual, gamma, weight, p):
            return sdt.stochastic_depth_norm(shortcut, residual, p, weight, norm="rms",
                                             eps=EPS, gamma=gamma, seed=SEED)
    return fn


def _inputs(torch, op, shape, dtype, grad):
    g = torch.Generator().manual_seed(7)
    dt = getattr(torch, dtype)
    c = shape[-1]

    def t(*s, scale=1.0, shift=0.0):
        x = (torch.randn(*s, generator=g) * scale + shift).to(dt)
        return x.requires_grad_(grad)

    args = [t(*shape), t(*shape), t(c, scale=0.1, shift=1.0)]
    if op != "layer scale":
        args.append(t(c, scale=0.1, shift=1.0))
    if op == "layer norm":
        args.append(t(c, scale=0.1))
    return args


def _entry(torch, key, fn, args, p, pass_):
    if pass_ == "forward":
        def call():
            with torch.no_grad():
                return fn(*args, p)
        return Entry(key, call)
    outs = fn(*args, p)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(11)
    grads = tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs)

    def backward():
        return torch.autograd.grad(outs, args, grads, retain_graph=True)

    return Entry(key, backward)


def _copy_entries(torch, sd, shape, dtype):
    src = torch.randn(*shape).to(getattr(torch, dtype))
    dst = torch.empty_like(src)
    return [Entry("copy: stochdepth _core.stream_copy", lambda: sd._core.stream_copy(dst, src)),
            Entry("copy: torch .copy_", lambda: dst.copy_(src))]


def _time_case(torch, sd, sdt, args, shape, dtype, op, pass_, plan, timer):
    p = args.p
    entries = _copy_entries(torch, sd, shape, dtype)
    n_ceiling = len(entries)
    grad = pass_ == "backward"
    inputs = _inputs(torch, op, shape, dtype, grad)
    fns = {"ours": _ours(sdt, op), "eager": _unfused(torch, op)}
    if not (args.no_compile or args.quick):
        fns["compile"] = torch.compile(_unfused(torch, op), fullgraph=True, dynamic=False)
    for key, fn in fns.items():
        try:
            e = _entry(torch, key, fn, inputs, p, pass_)
            if key == "compile":  # compile and settle outside the timed rounds
                for _ in range(POST_COMPILE_CALLS):
                    e.fn()
            entries.append(e)
        except Exception as exc:  # noqa: BLE001 - a row that cannot run is reported
            entries.append(Entry(key, _raiser(exc)))
    _, records = interleave(entries, plan, timer, rotate_from=n_ceiling)
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    tensor_bytes = elem
    for s in shape:
        tensor_bytes *= s
    copies = [summarize(records[e.key], 2 * tensor_bytes) for e in entries[:n_ceiling]]
    best_copy = min((c for c in copies if "error" not in c), key=lambda c: c["median_ms"],
                    default=None)
    # The PyTorch adapter hands a large CPU grad_shortcut back as a copy in a recycled library
    # buffer (autograd then accumulates into it instead of a fresh, page-faulting buffer): one
    # more memory pass, counted so that the ceiling is that of the work done.
    from stochdepth.torch import _kernels

    copy = op == "layer scale" and pass_ == "backward" and _kernels.use_lib_alloc(inputs[0])
    nbytes = op_bytes(op, pass_, p, copy) * tensor_bytes
    ceiling_ms = (nbytes / (best_copy["gbps"] * 1e9) * 1e3) if best_copy else None
    rows = {}
    for e in entries[n_ceiling:]:
        s = summarize(records[e.key], nbytes)
        rows[e.key] = {"impl": e.key, "label": dict(IMPLS)[e.key],
                       **({"error": s["error"]} if "error" in s else
                          {"median_ms": s["median_ms"], "min_ms": s["min_ms"],
                           "gbps": s["gbps"], "reps": s["reps"]})}
    res = {"op": op, "pass": pass_, "shape": list(shape), "dtype": dtype, "p": p,
           "bytes": nbytes, "grad_shortcut_copy": copy,
           "copy_gbps": best_copy["gbps"] if best_copy else None,
           "ceiling_ms": ceiling_ms, "copies": dict(zip([e.key for e in entries[:n_ceiling]],
                                                        copies)),
           "rows": list(rows.values())}
    ours = rows.get("ours", {}).get("median_ms")
    if ours:
        for key in ("eager", "compile"):
            other = rows.get(key, {}).get("median_ms")
            res[f"vs_{key}"] = other / ours if other else None
        res["pct_ceiling"] = 100.0 * ceiling_ms / ours if ceiling_ms else None
    return res


def _raiser(exc):
    def fn():
        raise exc
    return fn


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(args):
    try:
        import torch

        import stochdepth as sd
        import stochdepth.torch as sdt
    except Exception as exc:  # noqa: BLE001 - say why and carry on
        print(f"\nFused rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    cases = QUICK_CASES if args.quick else CASES
    rounds = args.rounds or (3 if args.quick else 7)
    plan = TimingPlan(rounds=rounds, burst_time_s=0.0 if args.quick else 0.2, max_burst=50,
                      warmup=1)
    timer = CpuTimer()
    out = {"rounds": rounds, "p": args.p, "cases": []}
    compiled = not (args.no_compile or args.quick)
    print(f"\nFused ops on the CPU, p={args.p} (median of {rounds} interleaved rounds, ms; "
          f"vs = their time over ours{'' if compiled else '; no compiled rows'})")
    print(f"  {'op':<12} {'pass':<9} {'shape':<17} {'dtype':<9} {'ours':>9} {'eager':>9} "
          f"{'compile':>9} {'ceiling':>9} {'vs eager':>8} {'vs comp':>8} {'% ceil':>7}")
    for shape, dtype in cases:
        for op in OPS:
            for pass_ in PASSES:
                if compiled:
                    torch._dynamo.reset()
                try:
                    res = _time_case(torch, sd, sdt, args, shape, dtype, op, pass_, plan,
                                     timer)
                except Exception as exc:  # noqa: BLE001 - a case that cannot run is reported
                    out["cases"].append({"op": op, "pass": pass_, "shape": list(shape),
                                         "dtype": dtype, "error": short_error(exc)})
                    print(f"  {op:<12} {pass_:<9} {str(shape):<17} {dtype:<9} FAILED: "
                          f"{short_error(exc)}")
                    continue
                out["cases"].append(res)
                ms = {r["impl"]: r.get("median_ms") for r in res["rows"]}
                print(f"  {op:<12} {pass_:<9} {str(tuple(shape)):<17} {dtype:<9} "
                      f"{_fmt(ms.get('ours'), '9.2f')} {_fmt(ms.get('eager'), '9.2f')} "
                      f"{_fmt(ms.get('compile'), '9.2f')} {_fmt(res['ceiling_ms'], '9.2f')} "
                      f"{_fmt(res.get('vs_eager'), '7.2f')}x {_fmt(res.get('vs_compile'), '7.2f')}x"
                      f" {_fmt(res.get('pct_ceiling'), '6.0f')}%")
                errors = [f"{r['impl']}: {r['error']}" for r in res["rows"] if "error" in r]
                if errors:
                    print(f"    errors: {'; '.join(errors)}")
    return out


def _skipped(args):
    if args.no_fused:
        return "disabled by --no-fused"
    if args.no_torch:
        return "needs torch, disabled by --no-torch"
    if args.no_adapter:
        return "needs stochdepth.torch, disabled by --no-adapter"
    return None


SECTION = Section(key="fused", title="Fused ops", devices=("cpu",), skipped=_skipped,
                  run=report)


def add_plot_panel(fig, results, row):
    """The fused section's bars (% of the ceiling per op and pass, one trace per implementation
    and case) in panel `row` of the figure; False when the results have no fused section."""
    fused = results.get("fused") or {}
    cases = [c for c in fused.get("cases", []) if "error" not in c and c.get("ceiling_ms")]
    if not cases:
        return False
    import plotly.graph_objects as go

    by_impl = {}
    for c in cases:
        x = f"{c['op']} {c['pass']} {tuple(c['shape'])} {c['dtype']}"
        for r in c["rows"]:
            if r.get("median_ms"):
                xs, ys = by_impl.setdefault(r["label"], ([], []))
                xs.append(x)
                ys.append(100.0 * c["ceiling_ms"] / r["median_ms"])
    for label, (xs, ys) in by_impl.items():
        fig.add_trace(go.Bar(x=xs, y=ys, name=f"fused: {label}"), row=row, col=1)
    fig.add_hline(y=100, line_dash="dash", line_color="black", row=row, col=1)
    fig.update_yaxes(title_text="% of ceiling", row=row, col=1)
    return True
