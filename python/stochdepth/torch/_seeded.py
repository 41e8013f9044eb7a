"""The seeded modules' state: `SeededMixin`, which keeps a module's [seed, offset], advances it per
training call, saves it in the state_dict and, on a CUDA device, keeps it as device words for
CUDA graphs (docs/design.md, "Randomness in the adapters", "CUDA"). The key arithmetic is
`_keys`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .. import _core
from .._op import M64, check_u64
from . import _replay
from ._keys import Key, Rng, capturing, draw, draw_on_device, on_cuda, traced_rng

_STEP = torch.tensor([0, 1], dtype=torch.int64)


@torch.library.custom_op("stochdepth::rng_snapshot", mutates_args=())
def rng_snapshot(state: Tensor) -> Tensor:
    """A copy of a module's [seed, offset] state, opaque to the compiler.

    Inside a compiled graph the module's state is a graph input, and the graph's ops that read it
    may be recomputed in backward by the partitioner (activation checkpointing, or any cheap
    op). The state is therefore never mutated in a graph (`_next_rng` replaces it), and the words
    go to the op through a custom op, which the partitioner does not rematerialise from a
    clone of something else: the backward gets exactly the words that the forward used.
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
        """This call's pair, read (and the offset advanced) on the host, or a fresh draw. A call
        that recomputes a checkpointed forward gets that forward's pair instead (_replay.py)."""
        if self._rng_state is None:
            return Rng.of(draw(None))  # torch.utils.checkpoint restores the generator's state
        return _replay.seeded_words(self, self._advance_host)

    def _advance_host(self) -> Rng:
        state = self._rng_state
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

    def _next_rng(self, like: Tensor, eager: bool) -> Union[Key, Tensor]:
        """This call's pair in the form of the path that the call's entry chose: on the eager path
        (`eager`) a `Key`, while capturing a CUDA graph (or once the module has device words, on
        their device) CUDA words that the kernel reads; on the custom-op path the op's `rng`,
        inside a traced graph a graph value, so that a compiled step does not recompile for each
        new offset."""
        state = self._rng_state
        if eager:
            if capturing(like):
                words = draw_on_device(None, like) if state is None else self._device_rng(like)
                return Key(words=words)
            words = getattr(self, "_rng_device", None)
            if words is not None and like is not None and like.device == words.device:
                return Key(words=self._device_rng(like))  # no sync: the words stay the state
            if on_cuda(like):
                self._reserve_device_words(like.device)  # for a later capture, if .to() did not
            return Key(*self._host_rng())
        if state is None:
            return traced_rng(None, 0, None, like)
        # The state is replaced, not advanced in place: a graph input that the graph mutates may
        # be read again, after the mutation, by an op recomputed in backward (activation
        # checkpointing under torch.compile recomputes the region's ops from its inputs; seen
        # in torch 2.13: the next call's mask in backward). This call's words are the state as
        # it came in, which nothing writes again; the attribute store costs no recompile.
        # torch.export has no backward and warns about a replaced tensor attribute: in place.
        rng = rng_snapshot(state)
        if torch.compiler.is_exporting():
            state.add_(_STEP)
        else:
            self._rng_state = state + _STEP
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
