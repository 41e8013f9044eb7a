"""ViT-block train steps in JAX for `python -m stochdepth.bench` (--no-model, --no-jax): the model
section's ViT cases (model_rows.selected_cases) trained by a jitted JAX step, so that the saving
of skipping dropped samples is measured where JAX users train, not only in PyTorch.

The stack is `depth` pre-norm ViT blocks written in jax.numpy with the arithmetic of timm's
`Block` (qkv with bias, exact GELU, LayerNorm eps 1e-6, LayerScale gamma when the case has it),
drop path linear over the depth as timm schedules it. One train step is `jax.jit` of the loss's
gradient (the mean of the output) and the optimizer's update (--model-optimizer: AdamW or SGD
with momentum, written in jax.numpy as torch.optim computes them), parameters and optimizer state
donated, the step number a traced argument (so one program serves every step). Rows, timed as
the torch rows are (timing.interleave, one step per entry per round, rows rotated):

- "floor"          the stack without drop path
- "timm"           timm's formula in jax.numpy: x + branch(x) * (floor(q + U) / q), U from
                   jax.random keyed by (block, step)
- "op"             stochdepth.jax.stochastic_depth(x, branch(x), q, seed, offset=step)
- "skip"           stochdepth.jax.stochastic_residual(x, branch, q, seed, offset=step): the
                   branch runs on the kept samples, the count rounded up to a static bucket
                   (the step is traced; docs/design.md, "Skipping dropped samples")
- "optimizer"      the update alone, for the bound (model_rows: optimizer + (floor -
                   optimizer) x kept fraction)

A block with drop rate 0 (the first) adds its branch in every row, as timm's Identity does.
SECTION: this part of the benchmark.
"""

from __future__ import annotations

import time

import numpy as np

from stochdepth.bench import model_rows
from stochdepth.bench._util import short_error
from stochdepth.bench.rows import Section
from stochdepth.bench.timing import CpuTimer, Entry, TimingPlan, interleave

__all__ = ["IMPLS", "SECTION", "drop_rates", "make_step", "report"]

IMPLS = (("floor", "floor (no drop path)"), ("timm", "timm formula (jnp)"),
         ("op", "stochdepth.jax op"), ("skip", "stochastic_residual"))
SEED = 1234
LR = 1e-4


def drop_rates(rate, depth):
    """timm's schedule (torch.linspace in float32), without torch."""
    return [float(v) for v in np.linspace(0.0, rate, depth, dtype=np.float32)]


def _init(case, depth):
    """The parameters: one dict per block, timm's shapes ((in, out) here), init as timm's."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    d, hidden = case.dim, 4 * case.dim

    def dense(n_in, n_out):
        return {"w": jnp.asarray(rng.standard_normal((n_in, n_out), np.float32) * 0.02),
                "b": jnp.zeros((n_out,), jnp.float32)}

    blocks = []
    for _ in range(depth):
        b = {"n1": {"g": jnp.ones((d,)), "b": jnp.zeros((d,))}, "qkv": dense(d, 3 * d),
             "proj": dense(d, d), "n2": {"g": jnp.ones((d,)), "b": jnp.zeros((d,))},
             "fc1": dense(d, hidden), "fc2": dense(hidden, d)}
        if case.layer_scale:
            b["ls1"] = jnp.full((d,), 1e-5, jnp.float32)
            b["ls2"] = jnp.full((d,), 1e-5, jnp.float32)
        blocks.append(b)
    return blocks


def _branches(case):
    """(attention branch, MLP branch), each (block params, z) -> same shape as z."""
    import jax
    import jax.numpy as jnp

    heads = case.heads

    def norm(p, z):
        mean = jnp.mean(z, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(z - mean), axis=-1, keepdims=True)
        return (z - mean) * jax.lax.rsqrt(var + 1e-6) * p["g"] + p["b"]

    def linear(p, z):
        return z @ p["w"] + p["b"]

    def attn(bp, z):
        n, t, d = z.shape
        qkv = linear(bp["qkv"], norm(bp["n1"], z)).reshape(n, t, 3, heads, d // heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        a = jax.nn.softmax((q * (d // heads) ** -0.5) @ k.transpose(0, 1, 3, 2), axis=-1)
        y = linear(bp["proj"], (a @ v).transpose(0, 2, 1, 3).reshape(n, t, d))
        return y * bp["ls1"] if "ls1" in bp else y

    def mlp(bp, z):
        y = linear(bp["fc2"], jax.nn.gelu(linear(bp["fc1"], norm(bp["n2"], z)),
                                          approximate=False))
        return y * bp["ls2"] if "ls2" in bp else y

    return attn, mlp


def _residual(impl, x, branch, q, seed, step):
    """x plus one branch, as the row `impl` adds it (q: the survival probability)."""
    import jax
    import jax.numpy as jnp

    import stochdepth.jax as sdj

    if impl == "floor" or q == 1.0:
        return x + branch(x)
    if impl == "timm":
        key = jax.random.fold_in(jax.random.key(seed), step)
        u = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        return x + branch(x) * (jnp.floor(q + u) / q)
    if impl == "op":
        return sdj.stochastic_depth(x, branch(x), q, seed=seed, offset=step, scaling="training")
    return sdj.stochastic_residual(x, branch, q, seed=seed, offset=step, scaling="training")


def _update(optimizer):
    """(init(params) -> state, update(params, state, grads) -> (params, state)), as torch.optim
    AdamW (lr 1e-4, weight decay 0.01) or SGD (lr 1e-3, momentum 0.9) compute them."""
    import jax
    import jax.numpy as jnp

    tree = jax.tree.map
    if optimizer == "sgd":
        def init(params):
            return {"buf": tree(jnp.zeros_like, params)}

        def update(params, state, grads):
            buf = tree(lambda b, g: 0.9 * b + g, state["buf"], grads)
            return tree(lambda p, b: p - 1e-3 * b, params, buf), {"buf": buf}

        return init, update

    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01

    def init(params):
        return {"m": tree(jnp.zeros_like, params), "v": tree(jnp.zeros_like, params),
                "t": jnp.zeros((), jnp.float32)}

    def update(params, state, grads):
        t = state["t"] + 1
        m = tree(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = tree(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t

        def step(p, m, v):
            return p * (1 - LR * wd) - LR * (m / c1) / (jnp.sqrt(v / c2) + eps)

        return tree(step, params, m, v), {"m": m, "v": v, "t": t}

    return init, update


def _loss(case, impl, depth):
    """loss(params, x, step): the mean of the stack's output, as the row `impl` adds each
    branch."""
    import jax.numpy as jnp

    attn, mlp = _branches(case)
    rates = drop_rates(0.0 if impl == "floor" else case.rate, depth)

    def loss(params, x, step):
        for i, (bp, rate) in enumerate(zip(params, rates)):
            q = 1.0 - rate
            x = _residual(impl, x, lambda z, bp=bp: attn(bp, z), q, SEED + 2 * i, step)
            x = _residual(impl, x, lambda z, bp=bp: mlp(bp, z), q, SEED + 2 * i + 1, step)
        return jnp.mean(x)

    return loss


def make_step(case, impl, depth, optimizer="adamw"):
    """(jitted step(params, state, x, step) -> (params, state, loss), params, state) of one
    row; params and optimizer state are donated."""
    import jax

    loss = _loss(case, impl, depth)
    init, update = _update(optimizer)

    def train_step(params, state, x, step):
        value, grads = jax.value_and_grad(loss)(params, x, step)
        params, state = update(params, state, grads)
        return params, state, value

    params = _init(case, depth)
    return jax.jit(train_step, donate_argnums=(0, 1)), params, init(params)


def _runner(jitted, params, state, x):
    """A no-argument call running one step (blocking until it is done), its state kept."""
    import jax
    import jax.numpy as jnp

    box = {"params": params, "state": state, "step": 0}

    def run():
        box["params"], box["state"], value = jitted(box["params"], box["state"], x,
                                                    jnp.uint32(box["step"]))
        box["step"] += 1
        jax.block_until_ready(value)
        jax.block_until_ready(box["params"])

    return run


def _optimizer_entry(case, depth, optimizer, x):
    """The update alone, on fixed gradients (the floor's), state donated."""
    import jax

    init, update = _update(optimizer)
    params = _init(case, depth)
    state = init(params)
    grads = jax.jit(jax.grad(_loss(case, "floor", depth)))(params, x, 0)
    fn = jax.jit(update, donate_argnums=(0, 1))
    box = {"params": params, "state": state}

    def run():
        box["params"], box["state"] = fn(box["params"], box["state"], grads)
        jax.block_until_ready(box["params"])

    return run


def time_case(case, depth, batch, optimizer, plan, timer=None):
    """{impl: row} and the optimizer step's median (ms) of one case."""
    import jax.numpy as jnp

    timer = timer or CpuTimer()
    x = jnp.asarray(np.random.default_rng(1).standard_normal(case.input_shape(batch),
                                                             np.float32))
    rows, entries = {}, []
    for impl, label in IMPLS:
        row = rows[impl] = {"impl": impl, "label": label + ", jit", "compile_s": None}
        try:
            run = _runner(*make_step(case, impl, depth, optimizer), x)
            t0 = time.perf_counter()
            run()  # traces and compiles
            row["compile_s"] = time.perf_counter() - t0
            entries.append(Entry(impl, run))
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
            row["error"] = short_error(exc)
    try:
        entries.insert(0, Entry("optimizer", _optimizer_entry(case, depth, optimizer, x)))
    except Exception as exc:  # noqa: BLE001 - no bound then
        print(f"  (optimizer step not timed: {short_error(exc)})")
    order, records = interleave(entries, plan, timer, rotate_from=1)
    return rows, model_rows.collect(rows, records), order


def report(args):
    """Takes, prints and returns the JAX model rows of the selected ViT cases."""
    try:
        import jax

        import stochdepth.jax  # noqa: F401 - the library's rows need the JAX module
    except Exception as exc:  # noqa: BLE001 - say why and carry on
        print(f"\nJAX model rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    rounds = args.rounds or (3 if args.quick else 9)
    plan = TimingPlan(rounds=rounds, burst_time_s=0.0, max_burst=1, warmup=1)
    cases = [c for c in model_rows.selected_cases(args) if c.family == "vit"]
    out = {"batch": args.model_batch, "depth": args.model_depth,
           "optimizer": args.model_optimizer, "rounds": rounds, "jax": jax.__version__,
           "cases": []}
    print(f"\nJAX model train steps (jax.jit, CPU): forward + backward + {args.model_optimizer} "
          f"step, ViT blocks, batch {args.model_batch}, depth {args.model_depth} (median of "
          f"{rounds} interleaved rounds, ms)")
    if not cases:
        print("  no ViT case selected (--model-cases)")
    for case in cases:
        rates = drop_rates(case.rate, args.model_depth)
        kept = sum(1.0 - r for r in rates) / len(rates)
        try:
            rows, opt_ms, order = time_case(case, args.model_depth, args.model_batch,
                                            args.model_optimizer, plan)
        except Exception as exc:  # noqa: BLE001 - a case that cannot run is reported
            out["cases"].append({"name": case.name, "error": short_error(exc), "rows": []})
            print(f"  {case.name}: FAILED: {short_error(exc)}")
            continue
        bound = model_rows.judge(rows, opt_ms, kept)
        res = {"name": case.name, "shape": list(case.input_shape(args.model_batch)),
               "layer_scale": case.layer_scale, "drop_path_rate": case.rate, "bound": bound,
               "rows": list(rows.values()), "round_order": order}
        out["cases"].append(res)
        model_rows.print_case(f"{case.name} {tuple(res['shape'])} jit", rows, bound)
    return out


def _skipped(args):
    if args.no_model:
        return "disabled by --no-model"
    if args.no_jax:
        return "disabled by --no-jax"
    return None


SECTION = Section(key="jax_model", title="JAX model train steps", devices=("cpu",),
                  skipped=_skipped, run=report)
