"""Reliability of the (seed, offset) words and the rng arguments (issue 25).

1. `seed=` as the words [seed, offset] is recognised by the object's `.shape`, but what is read
   is decided by the array itself or the tensor it exports (rank 1, 2 elements, contiguous,
   aligned, 64-bit integers): a producer that says (2,) and exports fewer words is a ValueError
   naming `seed` before any word is read, never a read past its buffer (a crash when the next
   page is unmapped: that case runs in a subprocess). On every path that takes the words: NumPy
   arrays, DLPack producers and torch tensors, JAX raw keys, and the torch adapter's words
   tensor behind run_raw's pointer.
2. JAX: a seed or offset that is not an integer (a string, None) is an error naming it, not
   jnp.asarray's.
3. The torch custom ops' `rng`: an int64 (or uint64) tensor of shape (2,), checked in eager mode
   and on FakeTensors under torch.compile, with an error naming `rng`.
4. A seeded module's `rng_state` with non-integral values is refused, not truncated.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from sd_malformed import LyingArray, LyingShape, Raw
from sd_testutil import run_python

import stochdepth

HERE = pathlib.Path(__file__).resolve().parent
X = np.ones((8, 3), np.float32)
WORDS_SHAPE = r"seed as an array must be the words \[seed, offset\]: a 1-d array of 2 elements"
U64 = (1, 64, 1)


def _words(*values):
    return np.array(values, np.uint64)


# ---- 1. the words form, decided by what is exported


@pytest.mark.parametrize("fields, shown", [
    ({"shape": [1]}, "(1,)"),
    ({"shape": [0]}, "(0,)"),
    ({"shape": [], "ndim": 0}, "()"),
    ({"shape": [2, 1]}, "(2, 1)"),
    ({"shape": [1, 2]}, "(1, 2)"),
    ({"shape": [3]}, "(3,)"),
], ids=["one-word", "no-word", "0-d", "2x1", "1x2", "three-words"])
@pytest.mark.parametrize("call", ["forward", "backward"])
def test_a_producer_lying_about_its_shape_is_refused(fields, shown, call):
    p = LyingShape(host=_words(5, 7, 9), dtype=U64, **fields)
    with pytest.raises(ValueError, match=WORDS_SHAPE + r", got a DLPack tensor of shape "
                       + shown.replace("(", r"\(").replace(")", r"\)") + "$"):
        if call == "forward":
            stochdepth.forward(X, X, 0.5, seed=p)
        else:
            stochdepth.backward(X, 0.5, seed=p)
    assert p.deletes == p.exports == 1  # the consumed capsule is released once


def test_the_exported_layout_is_checked_too():
    w = _words(5, 7, 9, 11)
    with pytest.raises(ValueError, match=r"seed must be C-contiguous .* with a stride of 2 "
                                         r"elements"):
        stochdepth.forward(X, X, 0.5, seed=LyingShape(host=w, dtype=U64, shape=[2],
                                                         strides=[2]))
    with pytest.raises(ValueError, match="seed must be aligned to its 8-byte items"):
        stochdepth.forward(X, X, 0.5, seed=LyingShape(host=w, dtype=U64, shape=[2],
                                                         byte_offset=4))
    with pytest.raises(TypeError, match="seed as an array must hold two 64-bit integers.*"
                                        "in 2 lanes"):
        stochdepth.forward(X, X, 0.5, seed=LyingShape(host=w, dtype=(1, 64, 2), shape=[2]))
    # The well-formed export reads the words, explicit unit strides included.
    want = stochdepth.forward(X, X, 0.5, seed=5, offset=7)
    for extra in ({}, {"strides": [1]}):
        got = stochdepth.forward(X, X, 0.5, seed=LyingShape(host=w, dtype=U64, shape=[2],
                                                            **extra))
        np.testing.assert_array_equal(np.from_dlpack(got), want)


def test_a_numpy_array_lying_about_its_shape_is_refused():
    for real in (_words(5), _words(5, 7, 9), np.zeros((1, 2), np.uint64)):
        lying = real.view(LyingArray)
        assert lying.shape == (2,)
        with pytest.raises(ValueError, match=WORDS_SHAPE + r", got an array of shape"):
            stochdepth.forward(X, X, 0.5, seed=lying)
    ok = _words(5, 7).view(LyingArray)
    np.testing.assert_array_equal(stochdepth.forward(X, X, 0.5, seed=ok),
                                  stochdepth.forward(X, X, 0.5, seed=5, offset=7))


def test_a_torch_tensor_lying_about_its_shape_is_refused():
    torch = pytest.importorskip("torch")

    class Lying(torch.Tensor):
        @property
        def shape(self):
            return torch.Size([2])

    t = torch.tensor([5], dtype=torch.int64).as_subclass(Lying)
    with pytest.raises(ValueError, match=WORDS_SHAPE + r", got a DLPack tensor of shape \(1,\)"):
        stochdepth.forward(None, torch.from_numpy(X), 0.5, seed=t)


def test_other_shapes_keep_the_integer_path():
    # `.shape` picks the path, as before: not (2,) means the integer path and its TypeError,
    # whatever the producer would export; nothing is exported then.
    class SaysThree(Raw):
        shape = (3,)

    p = SaysThree(host=_words(5, 7), dtype=U64)
    with pytest.raises(TypeError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        stochdepth.forward(X, X, 0.5, seed=p)
    assert p.exports == 0


# The words just before an unmapped page: a read of 16 bytes from a tensor that holds fewer
# runs into it (SIGSEGV). Run in a subprocess, so a crash fails this test, not the suite.
UNMAPPED = r"""
import ctypes, mmap, sys
import numpy as np
sys.path.insert(0, {here!r})
import stochdepth
from sd_malformed import LyingArray, LyingShape

libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * PAGE)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert libc.mprotect(base + PAGE, PAGE, 0) == 0, ctypes.get_errno()
last = np.frombuffer(buf, np.uint64, count=1, offset=PAGE - 8)  # the page's last word
last[0] = 5
x = np.ones((64, 3), np.float32)
cases = {{
    "dlpack-one-word": lambda: LyingShape(host=last, dtype=(1, 64, 1), shape=[1]),
    "dlpack-0-d": lambda: LyingShape(host=last, dtype=(1, 64, 1), shape=[], ndim=0),
    "dlpack-int64-one-word": lambda: LyingShape(host=last, dtype=(0, 64, 1), shape=[1]),
    "numpy-one-word": lambda: last.view(LyingArray),
}}
for name, make in cases.items():
    for call in ("forward", "backward"):
        try:
            if call == "forward":
                stochdepth.forward(x, x, 0.5, seed=make())
            else:
                stochdepth.backward(x, 0.5, seed=make())
            print(name, call, "accepted", flush=True)
        except Exception as e:
            print(name, call, type(e).__name__ + ": " + str(e), flush=True)
print("DONE")
"""


def test_words_before_an_unmapped_page_are_refused_not_read():
    r = run_python(UNMAPPED.format(here=str(HERE)), timeout=120)
    assert r.returncode == 0, f"died (rc={r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}"
    lines = r.stdout.splitlines()
    assert lines[-1] == "DONE"
    assert len(lines) == 9
    for line in lines[:-1]:
        assert "ValueError: seed as an array must be the words [seed, offset]" in line, line


# ---- 1 and 3. the torch adapter: the ops' rng, and the words behind run_raw's pointer

BAD_RNG = [
    ("shape-3", lambda t: t.tensor([1, 2, 3]), "ValueError", "shape (3,)"),
    ("shape-1", lambda t: t.tensor([1]), "ValueError", "shape (1,)"),
    ("0-d", lambda t: t.tensor(1), "ValueError", "shape ()"),
    ("2x1", lambda t: t.tensor([[1], [2]]), "ValueError", "shape (2, 1)"),
    ("float", lambda t: t.tensor([1.0, 2.0]), "TypeError", "dtype torch.float32"),
    ("bool", lambda t: t.tensor([True, False]), "TypeError", "dtype torch.bool"),
    ("int32", lambda t: t.tensor([1, 2], dtype=t.int32), "TypeError", "dtype torch.int32"),
]
RNG_FORM = "rng must be an int64 tensor [seed, offset] of shape (2,), got "


def _op_calls(torch):
    """Each custom op called with `rng`, on CPU tensors."""
    x = torch.ones(8, 3)
    ops = torch.ops.stochdepth
    return {
        "drop_path_fwd": lambda rng: ops.drop_path_fwd(x, x, rng, 0.5, True, False, 0,
                                                       "training", -1),
        "drop_path_bwd": lambda rng: ops.drop_path_bwd(x, rng, 0.5, True, False, 0,
                                                       "training", -1),
        "scatter_kept": lambda rng: ops.scatter_kept(None, x[:4], rng, 0.5, False, "training",
                                                     8),
        "gather_kept": lambda rng: ops.gather_kept(x, rng, 0.5, False, "training", 4),
    }


@pytest.mark.parametrize("case", BAD_RNG, ids=[c[0] for c in BAD_RNG])
@pytest.mark.parametrize("op", ["drop_path_fwd", "drop_path_bwd", "scatter_kept",
                                "gather_kept"])
def test_custom_ops_refuse_a_malformed_rng_eagerly(op, case):
    torch = pytest.importorskip("torch")
    import stochdepth.torch  # noqa: F401 - registers the ops

    _, make, exc, shown = case
    with pytest.raises({"ValueError": ValueError, "TypeError": TypeError}[exc]) as e:
        _op_calls(torch)[op](make(torch))
    assert str(e.value) == RNG_FORM + shown


@pytest.mark.parametrize("case", BAD_RNG, ids=[c[0] for c in BAD_RNG])
def test_custom_ops_refuse_a_malformed_rng_under_compile(case):
    torch = pytest.importorskip("torch")
    import stochdepth.torch  # noqa: F401

    _, make, exc, shown = case
    torch._dynamo.reset()
    x = torch.ones(8, 3)

    def fn(a, rng):
        return torch.ops.stochdepth.drop_path_fwd(a, a, rng, 0.5, True, False, 0, "training",
                                                  -1)

    compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)
    with pytest.raises(Exception) as e:  # noqa: PT011 - dynamo wraps the fake kernel's error
        compiled(x, make(torch))
    assert RNG_FORM + shown in str(e.value)
    # The error is the fake kernel's: found on shapes and dtypes, before anything ran.
    assert f"{exc}('rng must be" in str(e.value)


def test_well_formed_rng_tensors_still_work():
    torch = pytest.importorskip("torch")
    import stochdepth.torch  # noqa: F401

    x = torch.ones(8, 3)
    want = stochdepth.forward(x.numpy(), x.numpy(), 0.5, seed=5, offset=2**64 - 1,
                              scaling="training")
    for rng in (torch.tensor([5, -1]), torch.tensor([5, 2**64 - 1], dtype=torch.uint64),
                torch.tensor([5, 0, -1, 0])[::2]):
        out = torch.ops.stochdepth.drop_path_fwd(x, x, rng, 0.5, True, False, 0, "training", -1)
        np.testing.assert_array_equal(out.numpy(), want)
    assert torch.ops.stochdepth.drop_path_fwd(x, x, None, 0.5, False, False, 0, "training",
                                              -1).shape == x.shape


def test_words_tensor_behind_run_raw_stays_alive_until_the_kernel_is_queued(monkeypatch):
    # The adapter passes a words tensor's address to run_raw, which can check only alignment:
    # the tensor is checked first and its contiguous copy kept alive. Between the copy and the
    # kernel, fresh allocations of the same size must not land on the words.
    torch = pytest.importorskip("torch")
    from stochdepth.torch import _kernels
    from stochdepth.torch._keys import Key

    real = _kernels._core.run_raw
    seen = []

    def run_raw(*args, **kwargs):
        junk = [torch.full((2,), 3, dtype=torch.int64) for _ in range(8)]
        seen.append(kwargs.get("rng_words_ptr", 0))
        real(*args, **kwargs)
        del junk

    monkeypatch.setattr(_kernels._core, "run_raw", run_raw)
    x = torch.ones(64, 3)
    strided = torch.tensor([5, 0, 7, 0])[::2]  # [5, 7], not contiguous: copied for the kernel
    got = _kernels.forward(None, x, Key(words=strided), 0.5, True, False, 0, "training", -1)
    assert seen and seen[0] != 0
    np.testing.assert_array_equal(got.numpy(), stochdepth.forward(None, x.numpy(), 0.5, seed=5,
                                                                 offset=7, scaling="training"))
    with pytest.raises(ValueError, match=r"the words \[seed, offset\] must be an int64 tensor "
                                         r"of shape \(2,\)"):
        _kernels.forward(None, x, Key(words=torch.tensor([5])), 0.5, True, False, 0, "training",
                         -1)


@pytest.mark.cuda
def test_cuda_rng_words_are_checked_before_their_pointer_is_taken():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    import stochdepth.torch  # noqa: F401

    x = torch.ones(64, 3, device="cuda")
    op = torch.ops.stochdepth.drop_path_fwd
    for bad, exc in ((torch.tensor([5], device="cuda"), ValueError),
                     (torch.tensor([5.0, 7.0], device="cuda"), TypeError)):
        with pytest.raises(exc, match=r"rng must be an int64 tensor \[seed, offset\]"):
            op(x, x, bad, 0.5, True, False, 0, "training", -1)
    want = op(x, x, torch.tensor([5, 7], device="cuda"), 0.5, True, False, 0, "training", -1)
    strided = torch.tensor([5, 0, 7, 0], device="cuda")[::2]
    torch.testing.assert_close(op(x, x, strided, 0.5, True, False, 0, "training", -1), want,
                               rtol=0, atol=0)


# ---- 4. a seeded module's rng_state


@pytest.mark.parametrize("values", [[1.5, 2.0], [1.0, 2.25], [float("nan"), 0.0],
                                    [float("inf"), 0.0]], ids=["1.5", "2.25", "nan", "inf"])
def test_rng_state_with_non_integral_values_is_refused(values):
    torch = pytest.importorskip("torch")
    import stochdepth.torch as sdt

    m = sdt.StochasticDepth(0.5, seed=3)
    with pytest.raises(RuntimeError, match=r"rng_state: expected 2 int64 words \[seed, offset\], "
                                           r"got non-integral values"):
        m.load_state_dict({"rng_state": torch.tensor(values, dtype=torch.float64)})
    assert (m.seed, m.offset) == (3, 0)  # left as it was


def test_rng_state_with_integral_values_still_loads():
    torch = pytest.importorskip("torch")
    import stochdepth.torch as sdt

    m = sdt.StochasticDepth(0.5, seed=3)
    m.load_state_dict({"rng_state": torch.tensor([1.0, 2.0])})
    assert (m.seed, m.offset) == (1, 2)
    m.load_state_dict({"rng_state": torch.tensor([-1, 4])})
    assert (m.seed, m.offset) == (2**64 - 1, 4)
    with pytest.raises(RuntimeError, match=r"rng_state: expected 2 int64 words \[seed, offset\]"):
        m.load_state_dict({"rng_state": torch.tensor([1, 2, 3])})


# ---- 1 and 2. JAX: keys decided by the array itself; non-integer seeds and offsets


JAX_CASES = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import stochdepth.jax as sdj

class LyingKey:
    # says uint32 (2,), holds one word: JAX would clamp data[1] to data[0]
    dtype = np.dtype(np.uint32)
    shape = (2,)
    def __array__(self, dtype=None, copy=None):
        return np.array([7], np.uint32)
    def astype(self, dtype):
        return jnp.asarray(np.array([7], np.uint32)).astype(dtype)
    def __getitem__(self, i):
        return jnp.asarray(np.array([7], np.uint32))[i]

class Unreadable:
    dtype = np.dtype(np.uint32)
    shape = (2,)

x = np.ones((8, 3), np.float32)
cases = {
    "seed-str": dict(seed="1"),
    "offset-str": dict(seed=1, offset="2"),
    "offset-none": dict(seed=1, offset=None),
    "seed-list-of-str": dict(seed=["a"]),
    "seed-object-array": dict(seed=np.array("a")),
    "seed-float": dict(seed=1.5),
    "seed-lying-key": dict(seed=LyingKey()),
    "seed-unreadable-key": dict(seed=Unreadable()),
    "seed-key-int32": dict(seed=np.array([1, 2], np.int32)),
    "seed-key-2x2": dict(seed=jax.random.split(jax.random.PRNGKey(0))),
    "ok-raw-key": dict(seed=np.array([0, 5], np.uint32), offset=3),
    "ok-ints": dict(seed=5, offset=3),
}
for name, kw in cases.items():
    try:
        out = sdj.drop_path(x, 0.5, **kw)
        got = "ok " + json.dumps(np.asarray(out)[:, 0].tolist())
    except Exception as e:
        got = type(e).__name__ + ": " + str(e)
    print(json.dumps([name, got]), flush=True)
"""


def test_jax_seed_and_offset_errors_name_the_argument():
    pytest.importorskip("jax")
    r = run_python(JAX_CASES, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = dict(json.loads(line) for line in r.stdout.splitlines() if line.startswith("["))
    expected = {
        "seed-str": "TypeError: seed must be an integer or an integer scalar array, got str",
        "offset-str": "TypeError: offset must be an integer or an integer scalar array, got str",
        "offset-none": "TypeError: offset must be an integer or an integer scalar array, got "
                       "NoneType",
        "seed-list-of-str": "TypeError: seed must be an integer or an integer scalar array, got "
                            "list",
        "seed-object-array": "TypeError: seed must be an integer or an integer scalar array, "
                             "got ndarray that JAX cannot read",
        "seed-float": "TypeError: seed must be an integer or an integer scalar array, got float",
        "seed-lying-key": "ValueError: a PRNG key used as seed must be a single key with 2 "
                          "uint32 words (threefry), got key data of shape (1,) and dtype uint32",
        "seed-unreadable-key": "TypeError: seed must be an integer or a JAX PRNG key, got "
                               "Unreadable that JAX cannot read as an array",
        "seed-key-int32": "TypeError: seed must be an integer or an integer scalar array, got "
                          "int32[2]",
        "seed-key-2x2": "TypeError: seed must be an integer or an integer scalar array, got "
                        "uint32[2, 2]",
    }
    for name, want in expected.items():
        assert got[name].startswith(want), (name, got[name])
    want = stochdepth.forward(None, np.ones((8, 3), np.float32), 0.5, seed=5, offset=3)
    assert got["ok-raw-key"] == got["ok-ints"] == "ok " + json.dumps(want[:, 0].tolist())
