"""Activation checkpointing (docs/design.md, "Activation checkpointing"): a forward recomputed by
torch.utils.checkpoint draws the mask of the forward it replays, so a checkpointed model's
gradients, step after step, equal the same model's without checkpointing, exactly."""

import warnings

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils import checkpoint as cp  # noqa: E402

DIM = 8
STEPS = 3


class Block(nn.Module):
    """linear -> drop path -> linear: the second linear saves the drop path's output, so a
    non-reentrant checkpoint's recompute runs the drop path too (early stop cannot skip it)."""

    def __init__(self, kind, seed):
        super().__init__()
        self.lin1 = nn.Linear(DIM, DIM)
        self.lin2 = nn.Linear(DIM, DIM)
        self.kind = kind
        if kind == "DropPath":
            self.sd = sdt.DropPath(0.5, seed=seed)
        elif kind == "TorchvisionStochasticDepth":
            self.sd = sdt.TorchvisionStochasticDepth(0.5, "row", seed=seed)
        elif kind == "StochasticDepth":
            self.sd = sdt.StochasticDepth(0.5, seed=seed)
        elif kind == "StochasticResidual":
            self.sd = sdt.StochasticResidual(nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh()), 0.5,
                                             seed=seed)
        else:
            raise ValueError(kind)

    def forward(self, x):
        h = self.lin1(x)
        if self.kind == "StochasticDepth":
            h = self.sd(x, torch.tanh(h))
        else:
            h = self.sd(h)
        return torch.tanh(self.lin2(h))


KINDS = ["DropPath", "TorchvisionStochasticDepth", "StochasticDepth", "StochasticResidual"]
CHECKPOINTS = {
    "reentrant": dict(use_reentrant=True),
    "non-reentrant": dict(use_reentrant=False),
    "non-reentrant, no early stop": dict(use_reentrant=False, early_stop=False),
    "reentrant, rng state not kept": dict(use_reentrant=True, preserve_rng_state=False),
    "non-reentrant, rng state not kept": dict(use_reentrant=False, preserve_rng_state=False),
}


def _train(make_model, run, steps=STEPS):
    """Per step: the input's and every parameter's gradient; then the modules' offsets."""
    torch.manual_seed(0)
    model = make_model()
    out = []
    for _ in range(steps):
        x = torch.randn(32, DIM, requires_grad=True)
        model.zero_grad()
        run(model, x).square().sum().backward()
        out.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()])
    offsets = [m.offset for m in model.modules() if hasattr(m, "offset")]
    return out, offsets


def _assert_same_training(a, b):
    grads_a, offsets_a = a
    grads_b, offsets_b = b
    assert offsets_a == offsets_b
    for step_a, step_b in zip(grads_a, grads_b):
        assert len(step_a) == len(step_b)
        for ga, gb in zip(step_a, step_b):
            assert torch.equal(ga, gb)


class Stack(nn.Module):
    def __init__(self, kind, seed, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(kind, None if seed is None else seed + i)
                                    for i in range(depth))

    def forward(self, x, **checkpoint):
        for block in self.blocks:
            x = cp.checkpoint(block, x, **checkpoint) if checkpoint else block(x)
        return x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [123, None], ids=["seeded", "unseeded"])
@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
def test_checkpointed_training_equals_plain_training(kind, seed, checkpoint):
    if seed is None and "not kept" in checkpoint:
        pytest.skip("unseeded modules draw from torch's generator, which this checkpoint does "
                    "not restore (as for torch's own dropout)")

    def make():
        return Stack(kind, seed)

    plain = _train(make, lambda m, x: m(x))
    checkpointed = _train(make, lambda m, x: m(x, **CHECKPOINTS[checkpoint]))
    _assert_same_training(plain, checkpointed)


def test_the_plain_run_would_differ_with_another_mask():
    # The comparison above can fail: one module's mask moved by one offset changes the gradients.
    plain = _train(lambda: Stack("DropPath", 123), lambda m, x: m(x))

    def make_shifted():
        model = Stack("DropPath", 123)
        model.blocks[1].sd.load_state_dict({"rng_state": torch.tensor([124, 1])})
        return model

    shifted = _train(make_shifted, lambda m, x: m(x))
    assert not all(torch.equal(a, b) for a, b in zip(plain[0][0], shifted[0][0]))


class Shared(nn.Module):
    """One seeded module called twice in a checkpointed segment, and again outside it (older timm
    blocks use one `drop_path` for both branches)."""

    def __init__(self):
        super().__init__()
        # Distinct linears: a shared parameter's gradient would be summed in another order under
        # the reentrant checkpoint (its own backward per segment), which float addition sees.
        self.lins = nn.ModuleList(nn.Linear(DIM, DIM) for _ in range(5))
        self.dp = sdt.DropPath(0.5, seed=7)

    def segment(self, x, first):
        x = x + self.dp(torch.tanh(self.lins[first](x)))
        return x + self.dp(torch.tanh(self.lins[first + 1](x)))

    def forward(self, x, **checkpoint):
        x = cp.checkpoint(self.segment, x, 0, **checkpoint) if checkpoint else self.segment(x, 0)
        x = x + self.dp(torch.tanh(self.lins[2](x)))
        return cp.checkpoint(self.segment, x, 3, **checkpoint) if checkpoint else self.segment(x, 3)


@pytest.mark.parametrize("checkpoint", ["reentrant", "non-reentrant"])
def test_a_module_called_several_times_replays_each_call_in_order(checkpoint):
    plain = _train(Shared, lambda m, x: m(x))
    checkpointed = _train(Shared, lambda m, x: m(x, **CHECKPOINTS[checkpoint]))
    _assert_same_training(plain, checkpointed)
    assert plain[1] == [5 * STEPS]


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_sequential(use_reentrant):
    def make():
        return nn.Sequential(*[Block("DropPath", 40 + i) for i in range(4)])

    plain = _train(make, lambda m, x: m(x))
    checkpointed = _train(make, lambda m, x: cp.checkpoint_sequential(
        m, 2, x, use_reentrant=use_reentrant))
    _assert_same_training(plain, checkpointed)


def test_nested_checkpoints():
    def run(model, x):
        def outer(t):
            t = cp.checkpoint(model.blocks[0], t, use_reentrant=False)
            return model.blocks[2](model.blocks[1](t))
        return cp.checkpoint(outer, x, use_reentrant=False)

    make = lambda: Stack("DropPath", 5)  # noqa: E731
    _assert_same_training(_train(make, lambda m, x: m(x)), _train(make, run))


def test_a_second_backward_replays_again():
    # Non-reentrant checkpoints recompute once per backward: retain_graph and two backwards.
    torch.manual_seed(0)
    block = Block("DropPath", 3)
    x = torch.randn(32, DIM, requires_grad=True)
    y = cp.checkpoint(block, x, use_reentrant=False).square().sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x)
    torch.manual_seed(0)
    plain = Block("DropPath", 3)
    xp = torch.randn(32, DIM, requires_grad=True)
    (gp,) = torch.autograd.grad(plain(xp).square().sum(), xp)
    assert torch.equal(g1, gp) and torch.equal(g2, gp)
    assert block.sd.offset == plain.sd.offset == 1


def test_a_recompute_that_calls_more_often_than_its_forward_is_refused():
    dp = sdt.DropPath(0.5, seed=1)

    def segment(t):
        # The reentrant first pass runs without grad; the recompute, with it.
        return dp(t) if torch.is_grad_enabled() else t * 1.0

    x = torch.randn(4, DIM, requires_grad=True)
    y = cp.checkpoint(segment, x, use_reentrant=True)
    with pytest.raises(RuntimeError, match=r"DropPath\(seed=1\) is called 1 time\(s\) in the "
                                           r"recompute of a checkpointed forward that called it "
                                           r"0 time\(s\)"):
        y.sum().backward()


def test_a_seeded_forward_inside_backward_outside_checkpoint_warns():
    dp = sdt.DropPath(0.5, seed=1)
    x = torch.randn(4, DIM, requires_grad=True)
    seen = []

    def hook(grad):
        with torch.enable_grad():
            seen.append(dp(grad.detach().requires_grad_()))
        return grad

    y = x * 2.0
    y.register_hook(hook)
    with pytest.warns(RuntimeWarning, match=r"ran a training forward inside a backward pass, "
                                            r"outside torch.utils.checkpoint"):
        y.sum().backward()
    assert len(seen) == 1 and dp.offset == 1


def test_ordinary_calls_record_nothing():
    # Outside a checkpoint nothing is kept anywhere, and no warning is raised.
    dp = sdt.DropPath(0.5, seed=1)
    x = torch.randn(4, DIM, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dp(x).sum().backward()
        with torch.no_grad():
            dp(x)
    assert dp.offset == 2


@pytest.mark.timeout(300)  # torch.compile: tens of seconds cold
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("kind", ["DropPath", "StochasticDepth", "StochasticResidual"])
@pytest.mark.parametrize("seed", [21, None], ids=["seeded", "unseeded"])
def test_checkpoint_under_torch_compile(kind, use_reentrant, seed):
    # Inside a compiled graph the checkpointed region's ops are recomputed in backward from the
    # graph's inputs, a seeded module's state among them: the state must not have been advanced
    # in place by then. A seeded module's state update is a side effect that dynamo does not
    # trace inside a checkpoint (fullgraph=True refuses it, loudly): without fullgraph the region
    # runs eagerly, where the replay applies. Unseeded modules trace with fullgraph=True.
    # aot_eager runs the partitioned graphs with eager kernels: exact.
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = {}
    fullgraph = seed is None and kind != "StochasticResidual"

    def run(model, x):
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(model, backend=counting, fullgraph=fullgraph)
        return compiled["fn"](x, use_reentrant=use_reentrant)

    make = lambda: Stack(kind, seed)  # noqa: E731
    plain = _train(make, lambda m, x: m(x), steps=4)
    _assert_same_training(plain, _train(make, run, steps=4))
    if fullgraph:
        assert len(graphs) == 1  # a fresh mask each step, no recompile


@pytest.mark.timeout(300)
def test_a_seeded_module_compiles_without_recompiles():
    # The state is replaced on each call (not advanced in place): still one graph for every
    # offset, and the offsets and gradients of eager training.
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = {}

    def run(model, x):
        if "fn" not in compiled:
            compiled["fn"] = torch.compile(model, backend=counting, fullgraph=True)
        return compiled["fn"](x)

    make = lambda: Stack("DropPath", 21)  # noqa: E731
    _assert_same_training(_train(make, lambda m, x: m(x), steps=5), _train(make, run, steps=5))
    assert len(graphs) == 1
