"""stochdepth.torch has one implementation per op, reached two ways: the eager fast path (a small
autograd.Function) and the registered custom op. Both must give the same bits and the same first
and second derivatives for every op; one predicate, `_mode.eager`, picks the custom op wherever a
tracer or a mode watches; nothing but the 16-byte (seed, offset) is saved for backward.
"""

from __future__ import annotations

import ast
import pathlib
import warnings

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.torch import _mode as mode  # noqa: E402
from stochdepth.torch import _ops  # noqa: E402
from stochdepth.torch._keys import Key, Rng  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch_util import assert_same, randn, saved_tensors, to_numpy  # noqa: E402

import stochdepth  # noqa: E402
from stochdepth import reference as ref  # noqa: E402

# torch.compile and AOT autograd graphs: tens of seconds cold, above the GPU check's 60 s default
pytestmark = [pytest.mark.torch, pytest.mark.timeout(300)]

PACKAGE = pathlib.Path(sdt.__file__).parent


class Record(TorchDispatchMode):
    """A pass-through dispatch mode that records the ops it sees. Any such mode makes the
    adapter take the custom-op path, forward and backward."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def _both_paths(case):
    """case() on the eager fast path, then under Record (the custom ops): results, and the ops
    Record saw."""
    eager = case()
    with Record() as rec:
        ops = case()
    assert len(eager) == len(ops)
    for a, b in zip(eager, ops):
        assert_same(a, b)
    return eager, rec.ops


def _dense_case(dtype, shortcut, training, mode_, axis, scaling):
    def case():
        sc = randn((7, 3, 4), dtype, 1).requires_grad_() if shortcut else None
        res = randn((7, 3, 4), dtype, 2).requires_grad_()
        out = sdt.stochastic_depth(sc, res, 0.6, training, mode=mode_, axis=axis,
                                   scaling=scaling, seed=2**64 - 7, offset=2**63 + 1)
        grad = randn(out.shape, dtype, 3).requires_grad_()
        inputs = (res,) if sc is None else (res, sc)
        grads = torch.autograd.grad(out, inputs, grad, create_graph=True)
        # Double backward: d/d(grad) of <grads[0], v>, through drop_path_bwd's own autograd.
        (gg,) = torch.autograd.grad(grads[0], grad, randn(out.shape, dtype, 4))
        return (out, *grads, gg)

    return case


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shortcut,training,mode_,axis,scaling", [
    (True, True, "row", 0, "training"),
    (True, True, "batch", 1, "inference"),
    (False, True, "row", -1, "training"),
    (True, False, "row", 0, "inference"),
])
def test_dense_ops_same_bits_and_gradients_on_both_paths(dtype, shortcut, training, mode_, axis,
                                                         scaling):
    case = _dense_case(dtype, shortcut, training, mode_, axis, scaling)
    (out, g_res, *rest), ops = _both_paths(case)
    assert {"stochdepth.drop_path_fwd.default", "stochdepth.drop_path_bwd.default"} <= ops
    # and the values are the reference's
    kw = dict(training=training, seed=2**64 - 7, offset=2**63 + 1, mode=mode_, axis=axis,
              scaling=scaling)
    sc = to_numpy(randn((7, 3, 4), dtype, 1)) if shortcut else None
    assert_same(out, ref.forward(sc, to_numpy(randn((7, 3, 4), dtype, 2)), 0.6, **kw))
    g = to_numpy(randn((7, 3, 4), dtype, 3))
    assert_same(g_res, ref.backward(g, 0.6, **kw)[1])
    assert_same(rest[-1], ref.backward(to_numpy(randn((7, 3, 4), dtype, 4)), 0.6, **kw)[1])
    if shortcut:
        assert_same(rest[0], g)  # grad_shortcut is grad_out


def test_eager_calls_take_the_fast_path():
    x = randn((6, 5)).requires_grad_()
    assert type(sdt.drop_path(x, 0.5, True, seed=1).grad_fn).__name__ == "_FwdFunctionBackward"
    assert 0 < stochdepth.mask(6, 0.5, seed=2).sum() < 6
    y = sdt.stochastic_residual(x, lambda t: t * 2.0, 0.5, seed=2)
    assert type(y.grad_fn).__name__ == "_ScatterFunctionBackward"
    with Record():
        assert "Generated" in type(sdt.drop_path(x, 0.5, True, seed=1).grad_fn).__name__


@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_compact_ops_same_bits_and_gradients_on_both_paths(scaling):
    batch, p, seed, offset = 12, 0.6, 4, 2
    n_kept = int(stochdepth.mask(batch, p, seed=seed, offset=offset).sum())
    assert 0 < n_kept < batch  # the gather and the scatter both run

    def case():
        x = randn((batch, 5), torch.float64).requires_grad_()
        w = randn((5,), torch.float64, 1).requires_grad_()
        out = sdt.stochastic_residual(x, lambda t: torch.tanh(t * w), p, seed=seed,
                                      offset=offset, scaling=scaling)
        grad = randn(out.shape, torch.float64, 2).requires_grad_()
        gx, gw = torch.autograd.grad(out, (x, w), grad, create_graph=True)
        (gg,) = torch.autograd.grad((gx * randn(gx.shape, torch.float64, 3)).sum(), grad)
        return out, gx, gw, gg

    (out, *_), ops = _both_paths(case)
    assert {"stochdepth.gather_kept.default", "stochdepth.scatter_kept.default"} <= ops
    x = randn((batch, 5), torch.float64)
    branch = torch.tanh(x * randn((5,), torch.float64, 1))
    assert_same(out, sdt.stochastic_depth(x, branch, p, seed=seed, offset=offset,
                                          scaling=scaling))

    # The ops one by one, first and second order: gather's adjoint is scatter and back. Each
    # call takes the path its caller chose, with the pair in that path's form.
    def ops_case():
        full = randn((batch, 3), torch.float64, 5).requires_grad_()
        eager = mode.eager(full)
        key = Key(seed, offset) if eager else Rng(seed, offset).tensor()
        kept = _ops.gather(eager, full, key, p, False, scaling, n_kept)
        g = randn(kept.shape, torch.float64, 6).requires_grad_()
        (g_full,) = torch.autograd.grad(kept, full, g, create_graph=True)
        (gg,) = torch.autograd.grad(g_full, g, randn(g_full.shape, torch.float64, 7))
        back = _ops.scatter(eager, None, kept, key, p, False, scaling, batch)
        return kept, g_full, gg, back

    _both_paths(ops_case)


def test_only_the_rng_words_are_saved():
    sc, res = randn((8, 4)).requires_grad_(), randn((8, 4), seed=1).requires_grad_()
    cases = [
        lambda: sdt.stochastic_depth(sc, res, 0.5, seed=1),
        lambda: sdt.drop_path(res, 0.3, True),
        lambda: sdt.StochasticDepth(0.7, seed=4)(sc, res),
        lambda: sdt.stochastic_residual(res, lambda t: t * 2.0, 0.5, seed=1),
    ]
    for fn in cases:
        packed, out = saved_tensors(fn)
        assert packed == []  # eager: (seed, offset) kept as Python ints
        with Record():  # custom ops, values not read: the 16-byte [seed, offset] tensor only
            packed, out = saved_tensors(fn)
        assert packed and all(t.dtype == torch.int64 and t.shape == (2,) for t in packed)
        out.sum().backward()


def _aot_graphs(fn, *args):
    """fn compiled with AOT autograd; the forward and backward graphs' code and backward inputs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True,  # one graph: a graph break would be an error
                        backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))(*args)
    out.backward(torch.ones_like(out))
    return out, graphs


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_graphs_use_the_ops_and_save_only_the_rng():
    sc, res = randn((8, 4)).requires_grad_(), randn((8, 4), seed=1).requires_grad_()
    cases = [
        (lambda a, b: sdt.stochastic_depth(a, b, 0.5, seed=3, scaling="training"),
         ["drop_path_fwd"], ["drop_path_bwd"]),
        (lambda a, b: a + sdt.stochastic_residual(b, lambda t: t * 3.0, 0.5, seed=3),
         ["select_kept", "scatter_kept"], ["gather_kept", "scatter_kept"]),
    ]
    for fn, fw_ops, bw_ops in cases:
        out, graphs = _aot_graphs(fn, sc, res)
        assert_same(out, fn(sc.detach(), res.detach()))
        fw, bw = graphs[0].code, graphs[-1].code
        assert all(f"stochdepth.{op}" in fw for op in fw_ops), fw
        assert all(f"stochdepth.{op}" in bw for op in bw_ops), bw
        saved = [n.meta["val"] for n in graphs[-1].graph.nodes  # forward hands to backward
                 if n.op == "placeholder" and not n.name.startswith("tangents")]
        # StochasticResidual's backward also gets the kept count, an integer (the compiled
        # gather's data-dependent size: docs/design.md, "Skipping dropped samples").
        words = [v for v in saved if not isinstance(v, torch.SymInt)]
        counts = len(saved) - len(words)
        assert counts == (1 if "select_kept" in fw_ops else 0)
        assert words and all(v.dtype == torch.int64 and tuple(v.shape) == (2,) for v in words)


def test_make_fx_records_every_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    x = randn((8, 3))
    code = make_fx(lambda t: sdt.stochastic_residual(
        sdt.drop_path(t, 0.5, True, seed=1), lambda u: u * 2.0, 0.5, seed=2))(x).code
    for op in ("drop_path_fwd", "gather_kept", "scatter_kept"):
        assert f"stochdepth.{op}" in code


def test_the_predicate():
    x = randn((4, 3))
    assert mode.eager(x) and mode.eager(None, x) and mode.eager()
    assert not mode.eager(torch.empty(2, device="meta"))
    assert not mode.eager(torch.nn.Parameter(x))  # subclasses go through the op
    with Record():
        assert not mode.eager(x)
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not mode.eager(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as fake:
        assert not mode.eager(fake.from_tensor(x))
    seen = []
    torch.func.vmap(lambda t: seen.append(mode.eager(t)) or t)(x)
    torch.func.functionalize(lambda t: seen.append(mode.eager(t)) or t)(x)
    torch.compile(lambda t: seen.append(mode.eager(t)) or t + 1, backend="eager")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated
        torch.jit.trace(lambda t: seen.append(mode.eager(t)) or t * 2, x, check_trace=False)
    assert seen == [False] * 4


def test_one_autograd_definition_per_op():
    # The registered autograd and the eager autograd.Function are built from the same body,
    # setup_context and backward.
    from stochdepth.torch import _kernels

    defs = [
        (_ops.drop_path_fwd, _ops._FwdFunction, _kernels.forward, _ops._fwd_setup,
         _ops._fwd_backward),
        (_ops.drop_path_bwd, _ops._BwdFunction, _kernels.backward, _ops._bwd_setup,
         _ops._bwd_backward),
        (_ops.scatter_kept, _ops._ScatterFunction, _kernels.scatter, _ops._scatter_setup,
         _ops._scatter_backward),
        (_ops.gather_kept, _ops._GatherFunction, _kernels.gather, _ops._gather_setup,
         _ops._gather_backward),
    ]
    for op, function, body, setup, backward in defs:
        assert op._setup_context_fn is setup and op._backward_fn is backward
        assert function.backward is backward
        assert {c.cell_contents for c in function.forward.__closure__} == {body, setup}


def _package_sources():
    return {p.stem: p.read_text() for p in PACKAGE.glob("*.py")}


def test_private_torch_apis_only_in_the_predicate_and_no_import_cycle():
    graph = {}
    for name, text in _package_sources().items():
        tree = ast.parse(text)
        uses_private = any(
            isinstance(n, ast.Attribute) and n.attr.startswith("_") and
            isinstance(n.value, (ast.Name, ast.Attribute)) and ast.unparse(n.value) == "torch"
            for n in ast.walk(tree))
        assert not uses_private or name == "_mode", name
        deps = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.level == 1:
                deps |= {n.module} if n.module else {a.name for a in n.names}
        graph[name] = deps - {"__init__"}
    assert all(len(t.splitlines()) <= 500 for t in _package_sources().values())
    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import cycle: {visiting + [m]}"
        if m in done or m not in graph:
            return
        visiting.append(m)
        for d in graph[m]:
            visit(d)
        visiting.pop()
        done.add(m)

    for m in graph:
        visit(m)
    assert "__init__" not in {d for deps in graph.values() for d in deps}


def test_rng_round_trip_and_rank():
    for seed, offset in [(0, 0), (2**64 - 1, 2**63), (2**63 - 1, 5)]:
        r = Rng(seed, offset)
        t = r.tensor()
        assert t.dtype == torch.int64 and t.shape == (2,)
        assert Rng.of(t) == r and Key.of(t) == Key(seed, offset)
        assert Key(seed, offset).tensor().tolist() == t.tolist()
        assert r.for_rank(-1) is r and Key(*r).for_rank(-1) == Key(*r)
        assert r.for_rank(3) == Rng(sdt.rank_seed(seed, 3), offset)
        assert Key(*r).for_rank(3) == Key(*r.for_rank(3))


def test_forcing_the_op_path_in_plain_eager(monkeypatch):
    # With the predicate off, plain eager calls run the registered ops, whose autograd then sees
    # concrete rng tensors: same bits as the fast path, and still no tensor saved.
    fast = _dense_case(torch.float32, True, True, "row", 0, "training")()
    monkeypatch.setattr(mode, "eager", lambda *tensors: False)
    slow = _dense_case(torch.float32, True, True, "row", 0, "training")()
    for a, b in zip(fast, slow):
        assert_same(a, b)
    assert "Generated" in type(slow[0].grad_fn).__name__
    monkeypatch.undo()
    sc, res = randn((9, 4)).requires_grad_(), randn((9, 4), seed=1).requires_grad_()
    rng = Rng(3, 0).tensor()
    packed, out = saved_tensors(
        lambda: _ops.drop_path_fwd(sc, res, rng, 0.5, True, False, 0, "inference", -1))
    assert packed == [] and "Generated" in type(out.grad_fn).__name__
