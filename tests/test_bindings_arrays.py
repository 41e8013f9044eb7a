"""The Python boundary, arrays: shapes, layout, `out=` and devices, one test per bad input of
the list in docs/design.md, "Errors" (exception type AND a message that names the argument), for
NumPy arrays and DLPack producers (tests/sd_dlpack.py; no test here needs torch, see
tests/test_bindings_without_torch.py).

CUDA cases use a capsule that claims a CUDA device over host memory: a build without CUDA (or a
process without a GPU) must reject it before touching the data. On a machine with a CUDA device
those tests skip (the data would really be read as device memory there);
tests/test_drop_path_cuda.py covers real device arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_dlpack import CtypesDLPack, NumpyDLPack, kDLCUDA, kDLCUDAHost
from sd_testutil import (
    BF16,
    F16,
    F32,
    F64,
    HAS_CUDA_DEVICE,
    arrays,
    assert_bits_equal,
    bwd,
    fwd,
    random_array,
)

from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


# ---- Shapes


def test_shape_mismatch():
    sc, _ = arrays((4, 5))
    _, res = arrays((4, 6))
    with pytest.raises(ValueError, match="shape"):
        fwd(sc, res)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res.reshape(4, 6, 1)[:, :5])  # different rank


def test_same_size_different_shape_is_a_mismatch():
    sc, res = arrays((4, 6))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, res.reshape(6, 4))


def test_rank0():
    x = np.array(1.0, F32)
    with pytest.raises(ValueError, match="residual|shortcut"):
        fwd(x, x.copy())
    with pytest.raises(ValueError, match="residual"):
        fwd(None, x)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(x)


@pytest.mark.parametrize("shape, bad", [((4,), 1), ((4,), -2), ((4, 5), 2), ((4, 5), -3),
                                        ((2, 3, 4, 5), 4), ((2, 3, 4, 5), -5),
                                        ((4, 5), 2**62), ((4, 5), -(2**62))])
def test_axis_out_of_range(shape, bad):
    sc, res = arrays(shape)
    with pytest.raises(ValueError, match="axis"):
        fwd(sc, res, axis=bad)
    with pytest.raises(ValueError, match="axis"):
        bwd(res, axis=bad)


@pytest.mark.parametrize("bad", [2**63, 2**64, -(2**63) - 1, 2**100], ids=repr)
def test_axis_beyond_int64(bad):
    """An axis too large for int64 is still 'out of range', not an overflow or cast error."""
    sc, res = arrays()
    with pytest.raises(ValueError, match="axis"):
        fwd(sc, res, axis=bad)


@pytest.mark.parametrize("bad", [1.0, "0", None, True], ids=repr)
def test_axis_wrong_type(bad):
    sc, res = arrays()
    with pytest.raises(TypeError, match="axis"):
        fwd(sc, res, axis=bad)


@pytest.mark.parametrize("bad", [[1.0, 2.0], 3.0, "abc", None, object()], ids=repr)
def test_residual_not_an_array(bad):
    with pytest.raises(TypeError, match="residual"):
        fwd(None, bad)
    with pytest.raises(TypeError, match="grad_out"):
        bwd(bad)
    if bad is not None:
        sc, _ = arrays((2,))
        with pytest.raises(TypeError, match="residual"):
            fwd(sc, bad)


def test_shortcut_not_an_array():
    _, res = arrays((2,))
    with pytest.raises(TypeError, match="shortcut"):
        fwd([1.0, 2.0], res)


# ---- Layout


def _noncontiguous(arr):
    return {"every-other-column": np.ascontiguousarray(np.concatenate([arr, arr], 1))[:, ::2],
            "transpose": np.ascontiguousarray(arr.T).T}


@pytest.mark.parametrize("kind", ["every-other-column", "transpose"])
def test_noncontiguous_inputs(kind):
    sc, res = arrays((4, 5))
    bad_sc, bad_res = _noncontiguous(sc)[kind], _noncontiguous(res)[kind]
    assert not bad_sc.flags.c_contiguous
    with pytest.raises(ValueError, match="shortcut"):
        fwd(bad_sc, res)
    with pytest.raises(ValueError, match="residual"):
        fwd(sc, bad_res)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, bad_res)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(bad_res)
    with pytest.raises(ValueError, match="contiguous"):
        fwd(sc, bad_res)


def test_noncontiguous_out():
    sc, res = arrays((4, 5))
    out = _noncontiguous(np.empty_like(sc))["transpose"]
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=out)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=out)


@pytest.mark.parametrize("producer", ["numpy", "ctypes"])
def test_noncontiguous_dlpack(producer):
    """Strided DLPack tensors (a transposed torch tensor, say) are rejected with the argument's
    name; a strided tensor that is contiguous after all (unit dimensions) is accepted."""
    wrap = NumpyDLPack if producer == "numpy" else CtypesDLPack
    sc, res = arrays((4, 5))
    for kind, bad in _noncontiguous(res).items():
        with pytest.raises(ValueError, match="residual.*contiguous"):
            fwd(None, wrap(bad))
        with pytest.raises(ValueError, match="grad_out"):
            bwd(wrap(bad))
        with pytest.raises(ValueError, match="out"):
            fwd(sc, res, out=wrap(_noncontiguous(np.empty_like(sc))[kind]))
    column = np.ascontiguousarray(res[:, :1])
    odd_strides = np.lib.stride_tricks.as_strided(column, strides=(4, 40))  # shape (4, 1)
    want = reference.forward(None, column, 0.5, seed=1)
    assert_bits_equal(np.from_dlpack(fwd(None, wrap(odd_strides))), want)


def test_item_misaligned_buffer_is_rejected_or_correct():
    """A float32 array starting 1 byte into its buffer: either computed correctly or a
    ValueError naming the argument (never a crash or a wrong answer)."""
    sc, res = arrays((4, 5))
    raw = np.zeros(res.nbytes + 1, np.uint8)
    odd = raw[1:].view(F32).reshape(res.shape)
    odd[...] = res
    try:
        got = fwd(sc, odd)
    except ValueError as e:
        assert "residual" in str(e)
    else:
        assert_bits_equal(got, reference.forward(sc, res, 0.5, seed=1))


# ---- out=


def test_out_read_only():
    sc, res = arrays()
    out = np.empty_like(sc)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=out)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=out)
    ro = sc.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="out"):
        fwd(ro, res, out=ro)


def test_out_read_only_dlpack():
    """A DLPack `out` flagged read-only (versioned capsule, NumPy's exporter) is refused."""
    sc, res = arrays()
    out = np.empty_like(sc)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out.*writable"):
        fwd(sc, res, out=NumpyDLPack(out))
    with pytest.raises(ValueError, match="out.*writable"):
        bwd(res, out=NumpyDLPack(out))
    # read-only DLPack *inputs* are fine
    sc.setflags(write=False)
    res.setflags(write=False)
    got = fwd(NumpyDLPack(sc), NumpyDLPack(res))
    assert_bits_equal(np.from_dlpack(got), reference.forward(sc, res, 0.5, seed=1))


def test_read_only_inputs_are_fine():
    sc, res = arrays()
    sc.setflags(write=False)
    res.setflags(write=False)
    assert_bits_equal(fwd(sc, res), reference.forward(sc, res, 0.5, seed=1))
    assert_bits_equal(bwd(res)[1], reference.backward(res, 0.5, seed=1)[1])


def test_out_wrong_shape():
    sc, res = arrays((4, 5))
    for shape in [(4, 6), (5, 4), (20,), (4, 5, 1)]:
        with pytest.raises(ValueError, match="out"):
            fwd(sc, res, out=np.empty(shape, F32))
        with pytest.raises(ValueError, match="out"):
            bwd(res, out=np.empty(shape, F32))


def test_out_wrong_dtype():
    sc, res = arrays((4, 5))
    for dt in (F64, F16, BF16, np.int32):
        with pytest.raises(TypeError, match="out"):
            fwd(sc, res, out=np.empty((4, 5), dt))
        with pytest.raises(TypeError, match="out"):
            bwd(res, out=np.empty((4, 5), dt))


def test_out_not_an_array():
    sc, res = arrays((4, 5))
    with pytest.raises(TypeError, match="out"):
        fwd(sc, res, out=[0.0] * 20)


def test_out_overlapping_residual():
    sc, res = arrays((4, 5))
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=res)
    with pytest.raises(ValueError, match="out"):
        fwd(None, res, out=res)
    buf = np.zeros(21, F32)
    r, o = buf[:20].reshape(4, 5), buf[1:].reshape(4, 5)
    with pytest.raises(ValueError, match="out"):
        fwd(sc, r, out=o)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=res)
    with pytest.raises(ValueError, match="out"):
        bwd(r, out=o)


def test_out_partially_overlapping_shortcut():
    _, res = arrays((4, 5))
    buf = np.zeros(21, F32)
    s, o = buf[:20].reshape(4, 5), buf[1:].reshape(4, 5)
    with pytest.raises(ValueError, match="out"):
        fwd(s, res, out=o)
    # a reshaped view of the same memory at the same address is in place, not partial overlap
    s = np.zeros((4, 5), F32)
    want = reference.forward(s, res, 0.5, seed=1)
    assert fwd(s, res, out=s) is s
    assert_bits_equal(s, want)


def test_shortcut_and_residual_may_alias():
    """Inputs may share memory with each other (only `out` must not overlap them)."""
    _, res = arrays((4, 5))
    want = reference.forward(res, res, 0.5, seed=1)
    assert_bits_equal(fwd(res, res), want)


# ---- Device


def fake_cuda(host, device_id=0):
    """A capsule that claims `host`'s memory is on CUDA device `device_id` (the calls pass
    stream=0: without a stream a CUDA array is refused before anything else is checked)."""
    return CtypesDLPack(host, kDLCUDA, device_id)


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="the fake CUDA capsule would be dereferenced on a GPU")
def test_cuda_array_without_cuda():
    host = np.ones((4, 5), F32)
    fake = fake_cuda(host)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, fake, stream=0)
    with pytest.raises(ValueError, match="CUDA"):
        fwd(None, fake, stream=0)
    with pytest.raises(ValueError, match="grad_out"):
        bwd(fake, stream=0)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(fake, fake_cuda(host.copy()), stream=0)
    assert (host == 1).all()


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="the fake CUDA capsule would be dereferenced on a GPU")
def test_device_mismatch():
    sc, res = arrays((4, 5))
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(sc, fake_cuda(res), stream=0)
    with pytest.raises(ValueError, match="shortcut|residual"):
        fwd(fake_cuda(sc), res, stream=0)
    with pytest.raises(ValueError, match="out"):
        fwd(sc, res, out=fake_cuda(np.empty_like(sc)), stream=0)
    with pytest.raises(ValueError, match="out"):
        bwd(res, out=fake_cuda(np.empty_like(sc)), stream=0)


@pytest.mark.skipif(HAS_CUDA_DEVICE, reason="the fake CUDA capsule would be dereferenced on a GPU")
def test_cuda_ordinal_out_of_range():
    host = np.ones((4, 5), F32)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, fake_cuda(host, device_id=7), stream=0)


@pytest.mark.parametrize("device_type", [4, 7, 14], ids=["opencl", "vulkan", "oneapi"])
def test_unsupported_device_types(device_type):
    host = np.ones((4, 5), F32)
    with pytest.raises(ValueError, match="residual"):
        fwd(None, CtypesDLPack(host, device_type=device_type))


def test_cuda_host_pinned_memory_is_cpu_memory():
    """kDLCUDAHost (pinned host memory) is readable by the CPU kernels."""
    rng = np.random.default_rng(27)
    sc, res = random_array(rng, (6, 4), F32), random_array(rng, (6, 4), F32)
    got = fwd(CtypesDLPack(sc.copy(), kDLCUDAHost), CtypesDLPack(res.copy(), kDLCUDAHost))
    assert_bits_equal(np.from_dlpack(got), reference.forward(sc, res, 0.5, seed=1))


def test_numpy_in_numpy_out():
    sc, res = arrays()
    assert type(fwd(sc, res)) is np.ndarray
    assert type(fwd(None, res)) is np.ndarray
    assert type(bwd(res)[1]) is np.ndarray
    assert fwd(sc, res).flags.c_contiguous and fwd(sc, res).flags.writeable
