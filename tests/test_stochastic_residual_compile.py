"""StochasticResidual and stochastic_residual under torch.compile(fullgraph=True) (docs/design.md,
"Skipping dropped samples"): the block is in the graph, the kept count is a data-dependent size,
so one graph serves every mask, and the compiled steps give eager mode's outputs, gradients and
offsets bit for bit. aot_eager runs the compiled graphs with eager kernels: exact."""

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from functorch.compile import make_boxed_func  # noqa: E402
from stochdepth.torch import _ops, residual  # noqa: E402
from stochdepth.torch._keys import Rng, rank_seed  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402

import stochdepth  # noqa: E402

BATCH, DIM, STEPS = 24, 8, 200


def _counting_backend():
    """A torch.compile backend that records each graph it is given (one per compilation) and runs
    it with aot_eager."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend, graphs


class _Model(nn.Module):
    """Two blocks: a row-mode one (kept counts vary over most of 0..BATCH) and a batch-mode one
    (all or nothing); a branch with parameters and a GELU, sample-wise."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(0)
        branch = lambda: nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())  # noqa: E731
        self.row = sdt.StochasticResidual(branch(), 0.6, seed=seed)
        self.all_or_none = sdt.StochasticResidual(branch(), 0.5, mode="batch", scaling="training",
                                                  seed=None if seed is None else seed + 1)

    def forward(self, x):
        return self.all_or_none(self.row(x))


class _Functional(nn.Module):
    """The same two blocks through stochastic_residual; seeded: (seed, offset=step)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())
        self.b = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU())
        self.seed = seed

    def forward(self, x, step):
        kw = {} if self.seed is None else dict(seed=self.seed, offset=step)
        h = sdt.stochastic_residual(x, self.a, 0.6, **kw)
        kw = {} if self.seed is None else dict(seed=self.seed + 1, offset=step)
        return sdt.stochastic_residual(h, self.b, 0.5, mode="batch", scaling="training", **kw)


def _step(model, step, call):
    """One training step: the output, the input's gradient and every parameter's gradient (a
    branch that did not run, eagerly, has no gradient: compared as zeros, which is what the
    compiled graph gives, as dense stochastic depth does)."""
    torch.manual_seed(1000 + step)  # the unseeded draws: the same words in both runs
    x = torch.randn(BATCH, DIM, dtype=torch.float64, requires_grad=True)
    model.zero_grad()
    out = call(x, step)
    out.square().sum().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for p in model.parameters()]
    return [out.detach(), x.grad] + grads


@pytest.mark.timeout(600)  # torch.compile: tens of seconds cold, four compilations
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("kind", ["module", "function"])
@pytest.mark.parametrize("seed", [11, None], ids=["seeded", "unseeded"])
def test_one_graph_serves_every_kept_count_and_matches_eager(kind, seed):
    make = (lambda: _Model(seed).double()) if kind == "module" else (  # noqa: E731
        lambda: _Functional(seed).double())
    if kind == "module":
        call = lambda m: (lambda x, step: m(x))  # noqa: E731
    else:
        call = lambda m: (lambda x, step: m(x, step))  # noqa: E731
    eager_model, compiled_model = make(), make()
    backend, graphs = _counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for step in range(STEPS):
        want = _step(eager_model, step, call(eager_model))
        got = _step(compiled_model, step, call(compiled))
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert torch.equal(w, g), step
    if kind == "module" and seed is not None:
        assert compiled_model.row.offset == eager_model.row.offset == STEPS
        # The steps' kept counts: many distinct sizes, one graph.
        counts = {int(stochdepth.mask(BATCH, 0.6, seed=seed, offset=o).sum())
                  for o in range(STEPS)}
        assert len(counts) >= 8
    # One graph for every mask. The seeded function's offset is a Python int: dynamo specialises
    # the first call on it and recompiles once with the int dynamic (any function of a changing
    # int does; stochastic_depth too), never per kept count.
    assert len(graphs) == (2 if kind == "function" and seed is not None else 1)


@pytest.mark.timeout(300)
def test_the_graph_holds_the_block_and_saves_only_the_pair_and_the_count():
    block = sdt.StochasticResidual(nn.Linear(DIM, DIM), 0.6, seed=1)
    x = torch.randn(BATCH, DIM, requires_grad=True)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True,  # a graph break would be an error
                             backend=aot_autograd(fw_compiler=capture, bw_compiler=capture))
    compiled(x).sum().backward()
    fw, bw = graphs[0], graphs[-1]
    assert "stochdepth.select_kept" in fw.code and "stochdepth.scatter_kept" in fw.code
    assert "stochdepth.gather_kept" in bw.code and "stochdepth.scatter_kept" in bw.code
    # What the forward hands to the backward: the [seed, offset] words, the kept count (an
    # integer) and what the branch saves itself (the Linear's input, the kept rows, and its
    # weight): no mask and nothing of the whole batch.
    saved = [n.meta["val"] for n in bw.graph.nodes
             if n.op == "placeholder" and not n.name.startswith("tangents")]
    words = [v for v in saved if isinstance(v, torch.Tensor) and v.dtype == torch.int64]
    counts = [v for v in saved if isinstance(v, torch.SymInt)]
    floats = [v for v in saved if isinstance(v, torch.Tensor) and v.dtype == torch.float32]
    assert words and all(tuple(v.shape) == (2,) for v in words)
    assert len(counts) == 1 and len(words) + len(counts) + len(floats) == len(saved)
    kept_rows = [v for v in floats if str(v.shape[0]) == str(counts[0])]
    assert len(kept_rows) == 1 and tuple(kept_rows[0].shape[1:]) == (DIM,)
    assert all(tuple(v.shape) == (DIM, DIM) for v in floats if v is not kept_rows[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_static_probabilities_skip_or_keep_everything_as_eager(p):
    # p = 0 keeps nothing: the branch is not in the graph; p = 1 keeps every sample: no gather.
    seen = []

    def branch(t):
        seen.append(t.shape[0])
        return torch.tanh(t * 2.0)

    x = torch.randn(BATCH, DIM, requires_grad=True)
    backend, graphs = _counting_backend()
    torch._dynamo.reset()
    fn = torch.compile(lambda t: sdt.stochastic_residual(t, branch, p, seed=5, offset=3),
                       backend=backend, fullgraph=True)
    out = fn(x)
    assert seen == ([BATCH] if p == 1.0 else [])  # traced on the whole batch, or not at all
    assert torch.equal(out, sdt.stochastic_residual(x, branch, p, seed=5, offset=3))
    code = "".join(g.code for g in graphs)  # p = 0: x itself, no graph to compile
    assert ("tanh" in code) == (p == 1.0) and "select_kept" not in code


@pytest.mark.timeout(300)
def test_distributed_rank_applies_in_the_graph(monkeypatch):
    # Rank r's seed is rank_seed(seed, r) (docs/design.md, "Randomness in the adapters"): in the
    # graph through stochdepth::rank_rng, on the host eagerly; the same mask.
    monkeypatch.setattr(residual, "rank_key", lambda sync: 3)
    branch = nn.Linear(DIM, DIM)
    x = torch.randn(BATCH, DIM)
    torch._dynamo.reset()
    fn = torch.compile(lambda t: sdt.stochastic_residual(t, branch, 0.5, seed=9, offset=2),
                       backend="aot_eager", fullgraph=True)
    want = sdt.stochastic_residual(x, branch, 0.5, seed=9, offset=2)
    assert torch.equal(fn(x), want)
    keep = torch.from_numpy(stochdepth.mask(BATCH, 0.5, seed=rank_seed(9, 3), offset=2))
    assert torch.equal(want[~keep], x[~keep]) and not torch.equal(want[keep], x[keep])


def test_rank_rng_op():
    rng = Rng(2**63 + 5, 7).tensor()
    assert torch.equal(_ops.rank_rng(rng, 2), Rng(rank_seed(2**63 + 5, 2), 7).tensor())
    assert torch.equal(_ops.rank_rng(rng, -1), rng)
    torch.library.opcheck(_ops.rank_rng, (rng, 1))
    with pytest.raises(ValueError, match=r"rng must be an int64 tensor \[seed, offset\] of shape "
                                         r"\(2,\), got shape \(3,\)"):
        _ops.rank_rng(torch.zeros(3, dtype=torch.int64), 1)


def test_select_kept_op():
    rng = Rng(5, 1).tensor()
    full = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    keep = torch.from_numpy(stochdepth.mask(16, 0.5, seed=5, offset=1))
    kept = _ops.select_kept(full, rng, 0.5, False)
    assert torch.equal(kept, full[keep])
    (g,) = torch.autograd.grad(kept, full, torch.ones_like(kept))
    assert torch.equal(g, keep[:, None].expand(16, 3).to(g.dtype))
    assert _ops.select_kept(full, rng, 0.5, True).shape[0] in (0, 16)
    torch.library.opcheck(_ops.select_kept, (full, rng, 0.5, False))
    with pytest.raises(ValueError, match="full must have rank >= 1"):
        _ops.select_kept(torch.tensor(1.0), rng, 0.5, False)
    with pytest.raises(TypeError, match="rng must be an int64 tensor"):
        _ops.select_kept(full, rng.float(), 0.5, False)
    with pytest.raises(ValueError, match="survival_prob"):
        _ops.select_kept(full, rng, 1.5, False)
