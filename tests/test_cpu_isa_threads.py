"""CPU path and thread selection: the ISA lists, `set_isa` and STOCHDEPTH_CPU (at import, in a
fresh interpreter), the default ISA, `set_num_threads`, more threads than rows, and that every
supported ISA gives the same bits.
"""

from __future__ import annotations

import numpy as np
import pytest
from sd_testutil import (
    COMPILED_ISAS,
    CPU_ISAS,
    F32,
    SUPPORTED_ISAS,
    assert_bits_equal,
    random_array,
    run_python,
    use_isa,
    use_threads,
)

import stochdepth
from stochdepth import reference

pytestmark = pytest.mark.usefixtures("ieee_overflow_ok")


# ---- ISA selection and threads


def test_isa_lists_are_consistent():
    assert "scalar" in SUPPORTED_ISAS
    assert set(SUPPORTED_ISAS) <= set(COMPILED_ISAS)
    assert stochdepth.get_isa() in SUPPORTED_ISAS


def test_set_isa_roundtrip_and_errors():
    old = stochdepth.get_isa()
    try:
        for name in SUPPORTED_ISAS:
            stochdepth.set_isa(name)
            assert stochdepth.get_isa() == name
            assert stochdepth.build_info()["cpu_isa"] == name
        with pytest.raises(ValueError, match="avx512_bogus"):
            stochdepth.set_isa("avx512_bogus")
        assert stochdepth.get_isa() == SUPPORTED_ISAS[-1]
    finally:
        stochdepth.set_isa(old)


def test_set_isa_rejects_compiled_but_unsupported():
    unsupported = sorted(set(COMPILED_ISAS) - set(SUPPORTED_ISAS))
    if not unsupported:
        pytest.skip("every compiled ISA is supported by this CPU")
    old = stochdepth.get_isa()
    try:
        for name in unsupported:
            with pytest.raises(ValueError, match=name):
                stochdepth.set_isa(name)
            assert stochdepth.get_isa() == old
    finally:
        stochdepth.set_isa(old)


ISA_PROBE = (
    "import stochdepth, sys; "
    "print(stochdepth.get_isa(), stochdepth.build_info()['cpu_isa'])"
)


@pytest.mark.parametrize("name", SUPPORTED_ISAS)
def test_env_forces_isa_at_import(name):
    r = run_python(ISA_PROBE, env={"STOCHDEPTH_CPU": name})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, name]


def test_default_isa_is_the_best_supported():
    r = run_python(ISA_PROBE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [SUPPORTED_ISAS[0]] * 2


def test_supported_isas_are_what_this_cpu_runs():
    """The library's CPUID + XGETBV probe agrees with the kernel's /proc/cpuinfo flags about
    every compiled ISA (an ISA compiled in but missing from the list would never be tested)."""
    assert SUPPORTED_ISAS == [i for i in CPU_ISAS if i in COMPILED_ISAS]


@pytest.mark.parametrize("name", ["sse9000", "AVX3", "cuda"])
def test_env_unknown_isa_raises_at_import(name):
    r = run_python("import stochdepth", env={"STOCHDEPTH_CPU": name})
    assert r.returncode != 0
    assert "ValueError" in r.stderr and name in r.stderr, r.stderr
    assert "Fatal Python error" not in r.stderr


def test_env_unsupported_isa_raises_at_import():
    unsupported = sorted(set(COMPILED_ISAS) - set(SUPPORTED_ISAS))
    if not unsupported:
        pytest.skip("every compiled ISA is supported by this CPU")
    r = run_python("import stochdepth", env={"STOCHDEPTH_CPU": unsupported[0]})
    assert r.returncode != 0
    assert "ValueError" in r.stderr, r.stderr


def test_num_threads_roundtrip_and_errors():
    old = stochdepth.get_num_threads()
    try:
        stochdepth.set_num_threads(1)
        assert stochdepth.get_num_threads() == 1
        assert stochdepth.build_info()["num_threads"] == 1
        stochdepth.set_num_threads(3)
        assert stochdepth.get_num_threads() == 3
        for bad in (0, -1):
            with pytest.raises(ValueError):
                stochdepth.set_num_threads(bad)
        assert stochdepth.get_num_threads() == 3
    finally:
        stochdepth.set_num_threads(old)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_more_threads_than_rows(isa, n):
    """Thread counts above the number of rows or cores, with the threshold at 0."""
    rng = np.random.default_rng(n)
    with use_threads(n, 0):
        for shape, axis in [((1, 1), 0), ((2, 3), 0), ((3, 1, 5), 1), ((5, 1000), 0), ((1, 5), 1)]:
            sc, res = random_array(rng, shape, F32), random_array(rng, shape, F32)
            kw = dict(seed=n, axis=axis, scaling="training")
            assert_bits_equal(stochdepth.forward(sc, res, 0.5, **kw),
                              reference.forward(sc, res, 0.5, **kw), f"{shape} threads={n}")


def test_isas_agree_bitwise(dtype):
    """Every supported ISA gives the same bits as the first one, which equals the reference."""
    if len(SUPPORTED_ISAS) < 2:
        pytest.skip("only one ISA is supported by this CPU")
    rng = np.random.default_rng(5)
    sc, res = random_array(rng, (33, 37), dtype), random_array(rng, (33, 37), dtype)
    outs = {}
    for name in SUPPORTED_ISAS:
        with use_isa(name):
            outs[name] = stochdepth.forward(sc, res, 0.6, seed=9, scaling="training")
    base, *others = SUPPORTED_ISAS
    assert_bits_equal(outs[base], reference.forward(sc, res, 0.6, seed=9, scaling="training"))
    for name in others:
        assert_bits_equal(outs[name], outs[base], f"{name} vs {base}")


# ---- the store policy


def _sysfs_llc_bytes():
    """Size of CPU 0's highest-level cache from sysfs, read here independently; 0 if unknown."""
    import pathlib

    best = (0, 0)
    for d in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((d / "level").read_text())
            size = (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * scale
        best = max(best, (level, value))
    return best[1]


def test_stream_threshold_defaults_to_the_last_level_cache():
    """Non-temporal stores start where the op's bytes outgrow the last-level cache (at least
    4 MiB); build_info reports it, and the knob clamps a negative value to 0."""
    r = run_python("import stochdepth; print(stochdepth.build_info()['stream_threshold_bytes'])")
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == max(4 << 20, _sysfs_llc_bytes())
    core = stochdepth._core
    old = core.get_stream_threshold()
    try:
        core.set_stream_threshold(-5)
        assert core.get_stream_threshold() == 0
        assert stochdepth.build_info()["stream_threshold_bytes"] == 0
    finally:
        core.set_stream_threshold(old)
