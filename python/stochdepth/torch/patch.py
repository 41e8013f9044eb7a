"""`patch(model)`: an existing model's drop paths swapped for the library's, in place, and the
residual blocks it knows rewritten to skip the branch work of dropped samples
(docs/design.md, "Skipping dropped samples").

What is recognised, by class name and attributes (timm and torchvision are never imported):

- timm's `DropPath` (`drop_prob`, `scale_by_keep`) becomes `stochdepth.torch.DropPath`, and
  torchvision's `StochasticDepth` (`p`, `mode`) `stochdepth.torch.TorchvisionStochasticDepth`:
  the same function of their attributes, with the library's mask.
- timm's ViT/DeiT `Block`, `ConvNeXtBlock` (convnext.py's, with `gamma`, and maxxvit.py's, with
  `ls` and `down`) and Swin `SwinTransformerBlock`: with
  `skip_compute=True`, each residual `x + drop_path(branch(x))` whose branch treats samples
  independently gets `stochastic_residual(x, branch, ...)`, which runs the branch on the kept
  samples only. The block's `forward` is replaced on the instance (its class is unchanged);
  everything else of the block stays where it was, so `state_dict()` has the same keys and
  values. At eval, and with drop_prob 0, the block computes what its own forward computes.

Left alone, with the reason in the report: a block whose drop paths are all identities, a branch
with batch statistics (BatchNorm: it would see only the kept samples), a ConvNeXt block whose
shortcut is not the identity, a block already patched, and with `skip_compute=False` every
block (its drop paths still become the library's op).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .._op import M64, check_u64
from . import functional
from .modules import DropPath, TorchvisionStochasticDepth, promote_gamma
from .residual import stochastic_residual

__all__ = ["PatchReport", "patch"]

_OURS = (DropPath, TorchvisionStochasticDepth)
_BATCH_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What `patch` did, per module path ("" is the model itself).

    changed  {path: what was done}
    left     {path: why it was left as it was}, for the drop paths and blocks it recognised
    seeds    {path: seed} of the drop paths it made seeded (empty with seed=None)
    """

    changed: dict
    left: dict
    seeds: dict

    def __str__(self) -> str:
        lines = [f"patched {len(self.changed)} module(s), left {len(self.left)}"]
        lines += [f"  changed {p or '<model>'}: {what}" for p, what in self.changed.items()]
        lines += [f"  left    {p or '<model>'}: {why}" for p, why in self.left.items()]
        return "\n".join(lines)


# LayerScale folded into the op (`gamma=`, docs/design.md "Layer scale"). One switch: with it
# off, a LayerScale stays a module of the branch, as in timm's forward.
FUSE_LAYER_SCALE = True


def _layer_scale_gamma(ls):
    """The (C,) gamma of a timm LayerScale that may be fused into the op, else None."""
    gamma = getattr(ls, "gamma", None)
    if (FUSE_LAYER_SCALE and type(ls).__name__ == "LayerScale" and isinstance(gamma, nn.Parameter)
            and gamma.dim() == 1 and not getattr(ls, "inplace", False)):
        return gamma
    return None


def _scaling(drop) -> str:
    return "training" if drop.scale_by_keep else "inference"


def _fused_op(x, drop, residual, gamma):
    """x + drop(residual * gamma) as one library call: stochastic_depth(..., gamma=), in the
    dtype timm's unfused expression computes in."""
    p = 1.0 - float(drop.drop_prob)
    seed, offset = (None, 0) if drop.seed is None else drop._host_rng()
    x, residual, gamma = promote_gamma(x, residual, gamma)
    return functional.stochastic_depth(x, residual, p, True, mode=drop.mode,
                                       scaling=_scaling(drop), seed=seed, offset=offset,
                                       sync_across_ranks=drop.sync_across_ranks, gamma=gamma)


def _skip(x, drop, branch):
    """x + drop(branch(x)), the branch run on the kept samples only (stochastic_residual), with
    the drop path's mask: its torch generator draw, or its seeded (seed, offset), advanced."""
    p = 1.0 - float(drop.drop_prob)
    seed, offset = (None, 0) if drop.seed is None else drop._host_rng()
    return stochastic_residual(x, branch, p, True, mode=drop.mode, scaling=_scaling(drop),
                               seed=seed, offset=offset,
                               sync_across_ranks=drop.sync_across_ranks)


def _add(x, drop, branch, ls=None, branch_first=False):
    """One residual of a patched block: what `x + drop(ls(branch(x)))` computes (with
    `branch_first`, `drop(...) + x`, ConvNeXt's order: the same sum, but the result takes the
    memory layout of the first operand, and the next convolution's rounding follows it)."""
    dense = (not isinstance(drop, DropPath) or not drop.training or drop.drop_prob == 0.0
             # A seeded drop path reads and advances its state on the host: inside a compiled
             # graph that would be a constant, so there the dense op (same mask) runs.
             or (drop.seed is not None and torch.compiler.is_compiling()))
    if dense:
        y = drop(branch(x) if ls is None else ls(branch(x)))
        return y + x if branch_first else x + y
    if ls is None:
        return _skip(x, drop, branch)
    return _skip(x, drop, lambda t: ls(branch(t)))


def _add_dense(x, drop, branch, ls):
    """skip_compute=False: the block's own arithmetic, LayerScale fused into the op if it can."""
    gamma = _layer_scale_gamma(ls)
    if (gamma is None or not isinstance(drop, DropPath) or not drop.training
            or (drop.seed is not None and torch.compiler.is_compiling())):
        return x + drop(ls(branch(x)))
    return _fused_op(x, drop, branch(x), gamma)


def _vit_forward(self, x, *args, **kwargs):
    if args or any(v is not None for v in kwargs.values()):
        # An attention mask may be per sample: it would not follow the gather of kept samples.
        return type(self).forward(self, x, *args, **kwargs)
    add = _add if self._stochdepth_skip else _add_dense
    x = add(x, self.drop_path1, lambda t: self.attn(self.norm1(t)), self.ls1)
    x = add(x, self.drop_path2, lambda t: self.mlp(self.norm2(t)), self.ls2)
    return x


def _convnext_branch(self, x):
    x = self.conv_dw(x)
    if self.use_conv_mlp:
        x = self.mlp(self.norm(x))
    else:
        x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    if self.gamma is not None:
        x = x.mul(self.gamma.reshape(1, -1, 1, 1))
    return x


def _convnext_forward(self, x):
    # The shortcut is the identity (checked by patch).
    return _add(x, self.drop_path, lambda t: _convnext_branch(self, t), branch_first=True)


def _convnext_ls_branch(self, x):
    # timm's other ConvNeXtBlock (maxxvit.py): `down` first, LayerScale (`ls`) before the
    # permute back.
    x = self.conv_dw(self.down(x))
    if self.use_conv_mlp:
        return self.ls(self.mlp(self.norm(x)))
    return self.ls(self.mlp(self.norm(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)


def _convnext_ls_forward(self, x):
    return _add(x, self.drop_path, lambda t: _convnext_ls_branch(self, t), branch_first=True)


def _swin_forward(self, x):
    B, H, W, C = x.shape
    x = _add(x, self.drop_path1, lambda t: self._attn(self.norm1(t)))
    x = x.reshape(B, -1, C)
    x = _add(x, self.drop_path2, lambda t: self.mlp(self.norm2(t)))
    return x.reshape(B, H, W, C)


class _PatchedForward:
    """The forward that patch sets on a block instance. An object rather than a bound method:
    pickle saves a bound method by its name on the instance, which the block does not have, so
    `torch.save(model)` would not load back."""

    def __init__(self, block, forward):
        self.block = block
        self.forward = forward

    def __call__(self, *args, **kwargs):
        return self.forward(self.block, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Kind:
    """A block patch knows: its class name, the attributes it reads, its drop paths and
    branches, and the forward that replaces its own."""

    name: str
    attrs: tuple
    drops: tuple
    branches: tuple
    forward: object
    layer_scales: tuple = ()


_KINDS = (
    _Kind("Block", ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"),
          ("drop_path1", "drop_path2"), ("norm1", "attn", "ls1", "norm2", "mlp", "ls2"),
          _vit_forward, ("ls1", "ls2")),
    _Kind("ConvNeXtBlock", ("conv_dw", "norm", "mlp", "gamma", "shortcut", "drop_path",
                            "use_conv_mlp"),
          ("drop_path",), ("conv_dw", "norm", "mlp"), _convnext_forward),
    _Kind("ConvNeXtBlock", ("conv_dw", "norm", "mlp", "ls", "down", "shortcut", "drop_path",
                            "use_conv_mlp"),
          ("drop_path",), ("down", "conv_dw", "norm", "mlp", "ls"), _convnext_ls_forward),
    _Kind("SwinTransformerBlock", ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2",
                                   "_attn"),
          ("drop_path1", "drop_path2"), ("norm1", "attn", "norm2", "mlp"), _swin_forward),
)


def _kind(module) -> Optional[_Kind]:
    for kind in _KINDS:
        if type(module).__name__ == kind.name and all(hasattr(module, a) for a in kind.attrs):
            return kind
    return None


def _is_timm_drop_path(m) -> bool:
    return (type(m).__name__ == "DropPath" and not isinstance(m, _OURS)
            and hasattr(m, "drop_prob") and hasattr(m, "scale_by_keep"))


def _is_torchvision_sd(m) -> bool:
    return (type(m).__name__ == "StochasticDepth" and not isinstance(m, _OURS)
            and hasattr(m, "p") and hasattr(m, "mode"))


def _replacement(m, seed):
    if _is_timm_drop_path(m):
        new = DropPath(m.drop_prob, m.scale_by_keep, seed=seed)
        what = f"timm DropPath(drop_prob={m.drop_prob}) -> stochdepth.torch.DropPath"
    else:
        new = TorchvisionStochasticDepth(m.p, m.mode, seed=seed)
        what = (f"torchvision StochasticDepth(p={m.p}, mode={m.mode!r}) -> "
                "stochdepth.torch.TorchvisionStochasticDepth")
    new.train(m.training)
    return new, what


def _block_reason(module, kind, skip_compute) -> Optional[str]:
    """Why the block keeps its own forward, or None."""
    if isinstance(module.__dict__.get("forward"), _PatchedForward):
        return "already patched"
    drops = [getattr(module, d) for d in kind.drops]
    if not any(isinstance(d, DropPath) for d in drops):
        kinds = ", ".join(sorted({type(d).__name__ for d in drops}))
        return f"no timm drop path to skip (its drop paths are {kinds})"
    if not skip_compute:
        if kind.layer_scales and FUSE_LAYER_SCALE and any(
                _layer_scale_gamma(getattr(module, ls)) is not None for ls in kind.layer_scales):
            return None
        return "skip_compute=False: its drop paths run the op on the computed branch"
    if kind.name == "ConvNeXtBlock" and not all(
            isinstance(getattr(module, a, None), (nn.Identity, type(None)))
            for a in ("shortcut", "down")):
        return ("its shortcut is not the identity (a downsampling block): the branch runs on "
                "every sample")
    for b in kind.branches:
        for path, sub in getattr(module, b).named_modules(prefix=b):
            if isinstance(sub, _BATCH_STATS):
                return (f"{path} is a {type(sub).__name__} (batch statistics): on the kept "
                        "samples only it would compute other outputs; the op runs instead")
    return None


def patch(model: nn.Module, *, skip_compute: bool = True, seed: Optional[int] = None
          ) -> PatchReport:
    """Swaps, in place, `model`'s timm and torchvision drop paths for the library's, and with
    `skip_compute` rewrites timm's ViT, ConvNeXt and Swin blocks to run each branch on its kept
    samples only. Returns a `PatchReport`.

    seed: None leaves the new drop paths unseeded (each training call draws its mask from
        torch's generator, as timm's do, and `state_dict()` is unchanged). An integer seeds the
        k-th drop path replaced (in `named_modules()` order) with `(seed + k) mod 2**64`, listed
        in the report; their `[seed, offset]` is then saved in `state_dict()` as
        `<path>.rng_state` (a checkpoint without it still loads).

    Calling it again changes nothing. The replaced blocks compute, per sample, what their own
    forward computes with the library's mask (exactly, for a branch that treats samples
    independently; parameter gradients sum over the kept rows only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(skip_compute, bool):
        raise TypeError(f"skip_compute must be a bool, got {type(skip_compute).__name__}")
    if seed is not None:
        seed = check_u64("seed", seed)
    if _is_timm_drop_path(model) or _is_torchvision_sd(model):
        raise ValueError(
            f"model is itself a {type(model).__name__}: patch replaces a model's submodules; "
            "use stochdepth.torch.DropPath or TorchvisionStochasticDepth in its place")
    changed, left, seeds = {}, {}, {}
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not (_is_timm_drop_path(child) or _is_torchvision_sd(child)):
                continue
            child_path = f"{path}.{name}" if path else name
            child_seed = None if seed is None else (seed + len(seeds)) & M64
            new, what = _replacement(child, child_seed)
            setattr(module, name, new)
            changed[child_path] = what
            if child_seed is not None:
                seeds[child_path] = child_seed
    for path, module in model.named_modules():
        if isinstance(module, _OURS) and path not in changed:
            left[path] = "already a stochdepth module"
        kind = _kind(module)
        if kind is None:
            continue
        why = _block_reason(module, kind, skip_compute)
        if why is not None:
            left[path] = f"{kind.name}: {why}"
            continue
        module._stochdepth_skip = skip_compute
        module.forward = _PatchedForward(module, kind.forward)
        changed[path] = (f"{kind.name}: forward skips the branches of dropped samples "
                         "(stochastic_residual)" if skip_compute else
                         f"{kind.name}: LayerScale fused into the op (gamma=)")
    return PatchReport(changed, left, seeds)
