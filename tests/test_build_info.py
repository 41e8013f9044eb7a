"""We test what we think we test: the installed build is the one this machine should produce.

A build that silently dropped CUDA or a vector ISA would let every CUDA test skip and every
vector test run a slower path, so the expectation is explicit: STOCHDEPTH_EXPECT_CUDA=0|1 (CI
sets it; without it, CUDA when nvcc is on PATH, since STOCHDEPTH_CUDA=AUTO builds it then), and
the active ISA must be the best one this CPU runs according to /proc/cpuinfo, with every ISA
this CPU runs compiled in (STOCHDEPTH_EXPECT_ISA=name overrides that for a deliberately
reduced build).
"""

import os
import pathlib
import re
import shutil

import pytest
from sd_testutil import CPU_ISAS

import stochdepth


def test_tests_run_against_the_installed_package():
    # CI installs with `pip install .`: the package must come from site-packages, not python/.
    # (Developers may use an editable install; CI sets CI=true.)
    source = pathlib.Path(__file__).resolve().parents[1] / "python"
    loaded = pathlib.Path(stochdepth.__file__).resolve()
    if os.environ.get("CI"):
        assert not loaded.is_relative_to(source), loaded
    assert pathlib.Path(stochdepth._core.__file__).name.startswith("_core.")


def expected_cuda_architectures():
    """STOCHDEPTH_EXPECT_CUDA_ARCHS (a build that chose its own list, e.g. gpu_check.sh), else
    the default list, read from its one place: STOCHDEPTH_DEFAULT_CUDA_ARCHITECTURES in
    CMakeLists.txt. As build_info() reports it: comma-separated."""
    expect = os.environ.get("STOCHDEPTH_EXPECT_CUDA_ARCHS")
    if expect:
        return expect.replace(";", ",")
    cmake = (pathlib.Path(__file__).resolve().parents[1] / "CMakeLists.txt").read_text()
    found = re.findall(r'set\(STOCHDEPTH_DEFAULT_CUDA_ARCHITECTURES "([^"]+)"\)', cmake)
    assert len(found) == 1, "CMakeLists.txt must set STOCHDEPTH_DEFAULT_CUDA_ARCHITECTURES once"
    return found[0].replace(";", ",")


def test_cuda_compiled_in_as_expected():
    expect = os.environ.get("STOCHDEPTH_EXPECT_CUDA")
    expected = expect == "1" if expect is not None else shutil.which("nvcc") is not None
    info = stochdepth.build_info()
    assert info["cuda_compiled"] is expected, info
    if expected:
        assert info["cuda_architectures"] == expected_cuda_architectures(), info


def test_cuda_emulator_present_exactly_with_cuda():
    # The CUDA kernels' CI tests (test_cuda_emulated.py) skip without the emulator: a CUDA build
    # that silently lacks it would turn them into a green run that tested nothing. A wheel for
    # users leaves it out (STOCHDEPTH_TEST_MODULES=OFF; tools/test-wheel sets
    # STOCHDEPTH_EXPECT_EMULATOR=0).
    try:
        from stochdepth import _cuda_emulator
    except ImportError:
        _cuda_emulator = None
    info = stochdepth.build_info()
    assert (_cuda_emulator is not None) is info["cuda_emulator"]
    expect = info["cuda_compiled"] and os.environ.get("STOCHDEPTH_EXPECT_EMULATOR") != "0"
    assert info["cuda_emulator"] is expect, info
    if _cuda_emulator is not None:
        assert _cuda_emulator.THREADS == 256


def test_active_isa_is_the_best_this_cpu_runs():
    expected = os.environ.get("STOCHDEPTH_EXPECT_ISA") or CPU_ISAS[0]
    info = stochdepth.build_info()
    assert info["cpu_isa"] == expected, (info, CPU_ISAS)
    assert info["cpu_isas_supported"][0] == expected
    assert "scalar" in info["cpu_isas_compiled"]


def test_every_isa_this_cpu_runs_is_compiled_in():
    if os.environ.get("STOCHDEPTH_EXPECT_ISA"):
        pytest.skip("STOCHDEPTH_EXPECT_ISA names a deliberately reduced build")
    info = stochdepth.build_info()
    missing = [i for i in CPU_ISAS if i not in info["cpu_isas_compiled"]]
    assert not missing, f"this CPU runs {CPU_ISAS} but the build lacks {missing}"
    assert info["cpu_isas_supported"] == CPU_ISAS, info


def _gpu_device_files():
    return sorted(pathlib.Path("/dev").glob("nvidia[0-9]*"))


def test_cuda_device_count_matches_the_machine():
    # On a machine without a GPU (no /dev/nvidiaN) or a build without CUDA the count is 0, not
    # an error; with a GPU visible to a CUDA build it is at least 1.
    info = stochdepth.build_info()
    count = info["cuda_device_count"]
    assert type(count) is int, type(count)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not info["cuda_compiled"] or not _gpu_device_files() or visible in ("", "-1"):
        assert count == 0, info
    elif visible is None:
        assert 1 <= count <= len(_gpu_device_files()), info


def test_no_visible_device_means_zero_devices_not_an_error():
    import subprocess
    import sys

    code = "import stochdepth; print(stochdepth.build_info()['cuda_device_count'])"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "0"


def test_import_does_not_import_frameworks():
    import subprocess
    import sys

    code = ("import sys, stochdepth; "
            "print(sorted(m for m in ('torch','keras','jax','tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_license_ships_with_the_installed_package():
    """The wheel carries LICENSE (Apache-2.0), and the metadata names the same license."""
    from importlib import metadata

    files = [f for f in (metadata.files("stochdepth") or []) if f.name == "LICENSE"]
    assert files, "LICENSE is missing from the installed distribution"
    text = files[0].read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    meta = metadata.metadata("stochdepth")
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or "")
