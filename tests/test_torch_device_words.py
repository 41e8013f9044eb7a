"""Where a seeded module's CUDA words are allocated, checked on the CPU (docs/design.md, "CUDA").

The words' memory must be allocated outside any CUDA graph capture: memory allocated inside one
comes from the graph's private pool, which can hand it to a temporary freed earlier in the same
capture, and that temporary would overwrite the words on every replay. It is reserved by
`.to(device)` / `.cuda()` (`_apply`) or by the first eager call on the device, and written when a
capture first needs the words; a capture that finds none reserved is refused. Here "CUDA" and
"capturing" are stand-ins (`on_cuda`, `capturing` in `_seeded` and `_keys`) and the device write
is a host memmove, so the module's own logic runs unchanged on CPU tensors.
"""

from __future__ import annotations

import ctypes
import struct

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.torch import _keys, _seeded  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture
def fake_cuda(monkeypatch):
    """Every tensor counts as CUDA; `state["capturing"]` says whether a capture is under way.
    Returns the state, with "made": the capturing flag at each allocation of words' memory."""
    state = {"capturing": False, "made": []}
    for module in (_keys, _seeded):  # the key arithmetic and the module state both ask
        monkeypatch.setattr(module, "on_cuda", lambda t: t is not None)
        monkeypatch.setattr(module, "capturing",
                            lambda t: t is not None and state["capturing"])

    def write_words(ptr, seed, offset, device):
        ctypes.memmove(ptr, struct.pack("<QQ", seed, offset), 16)

    monkeypatch.setattr(_seeded._core, "write_device_words", write_words)
    empty = torch.empty

    def recording_empty(*size, **kw):
        if kw.get("dtype") is torch.int64 and size == (2,):  # the words' memory
            state["made"].append(state["capturing"])
        return empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", recording_empty)
    return state


def words_of(key):
    return [w & (2**64 - 1) for w in key.words.tolist()]


def test_the_first_eager_call_reserves_the_words_and_a_capture_uses_them(fake_cuda):
    drop = sdt.DropPath(0.5, seed=21)
    x = torch.ones(8, 3)
    # eager: the host pair, the words' memory reserved
    assert drop._next_rng(x, True) == (21, 0, None)
    assert fake_cuda["made"] == [False] and getattr(drop, "_rng_device", None) is None
    spare = drop._rng_spare
    fake_cuda["capturing"] = True
    # written from the host state, then advanced
    assert words_of(drop._next_rng(x, True)) == [21, 1]
    assert words_of(drop._next_rng(x, True)) == [21, 2]
    assert fake_cuda["made"] == [False] and drop._rng_device is spare  # nothing allocated here
    fake_cuda["capturing"] = False
    assert drop.offset == 3


def test_moving_the_module_makes_the_words(fake_cuda):
    drop = sdt.StochasticDepth(0.5, seed=5)
    assert drop.to(torch.float64) is drop  # _apply, with a probe that counts as a CUDA tensor
    assert fake_cuda["made"] == [False]
    fake_cuda["capturing"] = True
    assert words_of(drop._next_rng(torch.ones(4, 2), True)) == [5, 0]
    assert fake_cuda["made"] == [False]


def test_a_capture_without_words_is_refused(fake_cuda):
    drop = sdt.DropPath(0.5, seed=9)
    fake_cuda["capturing"] = True
    with pytest.raises(RuntimeError, match=r"DropPath\(seed=9\).*\.to\(device\).*eagerly"):
        drop._next_rng(torch.ones(4, 2), True)
    assert fake_cuda["made"] == []
    assert drop.offset == 0  # nothing was used up


def test_unseeded_and_compact_modules_make_no_words(fake_cuda):
    sdt.DropPath(0.5).to(torch.float64)
    sdt.StochasticResidual(torch.nn.Identity(), 0.5, seed=3).to(torch.float64)
    assert fake_cuda["made"] == []
