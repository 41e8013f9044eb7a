"""Smoke tests of `python -m stochdepth.bench`: it runs, prints its tables, writes sane JSON.

The benchmark runs in a subprocess (as a user runs it) on a tiny case with --quick, so these
tests check plumbing, not speed: every expected row is there and every number is positive.
The torch.compile rows take tens of seconds to compile on a cold cache, so they are exercised
by a separate test marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from stochdepth import bench

HAS_TORCH = importlib.util.find_spec("torch") is not None

CPU_OPS = ["fwd", "fwd_out", "fwd_inplace", "infer", "bwd"]
# Rows that must be present on the CPU (the adapter rows are optional: stochdepth.torch).
MUST = {
    "fwd": ["sd", "numpy"],
    "fwd_out": ["sd", "sd_raw", "numpy"],
    "fwd_inplace": ["sd", "numpy"],
    "infer": ["sd", "numpy"],
    "bwd": ["sd", "sd_out", "numpy"],
}
MUST_TORCH = {op: ["sd_torch", "tv", "timm"] for op in CPU_OPS}


def run_bench(tmp_path, *args, timeout=300):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "stochdepth.bench", *args, "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    with open(out_json, encoding="utf-8") as f:
        return json.load(f), proc


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_row(row):
    assert "error" not in row, row
    for key in ("median_ms", "min_ms", "mean_ms", "bytes", "gbps", "pct_copy"):
        assert positive(row[key]), (key, row)
    assert row["min_ms"] <= row["median_ms"]
    assert row["reps"] >= 2
    assert all(positive(v) for v in row["speedup"].values()), row


def check_common(data, device="cpu"):
    assert data["schema"] == 1
    assert data["device"] == device
    machine = data["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1
    assert machine["numpy"]
    assert "cpu_isa" in machine["stochdepth_build_info"]
    assert data["failures"] == []


def test_quick_small_cpu(tmp_path):
    data, proc = run_bench(tmp_path, "--quick", "--cases", "small", "--no-keras", "--no-compile")
    check_common(data)
    assert [c["name"] for c in data["cases"]] == ["small"]
    case = data["cases"][0]
    assert case["shape"] == list(bench.CASES["small"][0]) and case["dtype"] == "float32"
    assert 0.0 < case["kept_fraction"] < 1.0
    assert positive(case["copy_gbps"])
    assert case["copy_ceiling_from"] == "stochdepth _core.stream_copy"
    assert list(case["ops"]) == CPU_OPS
    for op in CPU_OPS:
        rows = {r["impl"]: r for r in case["ops"][op]["rows"]}
        want = MUST[op] + (MUST_TORCH[op] if HAS_TORCH else [])
        assert set(want) <= set(rows), (op, sorted(rows))
        assert "compile" not in rows  # --no-compile
        for row in rows.values():
            check_row(row)
        # The anchor rows compare with themselves at exactly 1x.
        assert rows["numpy"]["speedup"]["numpy"] == pytest.approx(1.0)
        assert case["ops"][op]["bytes"] == pytest.approx(
            bench.op_bytes(op, case["n_elems"], case["tensor_bytes"] // case["n_elems"],
                           case["kept_fraction"]))
    if HAS_TORCH:
        assert data["machine"]["torch_num_threads"] >= 1
    # One table per case on stdout, naming every implementation that ran.
    assert "== small: (16, 33, 40) float32" in proc.stdout
    for label in ("stochdepth", "NumPy expression", "% copy"):
        assert label in proc.stdout


def test_custom_cases_without_torch(tmp_path):
    """Custom AxBxC:dtype cases, float64 and float16, --ops, and the NumPy-only path."""
    data, _ = run_bench(tmp_path, "--quick", "--no-torch", "--ops", "fwd,bwd",
                        "--cases", "3x5:float64,4x7x3:float16")
    check_common(data)
    assert [(c["shape"], c["dtype"]) for c in data["cases"]] == [
        ([3, 5], "float64"), ([4, 7, 3], "float16")]
    for case in data["cases"]:
        assert list(case["ops"]) == ["fwd", "bwd"]
        for op_res in case["ops"].values():
            impls = [r["impl"] for r in op_res["rows"]]
            assert "sd" in impls and "numpy" in impls
            assert not {"sd_torch", "tv", "timm", "compile", "sd_adapter"} & set(impls)
            for row in op_res["rows"]:
                check_row(row)
    assert data["config"]["skipped"]["torch"] == "disabled by --no-torch"


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_quick_small_cpu_with_compile(tmp_path):
    """The torch.compile rows: numbers, or a recorded reason why compiling failed here."""
    data, _ = run_bench(tmp_path, "--quick", "--cases", "small", "--no-keras",
                        "--ops", "fwd,fwd_out,bwd",
                        timeout=900)
    check_common(data)
    for op_res in data["cases"][0]["ops"].values():
        rows = {r["impl"]: r for r in op_res["rows"]}
        assert "compile" in rows
        if "error" in rows["compile"]:
            assert rows["compile"]["error"]
        else:
            check_row(rows["compile"])
            assert positive(rows["compile"]["compile_s"])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_cuda_mode_without_gpu_says_why(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA benchmark belongs to benchmarks/gpu_check.sh")
    proc = subprocess.run([sys.executable, "-m", "stochdepth.bench", "--device", "cuda",
                           "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "torch.cuda.is_available() is False" in proc.stderr


# Runs `--device cuda` with torch.cuda faked over CPU tensors: CUDA events become wall-clock
# stamps, the "GPU" is the CPU (device ordinal -1) and build_info claims a CUDA build. Only the
# plumbing of the CUDA mode is checked (builders, autograd rows, JSON), so that its one run on a
# real GPU does not die of a typo. It relies on stochdepth accepting stream=0 with CPU arrays.
FAKE_CUDA = """
import sys, time, types, torch
import stochdepth, stochdepth.bench as bench

class Event:
    def __init__(self, enable_timing=False):
        self.t = None
    def record(self, stream=None):
        self.t = time.perf_counter_ns()
    def elapsed_time(self, end):
        return (end.t - self.t) / 1e6

props = types.SimpleNamespace(name="fake", major=9, minor=0, multi_processor_count=1,
                              total_memory=2**30)
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_properties = lambda i: props
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.Event = Event
torch.cuda.current_stream = lambda *a, **k: types.SimpleNamespace(cuda_stream=0)
torch.cuda.empty_cache = lambda: None
bench._cuda_device = lambda t: (t.device("cpu"), -1)
info = dict(stochdepth.build_info(), cuda_compiled=True, cuda_device_count=1)
stochdepth.build_info = lambda: info
sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_cuda_mode_plumbing_with_fake_cuda(tmp_path):
    out_json = tmp_path / "cuda.json"
    cmd = [sys.executable, "-c", FAKE_CUDA, "--device", "cuda", "--quick", "--no-compile",
           "--cases", "small,3x5:bfloat16", "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    with open(out_json, encoding="utf-8") as f:
        data = json.load(f)
    check_common(data, device="cuda")
    assert data["machine"]["gpu"]["name"] == "fake"
    for case in data["cases"]:
        assert [c["impl"] for c in case["copy"]] == ["torch .copy_",
                                                     "stochdepth _core.stream_copy_raw"]
        assert list(case["ops"]) == ["fwd", "fwdbwd"]
        for op, want in (("fwd", {"sd_out", "sd_alloc", "sd_raw", "tv", "timm"}),
                         ("fwdbwd", {"sd_out", "sd_alloc", "tv", "timm"})):
            rows = {r["impl"]: r for r in case["ops"][op]["rows"]}
            assert want <= set(rows), (op, sorted(rows))
            for row in rows.values():
                check_row(row)


def test_op_bytes_counts_only_what_moves():
    n, e, k = 1000, 4, 0.75
    assert bench.op_bytes("fwd", n, e, k) == n * e * (2 + k)
    assert bench.op_bytes("fwd_out", n, e, k) == n * e * (2 + k)
    assert bench.op_bytes("fwd_inplace", n, e, k) == n * e * 3 * k
    assert bench.op_bytes("infer", n, e, k) == n * e * 3
    assert bench.op_bytes("bwd", n, e, k) == n * e * (1 + k)
    assert bench.op_bytes("fwdbwd", n, e, k) == n * e * (3 + 2 * k)


def test_unknown_case_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown case 'nope'"):
        bench.parse_case("nope")
    with pytest.raises(SystemExit, match="AxBxC:dtype"):
        bench.parse_case("3x0:float32")
    assert bench.parse_case("2x3:bfloat16")[1:3] == ((2, 3), "bfloat16")
