"""(seed, offset) in the PyTorch adapter: the `Rng` type, the draw from a torch generator, the
per-rank seed, and the seeded modules' state (docs/design.md, "Randomness in the adapters").

On the host the pair is an `Rng`, two unsigned 64-bit ints. The custom ops take it as a CPU int64
tensor [seed, offset] (two's complement words): `Rng.tensor()` makes that argument and
`Rng.of()` reads it back. A tensor stands for the pair elsewhere only where its values are not
known on the host: a draw or a module's state inside a traced graph.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as _dist
from torch import Tensor

from . import _mode
from ._checks import M64, check_u64

_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's Weyl increment (2**64 / golden ratio)
_STEP = torch.tensor([0, 1], dtype=torch.int64)


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


def for_call(seed, offset, generator) -> RngArg:
    """A function's (seed, offset): as given, or a fresh draw when `seed` is None."""
    if seed is None:
        return draw(generator)
    return Rng(check_u64("seed", seed), check_u64("offset", offset))


def rank_key(sync_across_ranks: bool) -> int:
    """The distributed rank whose `rank_seed` applies, or -1 (no process group, or synced)."""
    if sync_across_ranks or not (_dist.is_available() and _dist.is_initialized()):
        return -1
    return _dist.get_rank()


@torch.library.custom_op("stochdepth::rng_snapshot", mutates_args=())
def rng_snapshot(state: Tensor) -> Tensor:
    """A copy of a module's [seed, offset] state, opaque to the compiler.

    Inside a compiled graph the module's state is a graph input mutated in place (offset += 1)
    after the forward op has used it. A plain `state.clone()` may be rematerialised in the
    backward graph by the partitioner, from the input as it is by then, i.e. with the offset of
    the next call (seen with inductor in torch 2.13: wrong gradients). A custom op is not
    recomputed, so the backward gets exactly the words that the forward used.
    """
    return state.clone()


@rng_snapshot.register_fake
def _(state):
    return torch.empty_like(state)


class SeededMixin:
    """Seed/offset bookkeeping shared by the modules.

    Unseeded: nothing is stored and state_dict() stays empty. Seeded: a CPU int64 tensor
    `[seed, offset]` (not a buffer, so `.to(device)` leaves it on the host and DDP does not
    broadcast it) advances its offset after each training call and is saved in state_dict()
    under "<prefix>rng_state" through state-dict hooks.
    """

    def _init_rng(self, seed, sync_across_ranks):
        self.sync_across_ranks = bool(sync_across_ranks)
        self._set_seed(None if seed is None else check_u64("seed", seed), 0)
        self._register_state_dict_hook(SeededMixin._state_dict_hook)
        self._register_load_state_dict_pre_hook(SeededMixin._load_hook, with_module=True)

    def _set_seed(self, seed, offset):
        self.seed = seed
        self._rng_state = None if seed is None else Rng(seed, offset).tensor()

    @property
    def offset(self) -> Optional[int]:
        """The offset the next training call will use (None when unseeded)."""
        return None if self._rng_state is None else Rng.of(self._rng_state).offset

    def _host_rng(self) -> Rng:
        """This call's pair, read (and the offset advanced) on the host, or a fresh draw."""
        state = self._rng_state
        if state is None:
            return Rng.of(draw(None))
        rng = Rng.of(state)
        state.add_(_STEP)
        return rng

    def _next_rng(self) -> RngArg:
        """This call's pair; inside a traced graph a graph value, so that a compiled step does
        not recompile for each new offset."""
        state = self._rng_state
        if _mode.eager(state):
            return self._host_rng()
        if state is None:
            return draw(None)
        rng = rng_snapshot(state)
        state.add_(_STEP)
        return rng

    @staticmethod
    def _state_dict_hook(module, state_dict, prefix, local_metadata):
        if module._rng_state is not None:
            state_dict[prefix + "rng_state"] = module._rng_state.clone()

    @staticmethod
    def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
        key = prefix + "rng_state"
        if key in state_dict:
            value = state_dict.pop(key)
            words = [int(w) & M64 for w in torch.as_tensor(value).reshape(-1).tolist()]
            if len(words) != 2:
                error_msgs.append(f"{key}: expected 2 int64 words [seed, offset]")
                return
            module._set_seed(words[0], words[1])

    def _seed_repr(self):
        return "" if self.seed is None else f", seed={self.seed}"
