"""StochasticResidual (issue 6): the branch runs on the kept samples only, and the result equals
dense stochastic depth with the same seed and offset."""

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as st  # noqa: E402
from torch import nn  # noqa: E402

import stochdepth  # noqa: E402


class Recorder(nn.Module):
    """A per-sample branch (no batch statistics) that records the batch sizes it saw."""

    def __init__(self, dim, dtype):
        super().__init__()
        self.lin = nn.Linear(dim, dim, dtype=dtype)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return torch.tanh(self.lin(x))


def _elementwise(w):
    # Uses its input once: with two uses autograd sums x's gradient contributions in a different
    # order in the dense graph (x feeds the branch directly) than in the skipping one (through
    # index_select), and float addition is not associative.
    return lambda t: torch.tanh(t * w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("scaling", ["inference", "training"])
def test_equals_dense_stochastic_depth(dtype, p, mode, scaling):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 5, 8, dtype=dtype, generator=gen, requires_grad=True)
    w = torch.randn(5, 8, dtype=dtype, generator=gen, requires_grad=True)
    branch = _elementwise(w)
    kw = dict(mode=mode, scaling=scaling, seed=123, offset=9)
    out = st.stochastic_residual(x, branch, p, **kw)
    dense = st.stochastic_depth(x, branch(x), p, **kw)
    assert torch.equal(out, dense)
    upstream = torch.randn(out.shape, dtype=dtype, generator=gen)
    gx, gw = torch.autograd.grad(out, (x, w), upstream, allow_unused=True)
    dx, dw = torch.autograd.grad(dense, (x, w), upstream)
    # The input gradient is elementwise: exact. The parameter gradient sums over the batch, and
    # the dense version adds exact zeros for dropped samples, which reorders that sum: close.
    assert torch.equal(gx, dx)
    if gw is None:  # nothing kept: the branch did not run at all
        assert torch.count_nonzero(dw) == 0
    else:
        torch.testing.assert_close(gw, dw, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_branch_sees_only_kept_samples_and_a_dropped_batch_skips_it():
    branch = Recorder(16, torch.float32)
    x = torch.randn(64, 16)
    st.stochastic_residual(x, branch, 0.5, seed=3, offset=4)
    assert branch.seen == [int(stochdepth.mask(64, 0.5, seed=3, offset=4).sum())]
    # find an offset whose "batch" draw drops the whole batch: the branch must not run
    offset = next(o for o in range(100)
                  if not stochdepth.mask(1, 0.5, seed=3, offset=o, mode="batch")[0])
    branch.seen.clear()
    out = st.stochastic_residual(x, branch, 0.5, seed=3, offset=offset, mode="batch")
    assert branch.seen == [] and torch.equal(out, x)


def test_linear_branch_output_matches_dense():
    torch.manual_seed(0)
    branch = Recorder(32, torch.float64)
    x = torch.randn(50, 32, dtype=torch.float64)
    out = st.stochastic_residual(x, branch, 0.7, seed=8)
    dense = st.stochastic_depth(x, branch(x), 0.7, seed=8)
    # per-sample matmul: the same values up to the BLAS kernel chosen for the row count
    torch.testing.assert_close(out, dense, rtol=1e-13, atol=1e-13)


def test_inference_runs_the_branch_on_every_sample():
    branch = Recorder(8, torch.float32).eval()
    module = st.StochasticResidual(branch, 0.6, seed=1).eval()
    x = torch.randn(10, 8)
    out = module(x)
    assert branch.seen[-1] == 10
    assert torch.equal(out, st.stochastic_depth(x, branch(x), 0.6, False))


def test_module_sequence_is_reproducible_and_resumable():
    torch.manual_seed(0)
    a = st.StochasticResidual(Recorder(8, torch.float32), 0.5, seed=42)
    b = st.StochasticResidual(Recorder(8, torch.float32), 0.5, seed=42)
    b.load_state_dict(a.state_dict())
    x = torch.randn(20, 8)
    for _ in range(3):
        assert torch.equal(a(x), b(x))
    assert a.offset == 3
    c = st.StochasticResidual(Recorder(8, torch.float32), 0.5, seed=0)
    c.load_state_dict(a.state_dict())
    assert c.offset == 3 and torch.equal(c(x), a(x))


def test_backward_saves_no_mask():
    packed = []

    def pack(t):
        packed.append(t)
        return t

    x = torch.randn(30, 6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        st.stochastic_residual(x, lambda t: t * 2.0, 0.5, seed=1)
    # eager: the gather and the scatter keep (seed, offset) as Python ints, so nothing is packed
    # (the branch t * 2.0 saves nothing either); traced, they save their 2-word [seed, offset]
    # (tests/test_torch_paths.py)
    assert packed == []


def test_branch_that_changes_the_shape_is_rejected():
    with pytest.raises(ValueError, match="branch must keep the shape"):
        st.stochastic_residual(torch.randn(8, 4), lambda t: t[:, :2], 0.5, seed=1)


# dynamo inspects tensors it did not create and triggers this warning inside torch
@pytest.mark.timeout(300)  # torch.compile: tens of seconds cold
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_torch_compile_matches_eager_with_at_most_one_break_per_block():
    torch.manual_seed(0)
    blocks = [st.StochasticResidual(nn.Sequential(nn.Linear(16, 16), nn.GELU()), 0.6, seed=7)
              for _ in range(2)]
    model = nn.Sequential(*blocks)
    ref = nn.Sequential(*[st.StochasticResidual(b.branch, 0.6, seed=7) for b in blocks])
    x = torch.randn(24, 16)
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-6, atol=1e-6)
    # Without fullgraph=True dynamo breaks the graph at select_kept (its default for an op whose
    # output size depends on data): at most that one break per block, and the branch itself is
    # compiled. With fullgraph=True: tests/test_stochastic_residual_compile.py.
    explain = torch._dynamo.explain(nn.Sequential(
        st.StochasticResidual(nn.Linear(16, 16), 0.6, seed=1)))(x)
    assert explain.graph_break_count <= 1 and explain.graph_count >= 1


def test_ops_check_the_kept_row_count_against_the_mask():
    from stochdepth.torch.residual import gather_kept, scatter_kept

    rng = torch.tensor([5, 0])
    n_kept = int(stochdepth.mask(16, 0.5, seed=5, offset=0).sum())
    x = torch.randn(16, 3)
    with pytest.raises(ValueError, match=f"must have {n_kept} rows"):
        scatter_kept(x, torch.randn(n_kept + 1, 3), rng, 0.5, False, "inference", 16)
    with pytest.raises(ValueError, match=f"must have {n_kept} rows"):
        gather_kept(x, rng, 0.5, False, "inference", n_kept - 1)


def test_opcheck_on_the_compact_ops():
    from stochdepth.torch.residual import gather_kept, scatter_kept

    rng = torch.tensor([5, 0])
    n_kept = int(stochdepth.mask(16, 0.5, seed=5, offset=0).sum())
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n_kept, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(scatter_kept, (x, y, rng, 0.5, False, "training", 16))
    torch.library.opcheck(scatter_kept, (None, y, rng, 0.5, False, "training", 16))
    torch.library.opcheck(gather_kept, (x, rng, 0.5, False, "training", n_kept))


def test_training_example_runs_and_both_variants_agree(tmp_path):
    """examples/train_deep_residual.py (the issue's benchmark), tiny: same losses for both."""
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_deep_residual.py"
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, str(script), "--blocks", "6", "--dim", "16", "--batch", "24",
                    "--steps", "4", "--warmup", "1", "--json", str(out)], check=True,
                   capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    dense, skip = r["results"]["dense"]["losses"], r["results"]["skip"]["losses"]
    assert len(dense) == len(skip) == 4
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(dense, skip))
    assert r["mean_survival"] < 1 and r["speedup"] > 0
