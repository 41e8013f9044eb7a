"""(seed, offset) in the PyTorch adapter: the `Rng` type, the draw from a torch generator and the
per-rank seed (docs/design.md, "Randomness in the adapters"); the seeded modules' state is
`_seeded`.

On the host the pair is an `Rng`, two unsigned 64-bit ints. The custom ops take it as a CPU int64
tensor [seed, offset] (two's complement words): `Rng.tensor()` makes that argument and
`Rng.of()` reads it back.

Each call decides its path once, at its entry (docs/design.md, "The PyTorch adapter"), and makes
the pair in that path's form: on the eager fast path a `Key` (the pair on the host, or CUDA words
that the kernel reads when it runs: the graph-safe path, docs/design.md, "CUDA"), made by
`eager_key`; on the custom-op path the op's `rng` tensor (a graph value inside a traced graph, so
a new offset does not recompile), made by `traced_rng`. None means inference: no mask is drawn.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as _dist
from torch import Tensor

from .._op import M64, check_u64, to_int64

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
        return torch.tensor([to_int64(self.seed), to_int64(self.offset)], dtype=torch.int64)

    def for_rank(self, rank: int) -> Rng:
        """The pair as distributed rank `rank` uses it; rank < 0 leaves the seed as it is."""
        return self if rank < 0 else Rng(rank_seed(self.seed, rank), self.offset)


class Key(NamedTuple):
    """One call's pair as the eager path's kernels take it: `seed` and `offset` read on the host,
    or `words`, an int64 CUDA tensor [seed, offset] that the kernel reads when it runs (no host
    read, no sync; seed and offset are then unused)."""

    seed: int = 0
    offset: int = 0
    words: Optional[Tensor] = None

    @staticmethod
    def of(rng: Tensor) -> Key:
        """A custom op's `rng` (int64 or uint64 [seed, offset]): CUDA words stay on the device
        (uint64 viewed as the same int64 words), a CPU tensor is read."""
        if rng.is_cuda:
            return Key(words=rng.view(torch.int64) if rng.dtype == torch.uint64 else rng)
        return Key(*Rng.of(rng))

    def tensor(self) -> Tensor:
        """The custom ops' `rng` for this pair: the words themselves, or `Rng.tensor()`."""
        return self.words if self.words is not None else Rng(self.seed, self.offset).tensor()

    def for_rank(self, rank: int) -> Key:
        """The pair as distributed rank `rank` uses it (`rank_words` on device words); rank < 0
        leaves it as it is."""
        if rank < 0:
            return self
        if self.words is not None:
            return Key(words=rank_words(self.words, rank))
        return Key(rank_seed(self.seed, rank), self.offset)


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
    z = words[:1] + to_int64((int(rank) + 1) * _GAMMA & M64)
    z = (z ^ _lsr(z, 30)) * to_int64(0xBF58476D1CE4E5B9)
    z = (z ^ _lsr(z, 27)) * to_int64(0x94D049BB133111EB)
    return torch.cat([z ^ _lsr(z, 31), words[1:]])


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


def host_rng(seed, offset, generator) -> Rng:
    """A call's pair on the host: as given (checked), or a fresh draw from `generator`."""
    if seed is None:
        return Rng.of(draw(generator))
    return Rng(check_u64("seed", seed), check_u64("offset", offset))


def eager_key(seed, offset, generator, like: Tensor) -> Key:
    """A function's pair on the eager path: as given, or a fresh draw, on the host, or on
    `like`'s CUDA device while a CUDA graph is being captured (the kernel reads those words; a
    replay draws new ones)."""
    if seed is None and capturing(like):
        return Key(words=draw_on_device(generator, like))
    return Key(*host_rng(seed, offset, generator))


def traced_rng(seed, offset, generator, like: Tensor) -> Tensor:
    """A function's pair on the custom-op path: the op's `rng`, as given, or a fresh draw that
    is part of the traced graph, on `like`'s CUDA device when tracing for CUDA (unless
    `generator` is a CPU one)."""
    if seed is None:
        if like.is_cuda and (capturing(like) or generator is None
                             or generator.device.type == "cuda"):
            return draw_on_device(generator, like)
        return draw(generator)
    return Rng(check_u64("seed", seed), check_u64("offset", offset)).tensor()


def rank_key(sync_across_ranks: bool) -> int:
    """The distributed rank whose `rank_seed` applies, or -1 (no process group, or synced)."""
    if sync_across_ranks or not (_dist.is_available() and _dist.is_initialized()):
        return -1
    return _dist.get_rank()
