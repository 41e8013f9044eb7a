"""The stream handed to a CUDA DLPack producer, checked without a GPU (docs/design.md, "CUDA").

torch.cuda reports its legacy default stream as 0, which DLPack reserves (torch raises on
`__dlpack__(stream=0)`): the binding sends 1, the legacy default stream, for 0 and for no stream,
and any other stream unchanged. A producer that claims to be on CUDA records what it was asked
and refuses to export, so nothing is ever dereferenced (its refusal reaches the caller as a
TypeError naming the argument, chained to the producer's own exception).
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
                         [(None, 1), (0, 1), (1, 1), (2, 2), (0x7F00_1234, 0x7F00_1234)])
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
