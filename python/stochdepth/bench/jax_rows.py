"""JAX rows for `python -m stochdepth.bench` (CPU): the FFI custom calls against what JAX users
write today, on the same arrays.

`jax_rows(shape, dtype, p, reps)`, for "forward", "forward+backward" (a `jax.vjp` with a given
cotangent, i.e. what `jax.grad` runs) and "block forward" (the op inside a jitted residual block,
x + op(gelu((x @ A) @ B)) with a rank-16 branch, so that XLA owns the residual's buffer too), all
jitted:

- "stochdepth.jax"   stochdepth.jax.stochastic_depth (the kernels as XLA FFI custom calls)
- "stochdepth.jax (donated)"  the same with donate_shortcut=True under
                     jax.jit(donate_argnums=0): the result is written into the shortcut's
                     buffer (forward and block forward; the donated shortcut is a fresh copy
                     made untimed before each call)
- "jax.jit formula"  where(keep, shortcut + residual / p, shortcut), keep given as an operand
                     (the mask's cost is not counted for the formula: its best case)
- "jax.jit formula (donated)"  the formula with the shortcut donated the same way (XLA then
                     writes its fusion's result into that buffer)
- "stochdepth (NumPy)"  stochdepth.forward / backward on NumPy arrays: the raw library call
                     (forward and forward+backward)

Why the donated and block rows: docs/design.md, "XLA:CPU buffers".

`keras_jax_rows(shape, dtype, p, reps)`: the Keras layer on the JAX backend, stochdepth.keras
vs kerasfactory 0.1.1 (seeded, so that jit can trace it; rank 4, as in keras_rows), as a jitted
`stateless_call` (forward) and its vjp (forward+backward; and "forward+backward, g donated",
the vjp with the cotangent donated: without it XLA copies the cotangent into a fresh buffer as
the shortcut's gradient, a copy that a train step does not make); in a subprocess with
KERAS_BACKEND=jax unless this process's Keras already is on JAX.

Rows: impl, op, shape, dtype, p, device ("cpu"), backend ("jax"), reps, median_ms, min_ms,
bytes (the traffic stochdepth's kernels need, as in keras_rows), or "error".

ROWS and KERAS_ROWS: those implementations as Row objects (stochdepth.bench.rows), a builder per
op taking the arrays (a namespace: see jax_rows and _keras_rows_here); SECTION: this part of
`python -m stochdepth.bench` (--no-jax).
"""

from __future__ import annotations

import sys
import types

from stochdepth.bench._util import short_error
from stochdepth.bench.keras_rows import KERASFACTORY_SHAPE, _time, rows_in_subprocess
from stochdepth.bench.rows import Row, Section

__all__ = ["KERAS_ROWS", "ROWS", "SECTION", "jax_rows", "keras_jax_rows", "report"]

CASE = (128, 197, 768)  # the ViT-B/16 block, batch 128
QUICK_CASE = (16, 197, 64)
QUICK_KERAS_CASE = (4, 16, 16, 32)  # rank 4: the one rank where kerasfactory draws per sample
OPS = ("forward", "forward+backward", "block forward")
KERAS_OPS = ("forward", "forward+backward", "forward+backward, g donated")
BRANCH_RANK = 16  # the block's branch: (x @ A) @ B, A of shape (C, 16), B of shape (16, C)


def _row(impl, op, shape, dtype, p, reps, n_bytes):
    fwd = n_bytes * (2.0 + p)  # the op's traffic; in a block, the branch's is not counted
    return {"impl": impl, "op": op, "shape": tuple(shape), "dtype": dtype, "p": float(p),
            "device": "cpu", "backend": "jax", "reps": int(reps),
            "bytes": fwd + n_bytes * (1.0 + p) if op == "forward+backward" else fwd}


def _timed(rows, row, build, d, reps):
    try:
        fn, setup = build(d)
        row["median_ms"], row["min_ms"] = _time(fn, setup, reps, lambda: None)
    except Exception as exc:  # noqa: BLE001 - report and carry on
        row["error"] = short_error(exc)
    rows.append(row)


def _jitted(f, extra):
    """The ops of a jnp function f(shortcut, residual, extra): forward, and a jax.vjp with a
    given cotangent (what jax.grad runs), both jitted."""

    def forward(d):
        jf = d.jax.jit(lambda a, b, e: f(d, a, b, e))
        ja, jb, e = d.ja, d.jb, extra(d)
        return (lambda: jf(ja, jb, e).block_until_ready()), None

    def forward_backward(d):
        jax = d.jax
        jf = jax.jit(lambda a, b, g, e: jax.vjp(lambda a, b: f(d, a, b, e), a, b)[1](g))
        ja, jb, jg, e = d.ja, d.jb, d.jg, extra(d)
        return (lambda: jax.block_until_ready(jf(ja, jb, jg, e))), None

    def block_forward(d):
        jf = d.jax.jit(lambda a, e: f(d, a, _branch(d, a), e))
        ja, e = d.ja, extra(d)
        return (lambda: jf(ja, e).block_until_ready()), None

    return {"forward": forward, "forward+backward": forward_backward,
            "block forward": block_forward}


def _donated(f, extra):
    """The forward ops of f with the shortcut donated (jax.jit(donate_argnums=0)): each call
    gets a fresh copy of the shortcut, made and completed untimed in its setup."""

    def fresh(d):
        x = d.jnp.array(d.ja, copy=True)
        x.block_until_ready()
        return (x,)

    def forward(d):
        jf = d.jax.jit(lambda a, b, e: f(d, a, b, e), donate_argnums=0)
        jb, e = d.jb, extra(d)
        return (lambda a: jf(a, jb, e).block_until_ready()), (lambda: fresh(d))

    def block_forward(d):
        jf = d.jax.jit(lambda a, e: f(d, a, _branch(d, a), e), donate_argnums=0)
        e = extra(d)
        return (lambda a: jf(a, e).block_until_ready()), (lambda: fresh(d))

    return {"forward": forward, "block forward": block_forward}


def _branch(d, a):
    return d.jax.nn.gelu((a @ d.wa) @ d.wb)


def _ours(d, a, b, s):
    return d.sdj.stochastic_depth(a, b, d.p, seed=s, scaling="training")


def _ours_donated(d, a, b, s):
    return d.sdj.stochastic_depth(a, b, d.p, seed=s, scaling="training", donate_shortcut=True)


def _formula(d, a, b, keep):
    jnp = d.jnp
    return jnp.where(keep, a + b / jnp.asarray(d.p, a.dtype), a)


def _numpy_forward(d):
    sd, a, b, p, seed = d.stochdepth, d.a, d.b, d.p, d.seed
    return (lambda: sd.forward(a, b, p, seed=seed, scaling="training")), None


def _numpy_forward_backward(d):
    sd, a, b, g, p, seed = d.stochdepth, d.a, d.b, d.g, d.p, d.seed

    def call():
        sd.forward(a, b, p, seed=seed, scaling="training")
        sd.backward(g, p, seed=seed, scaling="training")

    return call, None


ROWS = [
    Row("stochdepth.jax", "stochdepth.jax", framework="jax", ours=True,
        ops=_jitted(_ours, lambda d: d.seed_op)),
    Row("stochdepth.jax (donated)", "stochdepth.jax (donated)", framework="jax", ours=True,
        ops=_donated(_ours_donated, lambda d: d.seed_op)),
    Row("jax.jit formula", "jax.jit formula", framework="jax", anchor="jax.jit formula",
        ops=_jitted(_formula, lambda d: d.keep)),
    Row("jax.jit formula (donated)", "jax.jit formula (donated)", framework="jax",
        anchor="jax.jit formula (donated)", ops=_donated(_formula, lambda d: d.keep)),
    Row("stochdepth (NumPy)", "stochdepth (NumPy)", framework="stochdepth", ours=True,
        ops={"forward": _numpy_forward, "forward+backward": _numpy_forward_backward}),
]


def jax_rows(shape=CASE, dtype="float32", p=0.8, reps=10, *, seed=1234):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import stochdepth
    import stochdepth.jax as sdj

    rng = np.random.default_rng(0)
    np_dtype = jnp.dtype(dtype)
    a, b, g = (rng.standard_normal(shape).astype(np_dtype) for _ in range(3))
    ja, jb, jg = (jax.device_put(x) for x in (a, b, g))
    keep = jnp.asarray(stochdepth.mask(shape[0], p, seed=seed)).reshape((-1,) + (1,) * (
        len(shape) - 1))
    # What the builders read: the NumPy arrays, their device copies, the mask given to the
    # formula (its cost is not counted: the formula's best case), the seed as an operand, the
    # block's branch weights.
    wa, wb = (jax.device_put((0.1 * rng.standard_normal(s)).astype(np_dtype))
              for s in ((shape[-1], BRANCH_RANK), (BRANCH_RANK, shape[-1])))
    d = types.SimpleNamespace(jax=jax, jnp=jnp, stochdepth=stochdepth, sdj=sdj, p=p, seed=seed,
                              a=a, b=b, g=g, ja=ja, jb=jb, jg=jg, keep=keep,
                              seed_op=jnp.uint32(seed), wa=wa, wb=wb)
    rows = []
    for op in OPS:
        for row in (r for r in ROWS if op in r.ops):
            _timed(rows, _row(row.name, op, shape, np_dtype.name, p, reps, a.nbytes),
                   row.ops[op], d, reps)
    return rows


def _layer_ops(make_layer):
    """The ops of a Keras layer on the JAX backend: a jitted `stateless_call` (forward) and its
    vjp (forward+backward)."""

    def build(d, op):
        jax = d.jax
        layer = make_layer(d)
        a, b, g = d.a, d.b, d.g
        if not layer.built:  # kerasfactory's layer builds on its first call
            layer([a, b], training=False)
        nt = [v.value for v in layer.non_trainable_variables]

        def f(a, b):
            return layer.stateless_call([], nt, [a, b], training=True)[0]

        if op == "forward":
            jf = jax.jit(f)
            return (lambda: jf(a, b).block_until_ready()), None
        def vjp(a, b, g):
            return jax.vjp(f, a, b)[1](g)

        if op == "forward+backward":
            jf = jax.jit(vjp)
            return (lambda: jax.block_until_ready(jf(a, b, g))), None
        # The shortcut's gradient is the cotangent itself. Returned from a jitted function that
        # does not own it, XLA copies it into a fresh buffer; inside a train step it is an
        # intermediate XLA owns and forwards. Donating the cotangent (a fresh copy per call, made
        # untimed) gives both layers that train-step view.
        jf = jax.jit(vjp, donate_argnums=2)

        def fresh():
            x = d.jax.numpy.array(g, copy=True)
            x.block_until_ready()
            return (x,)

        return (lambda x: jax.block_until_ready(jf(a, b, x))), fresh

    return {op: (lambda d, op=op: build(d, op)) for op in KERAS_OPS}


def _keras_ours(d):
    import stochdepth.keras as sdk

    return sdk.StochasticDepth(d.p, seed=d.seed, dtype=d.dtype)


def _kerasfactory(d):
    from kerasfactory.layers import StochasticDepth

    # Seeded: unseeded, its random ops cannot be traced by jax.jit (Keras refuses them).
    return StochasticDepth(d.p, seed=d.seed, dtype=d.dtype)


KERAS_ROWS = [
    Row("stochdepth.keras", "stochdepth.keras", framework="keras", ours=True,
        ops=_layer_ops(_keras_ours)),
    Row("kerasfactory", "kerasfactory", framework="keras", anchor="kerasfactory",
        ops=_layer_ops(_kerasfactory)),
]


def _keras_rows_here(shape, dtype, p, reps, seed):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import stochdepth.keras  # noqa: F401 - missing, the rows fail: kerasfactory alone is no row

    rng = np.random.default_rng(0)
    a, b, g = (jnp.asarray(rng.standard_normal(shape).astype(dtype)) for _ in range(3))
    n_bytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    d = types.SimpleNamespace(jax=jax, p=p, seed=seed, dtype=dtype, a=a, b=b, g=g)
    rows = []
    for row in KERAS_ROWS:
        for op in KERAS_OPS:
            _timed(rows, _row(row.name, op, shape, dtype, p, reps, n_bytes), row.ops[op], d,
                   reps)
    return rows


def keras_jax_rows(shape=CASE, dtype="float32", p=0.8, reps=10, *, seed=1234):
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() == "jax":
            return _keras_rows_here(shape, dtype, p, reps, seed)
    return rows_in_subprocess(
        "jax", "stochdepth.bench.jax_rows",
        f"_keras_rows_here({tuple(shape)!r}, {dtype!r}, {float(p)!r}, {int(reps)!r}, "
        f"{int(seed)!r})")


def _print(title, rows, base_impl):
    print(title)
    base = {(r["dtype"], r["op"]): r.get("median_ms") for r in rows if r["impl"] == base_impl}
    for r in rows:
        if "error" in r:
            print(f"  {r['impl']:26s} {r['dtype']:9s} {r['op']:17s} FAILED: {r['error']}")
            continue
        ref = base.get((r["dtype"], r["op"]))
        vs = f"  {ref / r['median_ms']:5.1f}x vs {base_impl}" if ref and r["impl"] != base_impl \
            else ""
        print(f"  {r['impl']:26s} {r['dtype']:9s} {r['op']:17s} {r['median_ms']:9.2f}{vs}")


def report(p, reps, *, quick=False, keras=True):
    """Takes, prints and returns the JAX rows (and the Keras-on-JAX rows unless keras=False)."""
    shape = QUICK_CASE if quick else CASE
    out = {"shape": list(shape)}
    try:
        rows = [r for dt in ("float32", "bfloat16") for r in jax_rows(shape, dt, p, reps)]
    except Exception as exc:  # noqa: BLE001 - jax missing or the module not built: say so
        print(f"\nJAX rows skipped: {short_error(exc)}")
        return {"error": short_error(exc)}
    _print(f"\nJAX on the CPU, {shape}, p={p} (median of {reps}, ms; not interleaved with a "
           f"ceiling)", rows, "jax.jit formula")
    out["rows"] = rows
    if keras:
        try:
            kshape = QUICK_KERAS_CASE if quick else KERASFACTORY_SHAPE
            krows = keras_jax_rows(kshape, "float32", p, reps)
            _print(f"\nKeras layer on the JAX backend, {kshape} float32, p={p}", krows,
                   "kerasfactory")
            out["keras_rows"] = krows
        except Exception as exc:  # noqa: BLE001
            print(f"\nKeras (JAX backend) rows skipped: {short_error(exc)}")
            out["keras_error"] = short_error(exc)
    return out


SECTION = Section(
    key="jax", title="JAX rows", devices=("cpu",),
    skipped=lambda args: "disabled by --no-jax" if args.no_jax else None,
    run=lambda args: report(args.p, 3 if args.quick else 10, quick=args.quick,
                            keras=not args.no_keras))
