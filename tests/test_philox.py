"""Philox4x32-10 and the mask stream: known answers from Random123, C++ (every ISA) vs the NumPy
reference on random counters and keys, and stochdepth.mask vs the formula of
docs/design.md, "The mask stream"."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from sd_testutil import SUPPORTED_ISAS, use_isa

import stochdepth
from stochdepth import reference

KAT_FILE = pathlib.Path(__file__).parent / "data" / "philox4x32_10_kat.txt"


def load_kats():
    kats = []
    for line in KAT_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, rounds, *words = line.split()
        assert (name, rounds) == ("philox4x32", "10"), line
        words = [int(w, 16) for w in words]
        assert len(words) == 10, line
        kats.append((tuple(words[0:4]), tuple(words[4:6]), tuple(words[6:10])))
    return kats


KATS = load_kats()


def test_kat_file_has_the_three_design_vectors():
    assert len(KATS) == 3
    assert KATS[0] == ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8))


@pytest.mark.parametrize("counter, key, expected", KATS, ids=["zeros", "ones", "pi"])
def test_kat_reference(counter, key, expected):
    got = reference.philox4x32_10(np.array(counter, np.uint32), np.array(key, np.uint32))
    assert tuple(int(x) for x in got) == expected


@pytest.mark.parametrize("isa_name", SUPPORTED_ISAS)
@pytest.mark.parametrize("counter, key, expected", KATS, ids=["zeros", "ones", "pi"])
def test_kat_core(isa_name, counter, key, expected):
    got = stochdepth._core.philox4x32_10(counter, key, isa_name)
    assert tuple(got) == expected


def test_core_philox_unknown_isa_raises():
    with pytest.raises(ValueError, match="isa|ISA"):
        stochdepth._core.philox4x32_10((0, 0, 0, 0), (0, 0), "sse9000")


@pytest.mark.parametrize("isa_name", SUPPORTED_ISAS)
def test_core_philox_matches_reference_on_random_inputs(isa_name):
    rng = np.random.default_rng(123)
    n = 3000
    counters = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint64).astype(np.uint32)
    keys = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    # Edge words: all-zero and all-one words mixed in.
    counters[:50] = rng.choice(np.array([0, 1, 0xFFFFFFFF, 0x80000000], np.uint32), (50, 4))
    keys[:50] = rng.choice(np.array([0, 1, 0xFFFFFFFF, 0x80000000], np.uint32), (50, 2))
    want = reference.philox4x32_10(counters, keys)
    f = stochdepth._core.philox4x32_10
    got = np.array(
        [f(tuple(map(int, c)), tuple(map(int, k)), isa_name) for c, k in zip(counters, keys)],
        dtype=np.uint32,
    )
    mismatch = np.flatnonzero((got != want).any(axis=1))
    assert mismatch.size == 0, (
        f"{mismatch.size} of {n} blocks differ on {isa_name}; first: counter "
        f"{counters[mismatch[0]]} key {keys[mismatch[0]]} got {got[mismatch[0]]} "
        f"want {want[mismatch[0]]}"
    )


def test_isas_agree_with_each_other():
    rng = np.random.default_rng(7)
    for _ in range(200):
        c = tuple(int(x) for x in rng.integers(0, 2**32, 4, dtype=np.uint64))
        k = tuple(int(x) for x in rng.integers(0, 2**32, 2, dtype=np.uint64))
        outs = {name: tuple(stochdepth._core.philox4x32_10(c, k, name)) for name in SUPPORTED_ISAS}
        assert len(set(outs.values())) == 1, (c, k, outs)


# ---- the mask stream (the formula of docs/design.md, written out independently of reference.mask)


def design_mask(batch, p, seed, offset, mode):
    """keep[b] spelled out from docs/design.md with Python ints and one Philox call per sample."""
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)
    t = int(np.floor(np.float64(p) * 2.0**32))
    keep = []
    for b in range(batch):
        idx = b if mode == "row" else 0
        q = idx >> 2
        counter = np.array(
            [q & 0xFFFFFFFF, q >> 32, offset & 0xFFFFFFFF, offset >> 32], np.uint32
        )
        x = int(reference.philox4x32_10(counter, key)[idx & 3])
        keep.append(x < t)
    return np.array(keep, dtype=bool)


SEEDS = [0, 1, 0xFFFFFFFF, 2**32, 2**32 + 5, 0x0123456789ABCDEF, 2**64 - 1]
OFFSETS = [0, 1, 7, 2**31, 2**32, 2**32 + 3, 2**64 - 1]


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_reference_mask_matches_design_formula(mode):
    for seed, offset in zip(SEEDS, OFFSETS):
        for p in (0.0, 0.3, 0.5, 0.9, 1.0):
            want = design_mask(37, p, seed, offset, mode)
            got = reference.mask(37, p, seed=seed, offset=offset, mode=mode)
            np.testing.assert_array_equal(got, want, err_msg=f"seed={seed} offset={offset} p={p}")


@pytest.mark.parametrize("isa_name", SUPPORTED_ISAS)
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_mask_matches_reference(isa_name, mode):
    with use_isa(isa_name):
        for seed in SEEDS:
            for offset in OFFSETS:
                for p in (0.0, 0.25, 0.999, 1.0):
                    # The mask of a smaller batch is a prefix of the mask of a larger one.
                    full = reference.mask(257, p, seed=seed, offset=offset, mode=mode)
                    for batch in (0, 1, 3, 4, 5, 8, 9, 33, 257):
                        got = stochdepth.mask(batch, p, seed=seed, offset=offset, mode=mode)
                        assert isinstance(got, np.ndarray)
                        assert got.dtype == np.bool_ and got.shape == (batch,)
                        np.testing.assert_array_equal(
                            got, full[:batch],
                            err_msg=f"seed={seed} offset={offset} batch={batch} p={p}",
                        )


def test_mask_defaults_are_offset_0_row_mode():
    np.testing.assert_array_equal(
        stochdepth.mask(100, 0.5, seed=42), reference.mask(100, 0.5, seed=42, offset=0, mode="row")
    )


def test_high_words_of_seed_and_offset_matter():
    base = stochdepth.mask(256, 0.5, seed=5, offset=9)
    assert not np.array_equal(base, stochdepth.mask(256, 0.5, seed=5 + 2**32, offset=9))
    assert not np.array_equal(base, stochdepth.mask(256, 0.5, seed=5, offset=9 + 2**32))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_threshold_boundary_is_exact(mode):
    """keep iff draw < floor(p * 2**32): p = x / 2**32 drops a sample whose draw is x, and
    p = (x + 1) / 2**32 keeps it (both p are exact in float64)."""
    seed, offset = 0xDEADBEEF12345678, 99
    draws = reference.mask_draws(16, seed=seed, offset=offset, mode=mode)
    for b in (0, 5, 15):
        x = int(draws[b])
        below = stochdepth.mask(16, x / 2**32, seed=seed, offset=offset, mode=mode)
        above = stochdepth.mask(16, (x + 1) / 2**32, seed=seed, offset=offset, mode=mode)
        assert not below[b] and above[b], (b, hex(x))
        np.testing.assert_array_equal(below, draws < x)
        np.testing.assert_array_equal(above, draws < x + 1)
