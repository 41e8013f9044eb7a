"""(seed, offset) in the PyTorch adapter: the `Rng` type, the draw from a torch generator and the
per-rank seed (docs/design.md, "Randomness in the adapters"); the seeded modules' state is
`_seeded`.

On the host the pair is an `Rng`, two unsigned 64-bit ints. The custom ops take it as a CPU int64
tensor [seed, offset] (two's complement words): `Rng.tensor()` makes that argument and
`Rng.of()` reads it back. A tensor stands for the pair elsewhere only where its values are not
known on the host: a draw or a module's state inside a traced graph, or words on a CUDA device
(the graph-safe path, docs/design.md, "CUDA"): there the kernel reads them, never the host, so a
captured CUDA graph draws a new mask on every replay.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as _dist
from torch import Tensor

from . import _mode
from ._checks import M64, check_u64

_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment (2**64 / golden ratio)


def _splitmix64(z: int) -> int:
    # Steele, Lea, Flood, "Fast splittable pseudorandom number generators" (OOPSLA 2014): the
    # finalizer of SplitMix64, a bijection of 64-bit words.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def rank_seed(seed: int, rank: int) -> int:
    """The Philox key used by distributed rank `rank` for `seed` (unless sync_across_ranks).

    SplitMix64 output for the state seed + (rank + 1) * 0x9E3779B97F4A7C15 (mod 2**64): distinct
    ranks get distinct keys for one seed, and no rank uses the bare seed.
    """
    return _splitmix64((int(seed) + (int(rank) + 1) * _GAMMA) & M64)


def _signed(u: int) -> int:
    return u - (1 << 64) if u >> 63 else u


class Rng(NamedTuple):
    """The mask stream's (seed, offset), each an unsigned 64-bit int."""

    seed: int
    offset: int

    @staticmethod
    def of(t: Tensor) -> Rng:
        """From an int64 [seed, offset] tensor (an op's argument, a module's state)."""
        seed, offset = t.tolist()
        return Rng(seed & M64, offset & M64)

    def tensor(self) -> Tensor:
        """The custom ops' form: a CPU int64 tensor [seed, offset]."""
        return torch.tensor([_signed(self.seed), _signed(self.offset)], dtype=torch.int64)

    def for_rank(self, rank: int) -> Rng:
        """The pair as distributed rank `rank` uses it; rank < 0 leaves the seed as it is."""
        return self if rank < 0 else Rng(rank_seed(self.seed, rank), self.offset)


# What the adapter passes around: an Rng, an int64 tensor (traced, or an op's argument), or
# None (inference: no mask is drawn).
RngArg = Union[Rng, Tensor, None]


def as_host(rng: RngArg) -> Optional[Rng]:
    return rng if rng is None or isinstance(rng, Rng) else Rng.of(rng)


def as_key(rng: RngArg) -> RngArg:
    """What the kernels take: an Rng or None as they are, CUDA words kept on the device (the
    kernel reads them: no host read, no sync), a CPU tensor read into an Rng."""
    if rng is None or isinstance(rng, Rng) or rng.is_cuda:
        return rng
    return Rng.of(rng)


def on_cuda(t: Optional[Tensor]) -> bool:
    """True when `t` is a CUDA tensor."""
    return t is not None and t.is_cuda


def capturing(t: Optional[Tensor]) -> bool:
    """True when `t` is a CUDA tensor and the current CUDA stream is capturing a graph."""
    return t is not None and t.is_cuda and torch.cuda.is_current_stream_capturing()


def _lsr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 words (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def rank_words(words: Tensor, rank: int) -> Tensor:
    """`rank_seed` on device words [seed, offset]: int64 ops that wrap like uint64 ones, so the
    seed never visits the host (graph-safe). rank < 0 returns `words` unchanged."""
    if rank < 0:
        return words
    z = words[:1] + _signed((int(rank) + 1) * _GAMMA & M64)
    z = (z ^ _lsr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _lsr(z, 27)) * _signed(0x94D049BB133111EB)
    return torch.cat([z ^ _lsr(z, 31), words[1:]])


def as_tensor(rng: RngArg) -> Optional[Tensor]:
    return rng.tensor() if isinstance(rng, Rng) else rng


def draw(generator: Optional[torch.Generator]) -> Tensor:
    """A fresh int64 [seed, offset] tensor on the CPU (each word uniform over 2**64 - 1 values).

    torch.randint rather than Tensor.random_, which dynamo cannot trace: the same call runs
    eagerly and inside a compiled graph.
    """
    if generator is None or generator.device.type == "cpu":
        return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator,
                             device="cpu")
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator,
                         device=generator.device).cpu()


def draw_on_device(generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """Fresh int64 words [seed, offset] drawn on `like`'s CUDA device by torch's generator of that
    device (or `generator`, a CUDA one): graph-safe, a captured draw gives new words on each
    replay. A CPU generator's draw would be a constant of the graph: refused while capturing."""
    if generator is not None and generator.device.type != "cuda":
        raise ValueError(
            "a CPU generator cannot draw the mask inside a CUDA graph capture: its draw would be "
            "replayed as a constant (the same mask on every replay); pass generator=None (the "
            "device's generator) or a CUDA generator (docs/design.md, \"CUDA\")")
    return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, generator=generator,
                         device=like.device)


def for_call(seed, offset, generator, like: Optional[Tensor] = None) -> RngArg:
    """A function's (seed, offset): as given, or a fresh draw when `seed` is None: on the host
    eagerly, on `like`'s CUDA device while capturing a CUDA graph or tracing for CUDA (the
    kernel reads those words; a graph replay draws new ones)."""
    if seed is None:
        if like is not None and like.is_cuda:
            if capturing(like):
                return draw_on_device(generator, like)
            if not _mode.eager(like) and (generator is None or generator.device.type == "cuda"):
                return draw_on_device(generator, like)
        return draw(generator)
    return Rng(check_u64("seed", seed), check_u64("offset", offset))


def rank_key(sync_across_ranks: bool) -> int:
    """The distributed rank whose `rank_seed` applies, or -1 (no process group, or synced)."""
    if sync_across_ranks or not (_dist.is_available() and _dist.is_initialized()):
        return -1
    return _dist.get_rank()
