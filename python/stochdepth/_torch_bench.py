"""Timing rows for the PyTorch adapter, for `python -m stochdepth.bench` (imports torch).

`torch_adapter_rows(shape, dtype, p, reps)` times, on the same tensors, the two-input residual
update `shortcut + drop_path(residual)` with train-time scaling, as users write it today and
through `stochdepth.torch`:

- "stochdepth.torch"                  stochastic_depth(shortcut, residual, p, scaling="training")
- "torchvision eager"                 shortcut + torchvision.ops.stochastic_depth's formula
- "timm eager"                        shortcut + timm.layers.drop_path's formula
- "torch.compile torchvision"         the torchvision formula + add under torch.compile
- "torch.compile stochdepth.torch"    the adapter under torch.compile (fullgraph)

each for "forward" (inputs without grad) and "forward+backward" (autograd, out.backward(grad)).
The formulas are written here from the libraries' documented behaviour (no timm/torchvision
import). Compile time is excluded (warm-up calls); a failing torch.compile gives a row with
"error" instead of numbers.
"""

from __future__ import annotations

import statistics
import time

__all__ = ["torch_adapter_rows"]


def _tv_formula(torch, x, drop_p):
    # torchvision.ops.stochastic_depth(x, drop_p, "row", training=True)
    survival_rate = 1.0 - drop_p
    noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return x * noise


def _timm_formula(x, drop_prob, scale_by_keep=True):
    # timm.layers.drop_path(x, drop_prob, training=True, scale_by_keep)
    keep_prob = 1 - drop_prob
    random_tensor = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


def _time(fn, reps, sync):
    for _ in range(2):  # warm-up (and compilation)
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        sync()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times), min(times)


def torch_adapter_rows(shape, dtype, p, reps, *, device="cpu", seed=1234):
    """Rows (dicts) of forward and forward+backward timings; p is the survival probability.

    Each row: impl, op ("forward" | "forward+backward"), shape, dtype, p, device, reps,
    median_ms, min_ms, bytes (what the adapter's kernels must move: forward shortcut + kept
    residual rows + output; backward kept rows of grad_out + grad_residual, with p as the kept
    fraction; the same count for every impl so GB/s compare like for like), or "error".
    """
    import torch

    import stochdepth.torch as sdt

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dev = torch.device(device)
    if dev.type == "cuda":
        sync = torch.cuda.synchronize
    else:
        def sync():
            return None
    drop = 1.0 - float(p)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shortcut = torch.randn(shape, generator=gen).to(device=dev, dtype=dtype)
    residual = torch.randn(shape, generator=gen).to(device=dev, dtype=dtype)
    grad = torch.randn(shape, generator=gen).to(device=dev, dtype=dtype)
    n_bytes = shortcut.numel() * shortcut.element_size()
    fwd_bytes = n_bytes * (2.0 + p)
    bwd_bytes = n_bytes * (1.0 + p)

    step = [0]

    def ours(sc, res):
        step[0] += 1
        return sdt.stochastic_depth(sc, res, p, scaling="training", seed=seed, offset=step[0])

    def tv(sc, res):
        return sc + _tv_formula(torch, res, drop)

    def timm(sc, res):
        return sc + _timm_formula(res, drop)

    def ours_compiled_src(sc, res):
        return sdt.stochastic_depth(sc, res, p, scaling="training")

    impls = [
        ("stochdepth.torch", lambda: ours),
        ("torchvision eager", lambda: tv),
        ("timm eager", lambda: timm),
        ("torch.compile torchvision", lambda: torch.compile(tv)),
        ("torch.compile stochdepth.torch",
         lambda: torch.compile(ours_compiled_src, fullgraph=True)),
    ]
    rows = []
    for name, make in impls:
        for op in ("forward", "forward+backward"):
            row = {"impl": name, "op": op, "shape": tuple(shape), "dtype": str(dtype)[6:],
                   "p": float(p), "device": str(dev), "reps": int(reps),
                   "bytes": fwd_bytes if op == "forward" else fwd_bytes + bwd_bytes}
            try:
                fn = make()
                if op == "forward":
                    def call(fn=fn):
                        with torch.no_grad():
                            fn(shortcut, residual)
                else:
                    sc = shortcut.detach().requires_grad_()
                    res = residual.detach().requires_grad_()

                    def call(fn=fn, sc=sc, res=res):
                        sc.grad = res.grad = None
                        fn(sc, res).backward(grad)
                row["median_ms"], row["min_ms"] = _time(call, reps, sync)
            except Exception as exc:  # noqa: BLE001 - report and carry on (torch.compile)
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
    return rows
