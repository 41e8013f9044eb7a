"""Type stubs for stochdepth._core, the compiled extension (src/bindings/module.cc).

Users call the functions of the `stochdepth` package, which wrap these; the adapters call the raw
entries (`run_raw`, `stream_copy_raw`) with pointers they validated themselves. Every name the
module exposes is here and nothing else (tests/test_core_layout.py checks both ways).
"""

from typing import Any, ClassVar, Dict, List, Optional, Protocol, Sequence, Tuple, TypedDict, Union

import numpy as np
import numpy.typing as npt

class _DLPackProducer(Protocol):
    def __dlpack__(self, *, stream: Any = ..., max_version: Any = ...) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...

# What the array arguments accept: a NumPy array (any float dtype, bfloat16 from ml_dtypes), a
# stochdepth.Array, or any DLPack producer on the CPU or a CUDA device.
_ArrayIn = Union[npt.NDArray[Any], "Array", _DLPackProducer]

class Array:
    """An output stochdepth allocated for a DLPack input; a DLPack producer itself."""

    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: Optional[int] = None,
        max_version: Optional[Tuple[int, int]] = None,
        dl_device: Optional[Tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    def numpy(self) -> npt.NDArray[Any]: ...
    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> npt.NDArray[Any]: ...

class DType:
    """The storage dtype of run_raw's buffers."""

    float16: ClassVar["DType"]
    bfloat16: ClassVar["DType"]
    float32: ClassVar["DType"]
    float64: ClassVar["DType"]
    __members__: ClassVar[Dict[str, "DType"]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class Scaling:
    """inference: s = 1 in training, factor p at inference; training: s = 1/p, factor 1."""

    inference: ClassVar["Scaling"]
    training: ClassVar["Scaling"]
    __members__: ClassVar[Dict[str, "Scaling"]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class _BuildInfo(TypedDict):
    version: str
    cpu_isas_compiled: List[str]
    cpu_isas_supported: List[str]
    cpu_isa: str
    cuda_compiled: bool
    cuda_architectures: str
    cuda_emulator: bool  # the tests' module _cuda_emulator is installed
    cuda_device_count: int
    num_threads: int
    parallel_threshold_bytes: int
    stream_threshold_bytes: int
    max_threads: int
    cache_limit_bytes: int

# ---- the op on arrays (the package's forward / backward / mask pass every argument)

def forward(
    shortcut: Optional[_ArrayIn],
    residual: _ArrayIn,
    survival_prob: float,
    training: bool,
    seed: Union[int, _ArrayIn, None],
    offset: int,
    mode: str,
    axis: int,
    scaling: str,
    out: Optional[_ArrayIn],
    stream: Optional[int],
    gamma: Optional[_ArrayIn],
) -> Any: ...
def backward(
    grad_out: _ArrayIn,
    survival_prob: float,
    training: bool,
    seed: Union[int, _ArrayIn, None],
    offset: int,
    mode: str,
    axis: int,
    scaling: str,
    out: Optional[_ArrayIn],
    stream: Optional[int],
    gamma: Optional[_ArrayIn],
    residual: Optional[_ArrayIn],
) -> Tuple[Any, ...]: ...
def mask(
    batch: int, survival_prob: float, seed: int, offset: int, mode: str
) -> npt.NDArray[np.bool_]: ...

# ---- the fused residual and norm (docs/design.md, "Fused residual and norm")

def forward_norm(
    shortcut: _ArrayIn,
    residual: _ArrayIn,
    survival_prob: float,
    weight: Optional[_ArrayIn],
    bias: Optional[_ArrayIn],
    norm: str,
    eps: float,
    gamma: Optional[_ArrayIn],
    training: bool,
    seed: Optional[int],
    offset: int,
    mode: str,
    scaling: str,
    stream: Optional[int],
) -> Tuple[Any, Any]: ...
def backward_norm(
    grad_y: _ArrayIn,
    grad_n: _ArrayIn,
    y: _ArrayIn,
    residual: Optional[_ArrayIn],
    survival_prob: float,
    weight: Optional[_ArrayIn],
    bias: Optional[_ArrayIn],
    norm: str,
    eps: float,
    gamma: Optional[_ArrayIn],
    training: bool,
    seed: Optional[int],
    offset: int,
    mode: str,
    scaling: str,
    stream: Optional[int],
) -> Tuple[Any, Any, Any, Any, Any]: ...

# ---- raw entries: pointers as integers, device < 0 for the CPU else a CUDA ordinal

def run_raw(
    shortcut_ptr: int,
    input_ptr: int,
    out_ptr: int,
    outer: int,
    batch: int,
    inner: int,
    dtype: DType,
    survival_prob: float,
    training: bool,
    batch_mode: bool,
    scaling: Scaling,
    seed: int,
    offset: int,
    device: int,
    stream: int,
    compact_input: bool = False,
    compact_output: bool = False,
    rng_words_ptr: int = 0,
    gamma_ptr: int = 0,
    channels: int = 1,
) -> None: ...
def backward_gamma_raw(
    input_ptr: int,
    out_ptr: int,
    residual_ptr: int,
    gamma_ptr: int,
    grad_gamma_ptr: int,
    outer: int,
    batch: int,
    inner: int,
    channels: int,
    dtype: DType,
    survival_prob: float,
    training: bool,
    batch_mode: bool,
    scaling: Scaling,
    seed: int,
    offset: int,
    device: int,
    stream: int,
    rng_words_ptr: int = 0,
) -> None: ...
def write_device_words(dst_ptr: int, seed: int, offset: int, device: int) -> None: ...
def stream_copy(dst: _ArrayIn, src: _ArrayIn) -> None: ...
def stream_copy_raw(dst_ptr: int, src_ptr: int, nbytes: int, device: int, stream: int) -> None: ...
def philox4x32_10(
    counter: Sequence[int], key: Sequence[int], isa: str = "scalar"
) -> Tuple[int, int, int, int]: ...
def register_bfloat16(dtype: np.dtype[Any]) -> None: ...

# ---- build, ISA, threads and memory

def build_info() -> _BuildInfo: ...
def set_isa(name: str) -> None: ...
def get_isa() -> str: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def set_parallel_threshold(bytes: int) -> None: ...
def get_parallel_threshold() -> int: ...
def set_stream_threshold(bytes: int) -> None: ...
def get_stream_threshold() -> int: ...
def cache_bytes() -> int: ...
def cache_clear() -> None: ...
