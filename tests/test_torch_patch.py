"""stochdepth.torch.patch on models built from timm-structured blocks (stochdepth.bench._blocks,
written from timm's definitions: timm itself needs torchvision): eval is unchanged bit for bit,
training equals the library's dense op on the same masks, the branch runs on the kept samples
only, the state_dict is unchanged, the report says what was done, and bad inputs are refused."""

from __future__ import annotations

import copy
import importlib

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.bench import _blocks as B  # noqa: E402
from torch import nn  # noqa: E402
from torch_util import assert_same as _assert_same  # noqa: E402
from torch_util import randn  # noqa: E402

import stochdepth  # noqa: E402

# The module (stochdepth.torch.patch is the function it defines).
patch_module = importlib.import_module("stochdepth.torch.patch")

pytestmark = pytest.mark.torch

SEED = 2024


def assert_same(a, b):
    """Bitwise equality of the values (ConvNeXt's outputs are permuted views)."""
    _assert_same(a.contiguous(), b.contiguous())


def _vit(ls=True, depth=3, rate=0.5):
    torch.manual_seed(0)
    return B.vit_stack(32, 4, depth, rate, init_values=0.5 if ls else None)


def _convnext(depth=3, rate=0.5):
    torch.manual_seed(0)
    return B.convnext_stack(16, depth, rate, ls_init_value=0.5)


def _swin(rate=0.5):
    torch.manual_seed(0)
    return nn.Sequential(B.SwinTransformerBlock(16, (8, 8), 2, 4, 0, drop_path=rate),
                         B.SwinTransformerBlock(16, (8, 8), 2, 4, 2, drop_path=rate))


MODELS = {"vit": (_vit, (12, 9, 32)), "vit-no-ls": (lambda: _vit(False), (12, 9, 32)),
          "convnext": (_convnext, (12, 16, 6, 6)), "swin": (_swin, (12, 8, 8, 16))}


def _residuals(block):
    """[(drop path name, branch)] of a block, as its own forward composes them."""
    if isinstance(block, B.Block):
        return [("drop_path1", lambda t: block.ls1(block.attn(block.norm1(t)))),
                ("drop_path2", lambda t: block.ls2(block.mlp(block.norm2(t))))]
    if isinstance(block, B.ConvNeXtBlock):
        def branch(t):
            t = block.mlp(block.norm(block.conv_dw(t).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            return t.mul(block.gamma.reshape(1, -1, 1, 1))
        return [("drop_path", branch)]
    return [("drop_path1", lambda t: block._attn(block.norm1(t))),
            ("drop_path2", lambda t: block.mlp(block.norm2(t)))]


def _reference(model, x, seeds, offset):
    """The original blocks' forward with each drop path replaced by the library's dense
    two-input op, `stochastic_depth(x, branch(x), 1 - drop_prob, seed=, offset=)`."""
    for i, block in enumerate(model):
        shape = x.shape
        for name, branch in _residuals(block):
            drop = getattr(block, name)
            if isinstance(block, B.SwinTransformerBlock) and name == "drop_path2":
                x = x.reshape(shape[0], -1, shape[-1])
            if isinstance(drop, nn.Identity):
                x = x + branch(x)
                continue
            x = sdt.stochastic_depth(x, branch(x), 1.0 - drop.drop_prob, True,
                                     scaling="training", seed=seeds[f"{i}.{name}"],
                                     offset=offset)
        x = x.reshape(shape)
    return x


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_is_the_original_forward_bit_for_bit(name):
    make, shape = MODELS[name]
    original = make().eval()
    patched = copy.deepcopy(original)
    report = sdt.patch(patched)
    assert any(not p.endswith(("drop_path", "drop_path1", "drop_path2"))
               for p in report.changed), report  # a block was rewritten
    x = randn(shape)
    with torch.no_grad():
        assert_same(patched(x), original(x))


def _close(actual, expected, what=""):
    """float64 equality up to the order of sums: a Linear on the kept rows only is another
    matrix product than on the whole batch (its blocking, hence its rounding, follows the row
    count), so kept samples agree to rounding; a wrong mask would differ by O(1)."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12, msg=what)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_with_a_seed_equals_the_dense_op_on_the_same_masks(name):
    make, shape = MODELS[name]
    original = make().double().train()
    patched = copy.deepcopy(original)
    report = sdt.patch(patched, seed=SEED)
    assert sorted(report.seeds.values()) == [SEED + k for k in range(len(report.seeds))]
    batch = shape[0]
    dropped_somewhere = False
    for step in range(2):  # the offset advances by one per training call
        x = randn(shape, torch.float64, seed=step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        g = randn(shape, torch.float64, seed=10 + step)
        out = patched(x)
        expected = _reference(original, x_ref, report.seeds, step)
        _close(out, expected)
        (out * g).sum().backward()
        (expected * g).sum().backward()
        _close(x.grad, x_ref.grad)
        for (n, p), (_, q) in zip(patched.named_parameters(), original.named_parameters()):
            _close(p.grad, q.grad, n)
        patched.zero_grad()
        original.zero_grad()
        for path, seed in report.seeds.items():
            p = 1.0 - patched.get_submodule(path).drop_prob
            kept = int(stochdepth.mask(batch, p, seed=seed, offset=step).sum())
            dropped_somewhere |= 0 < kept < batch
    assert dropped_somewhere  # the test saw dropped and kept samples
    assert all(patched.get_submodule(p).offset == 2 for p in report.seeds)


def test_the_branch_runs_on_the_kept_samples_only():
    model = _vit()
    report = sdt.patch(model, seed=SEED)
    seen = {}

    def record(key):
        def hook(module, args):
            seen.setdefault(key, args[0].shape[0])
        return hook

    for i, block in enumerate(model):
        block.attn.register_forward_pre_hook(record(f"{i}.attn"))
        block.mlp.register_forward_pre_hook(record(f"{i}.mlp"))
    model.train()
    model(randn((32, 5, 32)))
    for i in (1, 2):
        for branch, drop in (("attn", "drop_path1"), ("mlp", "drop_path2")):
            p = 1.0 - model[i].get_submodule(drop).drop_prob
            kept = int(stochdepth.mask(32, p, seed=report.seeds[f"{i}.{drop}"]).sum())
            assert seen[f"{i}.{branch}"] == kept
    assert seen["0.attn"] == 32  # block 0: drop_path 0 (Identity), left as it is
    assert seen["2.attn"] < 32


def test_a_dropped_sample_is_its_input_bit_for_bit():
    torch.manual_seed(0)
    block = B.ConvNeXtBlock(16, drop_path=0.5)
    report = sdt.patch(nn.Sequential(block), seed=9)
    x = randn((16, 16, 5, 5))
    out = block.train()(x)
    keep = torch.from_numpy(stochdepth.mask(16, 0.5, seed=report.seeds["0.drop_path"]))
    assert 0 < int(keep.sum()) < 16
    assert_same(out[~keep], x[~keep])
    assert not torch.equal(out[keep], x[keep])


@pytest.mark.parametrize("name", list(MODELS))
def test_unseeded_skip_equals_the_op_for_the_same_generator_draws(name):
    """Unseeded, the rewritten block draws from torch's generator exactly as its drop paths do
    with skip_compute=False (the op on the computed branch)."""
    make, shape = MODELS[name]
    skip, dense = make().double().train(), make().double().train()
    sdt.patch(skip)
    report = sdt.patch(dense, skip_compute=False)
    assert all(why.endswith("skip_compute=False: its drop paths run the op on the computed "
                            "branch") or "Identity" in why for why in report.left.values())
    x = randn(shape, torch.float64)
    for _ in range(2):
        torch.manual_seed(7)
        a = skip(x)
        torch.manual_seed(7)
        b = dense(x)
        _close(a, b)


def test_state_dict_keys_and_values_are_unchanged():
    for make, _ in MODELS.values():
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        sdt.patch(model)
        after = model.state_dict()
        assert list(after) == list(before)
        for k, v in before.items():
            assert_same(after[k], v)
    # Seeded: the same entries, plus each drop path's [seed, offset]; an original checkpoint
    # still loads strictly.
    model = _vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sdt.patch(model, seed=SEED)
    after = model.state_dict()
    assert [k for k in after if not k.endswith("rng_state")] == list(before)
    assert {k[:-len(".rng_state")] for k in after if k.endswith("rng_state")} == set(report.seeds)
    model.load_state_dict(before, strict=True)


def test_report_says_what_was_done_and_why():
    torch.manual_seed(0)
    model = nn.Sequential(B.Block(16, 2, drop_path=0.0), B.Block(16, 2, drop_path=0.25),
                          B.ConvNeXtBlock(16, 32, drop_path=0.25))
    report = sdt.patch(model)
    ours = "-> stochdepth.torch.DropPath"
    assert report.changed == {
        "1.drop_path1": f"timm DropPath(drop_prob=0.25) {ours}",
        "1.drop_path2": f"timm DropPath(drop_prob=0.25) {ours}",
        "2.drop_path": f"timm DropPath(drop_prob=0.25) {ours}",
        "1": "Block: forward skips the branches of dropped samples (stochastic_residual)"}
    assert report.left == {
        "0": "Block: no timm drop path to skip (its drop paths are Identity)",
        "2": "ConvNeXtBlock: its shortcut is not the identity (a downsampling block): the "
             "branch runs on every sample"}
    assert report.seeds == {}
    assert "patched 4 module(s), left 2" in str(report)
    assert isinstance(model[2].drop_path, sdt.DropPath) and model[2].drop_path.seed is None


def test_patch_is_idempotent():
    model = _vit().train()
    first = sdt.patch(model, seed=SEED)
    forwards = [m.__dict__.get("forward") for m in model]
    drops = [m for m in model.modules() if isinstance(m, sdt.DropPath)]
    second = sdt.patch(model, seed=SEED + 1)
    assert second.changed == {} and second.seeds == {}
    assert [m.__dict__.get("forward") for m in model] == forwards
    assert [m for m in model.modules() if isinstance(m, sdt.DropPath)] == drops
    assert second.left["1"] == "Block: already patched"
    assert second.left["1.drop_path1"] == "already a stochdepth module"
    assert first.changed and all(d.seed == first.seeds[p] for p, d in model.named_modules()
                                 if isinstance(d, sdt.DropPath))


class ConvNeXtBlock(nn.Module):
    """timm's other ConvNeXtBlock (maxxvit.py: CoAtNet/MaxViT): `shortcut` and `down` (here
    identities, stride 1), LayerScale `ls` applied channels last before the permute back."""

    def __init__(self, dim, drop_path):
        super().__init__()
        self.shortcut = nn.Identity()
        self.down = nn.Identity()
        self.use_conv_mlp = False
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = B.Mlp(dim, 4 * dim)
        self.ls = B.LayerScale(dim, 0.5)
        self.drop_path = B.DropPath(drop_path)

    def forward(self, x):
        shortcut = self.shortcut(x)
        x = self.conv_dw(self.down(x))
        x = self.ls(self.mlp(self.norm(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.drop_path(x) + shortcut


def test_the_maxxvit_convnext_block_with_layer_scale():
    torch.manual_seed(0)
    original = nn.Sequential(ConvNeXtBlock(16, 0.5), ConvNeXtBlock(16, 0.5)).double()
    patched = copy.deepcopy(original)
    report = sdt.patch(patched, seed=3)
    assert report.changed["0"] == report.changed["1"] == (
        "ConvNeXtBlock: forward skips the branches of dropped samples (stochastic_residual)")
    x = randn((16, 16, 5, 5), torch.float64)
    with torch.no_grad():
        assert_same(patched.eval()(x), original.eval()(x))
    out = patched.train()(x)
    expected = x
    for i, block in enumerate(original):
        def branch(t, block=block):
            return block.ls(block.mlp(block.norm(block.conv_dw(t).permute(0, 2, 3, 1)))
                            ).permute(0, 3, 1, 2)
        expected = sdt.stochastic_depth(expected, branch(expected), 0.5, scaling="training",
                                        seed=report.seeds[f"{i}.drop_path"], offset=0)
    _close(out, expected)


def test_a_patched_model_saves_and_loads_whole(tmp_path):
    model = _vit().train()
    sdt.patch(model, seed=SEED)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded[1].forward.block is loaded[1]
    assert sdt.patch(loaded).changed == {}  # still patched
    x = randn((12, 9, 32))
    assert_same(loaded(x), model(x))  # the same seeded masks, offset 0 in both


def test_batch_statistics_keep_the_op():
    torch.manual_seed(0)
    block = B.Block(16, 2, drop_path=0.5, norm_layer=lambda d: nn.BatchNorm1d(9))
    report = sdt.patch(nn.Sequential(block))
    assert report.left["0"] == ("Block: norm1 is a BatchNorm1d (batch statistics): on the kept "
                                "samples only it would compute other outputs; the op runs "
                                "instead")
    assert "forward" not in block.__dict__ and isinstance(block.drop_path1, sdt.DropPath)


def test_torchvision_stochastic_depth_and_drop_path_attributes():
    class StochasticDepth(nn.Module):  # torchvision.ops.StochasticDepth's attributes
        def __init__(self, p, mode):
            super().__init__()
            self.p, self.mode = p, mode

        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(4, 4), StochasticDepth(0.3, "batch"),
                          B.DropPath(0.2, scale_by_keep=False))
    model[2].eval()
    report = sdt.patch(model, seed=5)
    assert isinstance(model[1], sdt.TorchvisionStochasticDepth)
    assert (model[1].p, model[1].mode, model[1].seed) == (0.3, "batch", 5)
    assert isinstance(model[2], sdt.DropPath)
    assert (model[2].drop_prob, model[2].scale_by_keep, model[2].seed) == (0.2, False, 6)
    assert not model[2].training and model[1].training  # each keeps its mode
    assert report.changed["1"] == ("torchvision StochasticDepth(p=0.3, mode='batch') -> "
                                   "stochdepth.torch.TorchvisionStochasticDepth")
    assert report.seeds == {"1": 5, "2": 6}
    x = randn((8, 4))
    assert_same(model[1](x), sdt.torchvision_stochastic_depth(x, 0.3, "batch", seed=5))


def test_vit_attention_mask_takes_the_blocks_own_forward():
    model = _vit(depth=2, rate=0.5)
    original = copy.deepcopy(model)
    sdt.patch(model, seed=1)
    sdt.patch(original, seed=1, skip_compute=False)
    x = randn((6, 5, 32))
    mask = torch.zeros(6, 1, 5, 5)
    model.train()
    original.train()
    assert_same(model[1](x, attn_mask=mask), original[1](x, attn_mask=mask))


def test_layer_scale_fused_into_the_op():
    assert patch_module.FUSE_LAYER_SCALE
    model = _vit().train()
    original = copy.deepcopy(model)
    report = sdt.patch(model, seed=SEED, skip_compute=False)
    assert report.changed["1"] == "Block: LayerScale fused into the op (gamma=)"
    # The seeded drop paths add their rng_state; every other key stays.
    keys = [k for k in model.state_dict() if not k.endswith("rng_state")]
    assert keys == list(original.state_dict())
    x = randn((12, 9, 32))
    assert_same(model(x), _reference(original, x, report.seeds, 0))


def test_layer_scale_switch(monkeypatch):
    monkeypatch.setattr(patch_module, "FUSE_LAYER_SCALE", False)
    assert patch_module._layer_scale_gamma(B.LayerScale(4)) is None
    monkeypatch.setattr(patch_module, "FUSE_LAYER_SCALE", True)
    assert patch_module._layer_scale_gamma(B.LayerScale(4)) is not None
    assert patch_module._layer_scale_gamma(B.LayerScale(4, inplace=True)) is None
    assert patch_module._layer_scale_gamma(nn.Identity()) is None


# dynamo inspects tensors it did not create and triggers this warning inside torch
@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_patched_model_matches_eager():
    """Under torch.compile (dynamo, eager backend) an unseeded block skips as in eager mode
    with the same draws; a seeded one runs the dense op on the same masks."""
    x = randn((12, 9, 32), torch.float64)
    for seed in (None, SEED):
        eager, compiled = _vit().double().train(), _vit().double().train()
        sdt.patch(eager, seed=seed)
        sdt.patch(compiled, seed=seed)
        fn = torch.compile(compiled, backend="eager")
        for _ in range(2):
            torch.manual_seed(3)
            a = eager(x)
            torch.manual_seed(3)
            _close(fn(x), a)


def test_bad_inputs_are_refused_with_clear_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        sdt.patch([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="skip_compute must be a bool, got int"):
        sdt.patch(nn.Linear(2, 2), skip_compute=1)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\), got -1"):
        sdt.patch(nn.Linear(2, 2), seed=-1)
    with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 2\*\*64\), got str"):
        sdt.patch(nn.Linear(2, 2), seed="1")
    with pytest.raises(ValueError, match="model is itself a DropPath: patch replaces a model's "
                                         "submodules"):
        sdt.patch(B.DropPath(0.1))
