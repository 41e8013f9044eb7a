"""The benchmark's vocabulary: a Case (what is measured), a Row (a named thing timed on a case)
and a Section (a part of the run with its own rows and its own key in the JSON).

The driver (cli) is a loop over these objects: for each Case and op it takes every Row of the
device that has the op and whose framework is available, times them interleaved with the
ceiling rows of the op's primitives (timing.interleave), and hands the Case and the rows to
report. The rows modules only export lists of Row objects:

    cpu_rows.ROWS    the library on the CPU (NumPy arrays, torch tensors, the torch adapter)
    cuda_rows.ROWS   the library on a GPU (torch tensors)
    anchors.ROWS     what users run today: NumPy, torchvision, timm, torch.compile
    ceiling.ROWS     the implementations of the ceiling primitives (copy, add, add in place, fill)
    jax_rows.ROWS, jax_rows.KERAS_ROWS, keras_rows.ROWS, tf_rows.KERAS_ROWS: the rows of the
                     JAX and Keras sections (Keras on torch, JAX and TensorFlow)

Adding a row: one Row in the list of its module, with a builder per op it implements. A
builder takes the case's tensors (cpu_rows.CpuTensors or cuda_rows.CudaTensors: the same
attribute names for the torch tensors, `t_shortcut`, `t_residual`, ...) and returns
(fn, setup): `fn(*setup())` is timed, `setup` (or None) runs untimed before each call. The row
then appears in every table and the JSON under its `name`; an anchor row (`anchor` set) also
gets a "vs" column. Adding a ceiling implementation: one Row in ceiling.ROWS, its `ops` keyed by
the primitive it implements.

Adding a section (something timed its own way, e.g. whole-model train steps): one Section
object in its module, listed in cli.SECTIONS. It says why the options leave it out
(`skipped(args)`), and `run(args)` takes, prints and returns its results, stored in the JSON
under `key`.

What a row means: docs/design.md, "Measuring speed".
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

__all__ = ["ALWAYS_AVAILABLE", "Case", "Row", "Section"]

# Frameworks every run has (the library itself needs NumPy).
ALWAYS_AVAILABLE = ("stochdepth", "numpy")


@dataclasses.dataclass(frozen=True)
class Case:
    """One thing measured: a shape and dtype at survival probability p (--cases)."""

    name: str
    shape: tuple
    dtype: str
    what: str
    p: float = 0.8

    @property
    def n_elems(self):
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class Row:
    """A named thing timed on a case.

    name       its key in the JSON ("impl"); unique among one device's rows of a module
    label      what the tables say
    ops        {op or ceiling primitive: builder}, a builder as in the module docstring
    framework  what must be available for it to run: "stochdepth" and "numpy" always are;
               "torch", "stochdepth.torch", "torch.compile" (env.Env says why one is not);
               "jax", "keras" (their sections say so when they fail to import)
    devices    the devices it runs on
    ours       True for the library's own rows: a failure fails the run
    anchor     for an anchor: its key in each row's "speedup" ...
    column     ... and the header of its column in the tables
    source     the anchor function it calls (anchors.load_anchors: "torchvision", "timm"), so
               that its label says "(formula)" when the package did not import
    dtypes     the dtypes it runs on (None: all)
    compare_isas  also run on the other CPU ISAs beside it (--compare-isas)
    """

    name: str
    label: str
    ops: Mapping[str, Callable]
    framework: str
    devices: tuple = ("cpu",)
    ours: bool = False
    anchor: str | None = None
    column: str | None = None
    source: str | None = None
    dtypes: tuple | None = None
    compare_isas: bool = False

    def skipped(self, device, op, dtype, unavailable):
        """Why this row does not run for (device, op, dtype), or None. `unavailable(framework)`
        gives why a framework is missing, or None."""
        if device not in self.devices:
            return f"not on {device}"
        if op not in self.ops:
            return f"no {op}"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"not for {dtype}"
        return unavailable(self.framework)

    def build(self, op, tensors):
        """(fn, setup) of this row's `op` on the case's tensors."""
        return self.ops[op](tensors)


@dataclasses.dataclass(frozen=True, eq=False)
class Section:
    """A part of the run after the interleaved tables, timed its own way.

    key      its key in the JSON results
    title    what the header says when it is skipped
    devices  the --device values it runs with
    skipped  args -> why the options leave it out, or None
    run      args -> its results (it prints its own lines)
    """

    key: str
    title: str
    devices: tuple
    skipped: Callable
    run: Callable
