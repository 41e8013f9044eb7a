"""(seed, offset) in the PyTorch adapter: the `Rng` type, the draw from a torch generator, the
per-rank seed, and the seeded modules' state (docs/design.md, "Randomness in the adapters").

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

from .. import _core
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
        words = getattr(self, "_rng_device", None)
        if words is not None and seed is not None:
            # Kept (a captured graph holds its address); the new state, ordered after the work
            # queued so far on the current stream.
            words.copy_(self._rng_state.to(words.device))
        elif seed is None:
            self._rng_device = self._rng_spare = None

    def _pull_state(self) -> Tensor:
        """The host state, brought up to date from the device words when they exist (a sync)."""
        words = getattr(self, "_rng_device", None)
        if words is not None:
            self._rng_state.copy_(words.cpu())
        return self._rng_state

    @property
    def offset(self) -> Optional[int]:
        """The offset the next training call will use (None when unseeded)."""
        return None if self._rng_state is None else Rng.of(self._pull_state()).offset

    def _host_rng(self) -> Rng:
        """This call's pair, read (and the offset advanced) on the host, or a fresh draw."""
        state = self._rng_state
        if state is None:
            return Rng.of(draw(None))
        words = getattr(self, "_rng_device", None)
        rng = Rng.of(self._pull_state())
        state.add_(_STEP)
        if words is not None:
            words[1:].add_(1)
        return rng

    # False for a module that reads its mask on the host anyway (StochasticResidual): it never
    # has device words.
    _uses_device_words = True

    def _reserve_device_words(self, device) -> None:
        """Allocates the memory of the module's words on `device` now, outside any capture;
        they are written (and become the state) only once a capture needs them. Memory
        allocated inside a CUDA graph capture would come from the graph's private pool, which
        may give it to a temporary freed earlier in the same capture: that temporary's writes
        would then overwrite the words on every replay."""
        if self._rng_state is None or not self._uses_device_words:
            return
        spare = getattr(self, "_rng_spare", None)
        live = getattr(self, "_rng_device", None)
        if (spare is None or spare.device != device) and (live is None or live.device != device):
            self._rng_spare = torch.empty(2, dtype=torch.int64, device=device)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda(): a seeded module moved to a CUDA device reserves its words there.
        module = super()._apply(fn, *args, **kwargs)
        if self._rng_state is not None and self._uses_device_words:
            try:
                probe = fn(torch.empty(0))
            except Exception:  # a conversion for parameters only, or no CUDA here: nothing to do
                probe = None
            if isinstance(probe, Tensor) and on_cuda(probe) and not capturing(probe):
                self._reserve_device_words(probe.device)
        return module

    def _device_rng(self, like: Tensor) -> Tensor:
        """This call's pair as CUDA words (a copy), the module's device words advanced by one
        offset: both captured, so every replay of a graph uses the next offset. The words are
        written once, from the host state, into memory reserved outside any capture
        (`_core.write_device_words`, itself outside the capture); from then on they are the
        module's state. A capture on a device with no reserved memory is refused."""
        words = getattr(self, "_rng_device", None)
        if words is None or words.device != like.device:
            spare = getattr(self, "_rng_spare", None)
            if spare is None or spare.device != like.device:
                if capturing(like):
                    raise RuntimeError(
                        f"{type(self).__name__}(seed={self.seed}) has no mask words on "
                        f"{like.device}, and they cannot be allocated inside a CUDA graph capture "
                        "(the graph's memory pool could reuse them): move the module there with "
                        ".to(device) or run it once eagerly on that device before capturing "
                        "(docs/design.md, \"CUDA\")")
                spare = torch.empty(2, dtype=torch.int64, device=like.device)
            host = Rng.of(self._pull_state())
            _core.write_device_words(spare.data_ptr(), host.seed, host.offset, spare.device.index)
            self._rng_device, self._rng_spare = spare, None
            words = spare
        rng = words.clone()
        words[1:].add_(1)
        return rng

    def _next_rng(self, like: Optional[Tensor] = None) -> RngArg:
        """This call's pair; inside a traced graph a graph value, so that a compiled step does
        not recompile for each new offset; while capturing a CUDA graph (or once the module has
        device words, on their device) CUDA words that the kernel reads."""
        state = self._rng_state
        if _mode.eager(state, like):
            if capturing(like):
                return draw_on_device(None, like) if state is None else self._device_rng(like)
            words = getattr(self, "_rng_device", None)
            if words is not None and like is not None and like.device == words.device:
                return self._device_rng(like)  # no sync: the words stay the state
            if on_cuda(like):
                self._reserve_device_words(like.device)  # for a later capture, if .to() did not
            return self._host_rng()
        if state is None:
            return for_call(None, 0, None, like)
        rng = rng_snapshot(state)
        state.add_(_STEP)
        return rng

    @staticmethod
    def _state_dict_hook(module, state_dict, prefix, local_metadata):
        if module._rng_state is not None:
            state_dict[prefix + "rng_state"] = module._pull_state().clone()

    @staticmethod
    def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs):
        key = prefix + "rng_state"
        if key in state_dict:
            value = state_dict.pop(key)
            raw = torch.as_tensor(value).reshape(-1).tolist()
            if len(raw) != 2:
                error_msgs.append(f"{key}: expected 2 int64 words [seed, offset]")
                return
            # A float is taken only when it is an integer: int() would truncate 1.5 to 1.
            if not all(isinstance(w, int) or (isinstance(w, float) and w.is_integer())
                       for w in raw):
                error_msgs.append(f"{key}: expected 2 int64 words [seed, offset], got "
                                  f"non-integral values {raw}")
                return
            words = [int(w) & M64 for w in raw]
            module._set_seed(words[0], words[1])

    def _seed_repr(self):
        return "" if self.seed is None else f", seed={self.seed}"
