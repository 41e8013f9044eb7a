"""What a benchmark run has: the library, torch (or why not), the adapter, torch.compile, the
anchors and the options, and so which Row frameworks are available (Env.unavailable).
"""

from __future__ import annotations

import functools
import os
import sys

from stochdepth.bench._util import short_error
from stochdepth.bench.anchors import load_anchors
from stochdepth.bench.rows import ALWAYS_AVAILABLE

__all__ = ["Env"]


class Env:
    """What the run has: the library, torch (or why not), the adapter, the anchors, options."""

    def __init__(self, args):
        import stochdepth

        self.sd = stochdepth
        self.args = args
        self.p = float(args.p)
        self.torch = None
        self.torch_error = "disabled by --no-torch" if args.no_torch else None
        self.torch_thp = _torch_huge_pages(args.torch_thp)
        if not args.no_torch:
            try:
                import torch

                self.torch = torch
            except Exception as exc:  # noqa: BLE001 - any import failure means "no torch rows"
                self.torch_error = short_error(exc)
        self.adapter = None
        self.adapter_error = ("needs torch" if self.torch is None
                              else "disabled by --no-adapter" if args.no_adapter else None)
        if self.adapter_error is None:
            try:
                import stochdepth.torch as sdt

                if not hasattr(sdt, "stochastic_depth"):
                    raise AttributeError("stochdepth.torch has no stochastic_depth")
                self.adapter = sdt
            except Exception as exc:  # noqa: BLE001 - optional rows
                self.adapter_error = short_error(exc)
        self.compile_error = ("needs torch" if self.torch is None
                              else "disabled by --no-compile" if args.no_compile else None)
        self.anchors = load_anchors(self.torch) if self.torch is not None else {}

    def unavailable(self, framework):
        """Why a Row's framework cannot run here, or None."""
        if framework in ALWAYS_AVAILABLE:
            return None
        why = {"torch": self.torch_error, "stochdepth.torch": self.adapter_error,
               "torch.compile": self.compile_error}
        if framework not in why:
            raise ValueError(f"no framework {framework!r} in the tables")
        return why[framework]

    @functools.cached_property
    def compared_isas(self):
        """The other CPU ISAs whose variants of the compare_isas rows run beside them
        (--compare-isas). Worked out once, after --isa has been applied (run() asks first)."""
        if self.args.device != "cpu" or self.args.compare_isas == "none":
            return []
        supported = self.sd.build_info()["cpu_isas_supported"]
        if self.args.compare_isas == "vector":
            wanted = [i for i in supported if i != "scalar"]
        else:
            wanted = [i.strip() for i in self.args.compare_isas.split(",") if i.strip()]
            bad = [i for i in wanted if i not in supported]
            if bad:
                raise SystemExit(f"--compare-isas: {bad} not supported here ({supported})")
        return [i for i in wanted if i != self.sd.get_isa()]

    def label(self, row):
        """The row's label; an anchor running the formula instead of its package says so, and
        a compare_isas row names its ISA when other ISAs are compared."""
        label = row.label
        if row.compare_isas and self.compared_isas:
            label += f" [{self.sd.get_isa()}]"
        source = self.anchors.get(row.source) if row.source else None
        return source.label(label) if source is not None else label

    def compile(self, fn):
        return self.torch.compile(fn, dynamic=bool(self.args.compile_dynamic))

    def check_cuda(self):
        """Exits unless torch sees a GPU; returns why the library cannot run there, or None
        (its rows then fail and the anchors still run)."""
        torch, sd = self.torch, self.sd
        if torch is None:
            raise SystemExit(f"--device cuda needs PyTorch (CUDA tensors and events): "
                             f"{self.torch_error}")
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False "
                             "(no NVIDIA GPU or driver visible to PyTorch)")
        info = sd.build_info()
        error = None
        if not info.get("cuda_compiled"):
            error = ("stochdepth was built without CUDA (build_info()['cuda_compiled'] is "
                     "False): rebuild with nvcc on PATH (STOCHDEPTH_CUDA=ON)")
        elif not info.get("cuda_device_count"):
            error = "stochdepth sees no CUDA device (build_info()['cuda_device_count'] == 0)"
        if error:
            print(f"WARNING: {error}; stochdepth rows will fail, anchors still run",
                  file=sys.stderr)
        return error


def _torch_huge_pages(choice):
    """THP_MEM_ALLOC_ENABLE for torch's CPU allocator, which without it does not ask for huge
    pages: on the Zen 4 VM of benchmarks/RESULTS.md that made torch's own rows (the anchors)
    up to 2.9x slower. The anchors get their best configuration unless --torch-thp default; an
    explicit THP_MEM_ALLOC_ENABLE in the environment wins. Read by torch at its first
    allocation, so it is set before torch is imported. Returns what the run used."""
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return f"THP_MEM_ALLOC_ENABLE={os.environ['THP_MEM_ALLOC_ENABLE']} (from the environment)"
    if choice == "default":
        return "torch's default (THP_MEM_ALLOC_ENABLE unset: no huge pages; --torch-thp default)"
    if "torch" in sys.modules:
        return "torch's default (torch was imported before the benchmark could set it)"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # inherited by the Keras subprocess rows too
    return "THP_MEM_ALLOC_ENABLE=1 (set by the benchmark: huge pages for torch's allocator)"
