"""The stream handed to a CUDA DLPack producer, checked without a GPU (docs/design.md, "CUDA").

torch.cuda reports its legacy default stream as 0, which DLPack reserves (torch raises on
`__dlpack__(stream=0)`): the binding sends 1, the legacy default stream, for 0, and any other
stream unchanged. With no stream, the call takes the current stream of the framework that made the
array (torch, CuPy), and refuses any other CUDA array before asking it for anything: the legacy
default stream, taken silently, would break a CUDA graph capture on another stream. A producer that
claims to be on CUDA records what it was asked and refuses to export, so nothing is ever
dereferenced (its refusal reaches the caller as a TypeError naming the argument, chained to the
producer's own exception).
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_dlpack import CtypesDLPack, kDLCUDA

import stochdepth


class Refused(Exception):
    pass


class RecordingCudaProducer(CtypesDLPack):
    def __init__(self, host, device_id=0):
        super().__init__(host, kDLCUDA, device_id)
        self.streams = []

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.streams.append(stream)
        raise Refused


@pytest.mark.parametrize("stream, sent",
                         [(0, 1), (1, 1), (2, 2), (0x7F00_1234, 0x7F00_1234)])
def test_stream_sent_to_a_cuda_producer(stream, sent):
    fake = RecordingCudaProducer(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="residual") as forward_error:
        stochdepth.forward(None, fake, 0.5, seed=1, stream=stream)
    with pytest.raises(TypeError, match="grad_out") as backward_error:
        stochdepth.backward(fake, 0.5, seed=1, stream=stream)
    assert isinstance(forward_error.value.__cause__, Refused)
    assert isinstance(backward_error.value.__cause__, Refused)
    assert fake.streams == [sent, sent]


def test_no_stream_for_a_cpu_producer():
    class RecordingCpu(CtypesDLPack):
        streams = []

        def __dlpack__(self, *, stream=None, **kw):
            self.streams.append(stream)
            return super().__dlpack__(stream=stream, **kw)

    fake = RecordingCpu(np.ones((4, 3), np.float32))
    stochdepth.forward(None, fake, 0.5, seed=1, stream=0)
    assert fake.streams == [None]


def test_no_stream_for_a_cuda_producer_of_no_known_framework_is_refused_before_export():
    fake = RecordingCudaProducer(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"residual is a CUDA array .*pass stream="):
        stochdepth.forward(None, fake, 0.5, seed=1)
    with pytest.raises(ValueError, match=r"grad_out is a CUDA array .*pass stream="):
        stochdepth.backward(fake, 0.5, seed=1)
    with pytest.raises(ValueError, match=r"residual is a CUDA array .*pass stream="):
        stochdepth._core.forward(None, fake, 0.5, True, 1, 0, "row", 0, "inference", None, None,
                                 None)
    assert fake.streams == []  # nothing was queued or asked of the producer


class FrameworkArray(RecordingCudaProducer):
    """A CUDA array of a framework whose current stream is `current`."""

    current = 0x5EED


def test_no_stream_takes_the_current_stream_of_the_arrays_framework(monkeypatch):
    def framework_stream(x):
        return x.current if isinstance(x, FrameworkArray) else None

    monkeypatch.setattr(stochdepth, "_FRAMEWORK_STREAMS", (framework_stream,))
    plain = RecordingCudaProducer(np.ones((4, 3), np.float32))
    ours = FrameworkArray(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="residual"):  # the producer's refusal, after the stream
        stochdepth.forward(None, ours, 0.5, seed=1)
    with pytest.raises(TypeError, match="grad_out"):
        stochdepth.backward(ours, 0.5, seed=1)
    assert ours.streams == [0x5EED, 0x5EED]
    # The first array the framework knows decides, wherever it stands (here: out=).
    with pytest.raises(TypeError, match="residual"):
        stochdepth.forward(None, plain, 0.5, seed=1, out=ours)
    assert plain.streams == [0x5EED]
    # An explicit stream wins.
    with pytest.raises(TypeError, match="residual"):
        stochdepth.forward(None, ours, 0.5, seed=1, stream=7)
    assert ours.streams[-1] == 7


def test_the_framework_streams_leave_other_objects_alone():
    arrays = [np.ones(3, np.float32), 5, None, RecordingCudaProducer(np.ones(2, np.float32))]
    assert stochdepth._current_stream(*arrays) is None
    torch = pytest.importorskip("torch")
    assert stochdepth._current_stream(torch.ones(3)) is None  # a CPU tensor: no stream
