"""PyTorch adapter: stochastic depth as `torch.library` custom ops with autograd and torch.compile,
drop-in functions and modules for timm's and torchvision's drop path, and `StochasticResidual`.

Importing this package imports torch; `import stochdepth` never does. How the ops, the eager fast
path and the randomness work: docs/design.md, "Randomness in the adapters".

Layout: `functional` and `modules` (the public API), `residual` (StochasticResidual), `_ops`
(the custom ops and their autograd), `_kernels` (the op bodies), `_keys` ((seed, offset): `Rng`,
the draws, the per-rank seed), `_seeded` (the seeded modules' state, `SeededMixin`), `_mode`
(the eager-or-op predicate), `_checks` (the torch-specific argument checks; the shared ones are
`stochdepth._op`).
"""

from __future__ import annotations

from ._keys import rank_seed
from ._ops import drop_path_bwd, drop_path_fwd, drop_path_gamma_bwd, drop_path_gamma_fwd
from .functional import drop_path, stochastic_depth, torchvision_stochastic_depth
from .modules import DropPath, LayerScaleDropPath, StochasticDepth, TorchvisionStochasticDepth
from .norm import StochasticDepthNorm, stochastic_depth_norm
from .patch import PatchReport, patch
from .residual import StochasticResidual, stochastic_residual

__all__ = [
    "stochastic_depth",
    "drop_path",
    "torchvision_stochastic_depth",
    "StochasticDepth",
    "DropPath",
    "LayerScaleDropPath",
    "TorchvisionStochasticDepth",
    "rank_seed",
    "drop_path_fwd",
    "drop_path_bwd",
    "drop_path_gamma_fwd",
    "drop_path_gamma_bwd",
    "StochasticResidual",
    "stochastic_residual",
    "stochastic_depth_norm",
    "StochasticDepthNorm",
    "patch",
    "PatchReport",
]
