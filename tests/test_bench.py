"""Tests of `python -m stochdepth.bench`: it runs, and its method holds.

Smoke runs (a subprocess, as a user runs it, tiny cases with --quick) check the plumbing: every
expected row, every number positive, the JSON and the plot written. The method is checked on
what the JSON records and on the pure functions: the ceiling is timed in the same rounds as the
rows (the round order), it is the best of its implementations in the op's read/write mix, tiny
cases are flagged as fitting in cache, and an anchor that does not import is labelled
"(formula)". The torch.compile rows take tens of seconds to compile cold: a test marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import stochdepth.bench as bench
from stochdepth.bench import ceiling, machine, report, timing
from stochdepth.bench.cases import PRIMITIVE_TENSORS, ceiling_models

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_PLOTLY = importlib.util.find_spec("plotly") is not None

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

# A stand-in for an installed timm whose `timm.layers` cannot import (as timm >= 1.0 without
# torchvision): the bench must then load timm/layers/drop.py by path. Its drop_path adds 1, so
# that a test can tell it from the formula.
FAKE_TIMM = {
    "timm/__init__.py": "raise ImportError('this timm needs torchvision')\n",
    "timm/layers/__init__.py": "from .drop import drop_path\n",
    "timm/layers/drop.py": ("def drop_path(x, drop_prob=0.0, training=False, scale_by_keep=True):\n"
                            "    return x + 1.0\n"),
}


def fake_timm(root, importable=False):
    for rel, text in FAKE_TIMM.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("" if importable and rel == "timm/__init__.py" else text)
    return root


def env_with(**extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("STOCHDEPTH_BENCH_NO_TIMM", "STOCHDEPTH_BENCH_NO_TORCHVISION",
              "THP_MEM_ALLOC_ENABLE"):
        env.pop(k, None)
    for k, v in extra.items():
        if k == "PYTHONPATH":
            v = os.pathsep.join([v] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        env[k] = v
    return env


def run_bench(tmp_path, *args, timeout=300, env=None):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "stochdepth.bench", *args, "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                          env=env or env_with())
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    with open(out_json, encoding="utf-8") as f:
        return json.load(f), proc


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_row(row, rounds):
    assert "error" not in row, row
    for key in ("median_ms", "min_ms", "mean_ms", "bytes", "gbps", "pct_ceiling"):
        assert positive(row[key]), (key, row)
    assert row["min_ms"] <= row["median_ms"]
    assert row["reps"] >= 2 and len(row["round_calls_ns"]) == rounds == row["rounds"]
    assert all(positive(t) for r in row["round_calls_ns"] for t in r)
    assert row["over_ceiling"] == (row["pct_ceiling"] > 100.0)
    assert all(positive(v) for v in row["speedup"].values()), row


def check_method(op, op_res, rounds, kept, tensor_bytes):
    """The ceiling was timed in every round before the rows (the rows rotated by one place per
    round), and is the least time over the op's models of the best median of each primitive's
    implementations."""
    order = op_res["round_order"]
    assert len(order) == rounds >= 2
    ceilings = [k for k in order[0] if k.startswith("ceiling:")]
    rows = [k for k in order[0] if k.startswith("row:")]
    assert ceilings and rows
    for r, keys in enumerate(order):  # each round: all ceiling primitives, then all rows
        shift = r % len(rows)
        assert keys == ceilings + rows[shift:] + rows[:shift]
    c = op_res["ceiling"]
    for prim, p in c["primitives"].items():
        ok = {label: s["median_ms"] for label, s in p["impls"].items() if "error" not in s}
        assert p["best"] == min(ok, key=ok.get) and p["ms"] == min(ok.values())
        assert p["gbps"] == pytest.approx(PRIMITIVE_TENSORS[prim] * tensor_bytes / p["ms"] / 1e6)
        for s in p["impls"].values():
            assert len(s["round_calls_ns"]) == rounds
    times = [sum(n * c["primitives"][q]["ms"] for q, n in mix.items())
             for _, mix in ceiling_models(op, kept) if all(q in c["primitives"] for q in mix)]
    assert c["ms"] == pytest.approx(min(times)) and c["gbps"] == pytest.approx(
        op_res["bytes"] / c["ms"] / 1e6)
    for row in op_res["rows"]:
        assert row["pct_ceiling"] == pytest.approx(100.0 * c["ms"] / row["median_ms"])


def check_common(data, device="cpu"):
    assert data["schema"] == 2
    assert data["device"] == device
    m = data["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1 and m["numpy"] and m["date_utc"]
    assert "cpu_isa" in m["stochdepth_build_info"]
    assert data["failures"] == []


@pytest.mark.skipif(not HAS_TORCH or not HAS_PLOTLY, reason="needs torch and plotly")
def test_quick_small_cpu(tmp_path):
    # timm "installed" but its timm.layers broken; torchvision forced to the formula.
    env = env_with(PYTHONPATH=str(fake_timm(tmp_path / "site")),
                   STOCHDEPTH_BENCH_NO_TORCHVISION="1")
    plot = tmp_path / "plot.html"
    data, proc = run_bench(tmp_path, "--quick", "--cases", "small", "--no-keras", "--no-compile",
                           "--plot", str(plot), env=env)
    check_common(data)
    rounds = data["config"]["timing"]["rounds"]
    assert [c["name"] for c in data["cases"]] == ["small"]
    case = data["cases"][0]
    assert case["shape"] == list(bench.CASES["small"][0]) and case["dtype"] == "float32"
    assert 0.0 < case["kept_fraction"] < 1.0
    assert list(case["ops"]) == CPU_OPS
    llc = data["machine"]["llc"]["bytes"]
    assert case["fits_in_cache"] == bool(llc)  # 100 KB per tensor: in any last-level cache
    anchors = data["config"]["anchors"]
    assert anchors["timm"]["real"] and "loaded by path" in anchors["timm"]["source"]
    assert not anchors["torchvision"]["real"]
    assert "STOCHDEPTH_BENCH_NO_TORCHVISION" in anchors["torchvision"]["source"]
    for op in CPU_OPS:
        op_res = case["ops"][op]
        rows = {r["impl"]: r for r in op_res["rows"]}
        assert set(MUST[op] + MUST_TORCH[op]) <= set(rows), (op, sorted(rows))
        assert "compile" not in rows  # --no-compile
        for row in rows.values():
            check_row(row, rounds)
        check_method(op, op_res, rounds, case["kept_fraction"], case["tensor_bytes"])
        assert op_res["fits_in_cache"] == bool(llc) and op_res["working_set_bytes"] > 0
        assert rows["tv"]["label"].endswith("(formula)")
        assert rows["timm"]["label"] == "timm drop_path, eager"
        assert rows["numpy"]["speedup"]["numpy"] == pytest.approx(1.0)
        assert op_res["bytes"] == pytest.approx(
            bench.op_bytes(op, case["n_elems"], case["tensor_bytes"] // case["n_elems"],
                           case["kept_fraction"]))
    # Backward is judged with a write-only fill among its primitives, its forward with an add.
    assert {"copy", "fill"} <= set(case["ops"]["bwd"]["ceiling"]["primitives"])
    assert {"copy", "add"} <= set(case["ops"]["fwd"]["ceiling"]["primitives"])
    assert data["machine"]["torch_num_threads"] >= 1
    # torch's allocator gets huge pages (the anchors' best configuration), and the run says so.
    assert data["config"]["torch_huge_pages"].startswith("THP_MEM_ALLOC_ENABLE=1 (set by")
    assert "CPU allocator: THP_MEM_ALLOC_ENABLE=1" in proc.stdout
    out = proc.stdout
    assert "== small: (16, 33, 40) float32" in out and "% ceiling" in out
    assert "torchvision stochastic_depth, eager (formula)" in out
    assert f"LLC {data['machine']['llc']['text']}" in out and "FITS IN CACHE" in out
    assert plot.stat().st_size > 0 and "% of ceiling" in plot.read_text(encoding="utf-8")


def test_custom_cases_without_torch(tmp_path):
    """Custom AxBxC:dtype cases, float64 and float16, --ops, and the NumPy-only path."""
    data, _ = run_bench(tmp_path, "--quick", "--no-torch", "--ops", "fwd,bwd", "--rounds", "2",
                        "--cases", "3x5:float64,4x7x3:float16")
    check_common(data)
    assert [(c["shape"], c["dtype"]) for c in data["cases"]] == [
        ([3, 5], "float64"), ([4, 7, 3], "float16")]
    for case in data["cases"]:
        assert list(case["ops"]) == ["fwd", "bwd"]
        for op, op_res in case["ops"].items():
            impls = [r["impl"] for r in op_res["rows"]]
            assert "sd" in impls and "numpy" in impls
            assert not {"sd_torch", "tv", "timm", "compile", "sd_adapter"} & set(impls)
            for row in op_res["rows"]:
                check_row(row, 2)
            check_method(op, op_res, 2, case["kept_fraction"], case["tensor_bytes"])
    # NumPy's software float16 add is left out of the ceilings; the library's streaming add and
    # copy are in (as torch's would be).
    prims16 = data["cases"][1]["ops"]["fwd"]["ceiling"]["primitives"]
    assert list(prims16["add"]["impls"]) == [ceiling.SD_ADD]
    assert list(prims16["copy"]["impls"]) == ["stochdepth _core.stream_copy",
                                              "np.copyto (1 thread)"]
    assert data["config"]["skipped"]["torch"] == "disabled by --no-torch"


def test_compare_isas_rows(tmp_path):
    """By default the library's main row of each op also runs on every other vector ISA this
    CPU supports ("sd@isa"), labelled with its ISA, in the same rounds; --compare-isas none and
    an explicit list choose them; an unsupported name is refused."""
    import stochdepth

    others = [i for i in stochdepth.build_info()["cpu_isas_supported"]
              if i not in ("scalar", stochdepth.get_isa())]
    for args, want in ((), others), (("--compare-isas", "none"), []), (
            ("--compare-isas", "scalar"), ["scalar"]):
        data, _ = run_bench(tmp_path, "--quick", "--no-torch", "--ops", "fwd,bwd", "--rounds", "2",
                            "--cases", "4x7x3:bfloat16", *args)
        for op_res in data["cases"][0]["ops"].values():
            rows = {r["impl"]: r for r in op_res["rows"]}
            assert [k for k in rows if "@" in k] == [f"sd@{i}" for i in want]
            for i in want:
                assert rows[f"sd@{i}"]["label"] == f"stochdepth [{i}]"
                check_row(rows[f"sd@{i}"], 2)
            assert rows["sd"]["label"] == (
                f"stochdepth [{stochdepth.get_isa()}]" if want else "stochdepth")
    r = subprocess.run([sys.executable, "-m", "stochdepth.bench", "--quick", "--no-torch",
                        "--compare-isas", "sse9000"], capture_output=True, text=True)
    assert r.returncode != 0 and "sse9000" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_quick_small_cpu_with_compile(tmp_path):
    """The torch.compile rows: numbers, or a recorded reason why compiling failed here."""
    data, _ = run_bench(tmp_path, "--quick", "--cases", "small", "--no-keras",
                        "--ops", "fwd,fwd_out,bwd", timeout=900)
    check_common(data)
    for op_res in data["cases"][0]["ops"].values():
        rows = {r["impl"]: r for r in op_res["rows"]}
        assert "compile" in rows
        if "error" in rows["compile"]:
            assert rows["compile"]["error"]
        else:
            check_row(rows["compile"], 3)
            assert positive(rows["compile"]["compile_s"])


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_anchor_loading(tmp_path):
    """timm.layers when it imports, else timm's drop.py by path, else (or when told) the formula."""
    code = ("import torch\nfrom stochdepth.bench.anchors import load_anchors\n"
            "a = load_anchors(torch)['timm']\n"
            "print(a.real, a.label('L'), a.fn(torch.ones(64, 2), 0.5, True).unique().tolist(), "
            "a.source, sep='|')\n")

    def load(**env):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=120, env=env_with(**env))
        assert proc.returncode == 0, proc.stderr
        real, label, values, source = proc.stdout.strip().splitlines()[-1].split("|")
        return real == "True", label, json.loads(values), source

    broken = str(fake_timm(tmp_path / "broken"))
    assert load(PYTHONPATH=broken)[:3] == (True, "L", [2.0])
    assert "timm/layers/drop.py loaded by path" in load(PYTHONPATH=broken)[3]
    good = str(fake_timm(tmp_path / "good", importable=True))
    real, _, values, source = load(PYTHONPATH=good)
    assert real and values == [2.0] and source.endswith("timm.layers.drop_path")
    # Told not to use it: the formula (values 0 or 1/(1 - drop)), and the label says so.
    real, label, values, source = load(PYTHONPATH=good, STOCHDEPTH_BENCH_NO_TIMM="1")
    assert not real and label == "L (formula)" and set(values) <= {0.0, 2.0}
    assert "STOCHDEPTH_BENCH_NO_TIMM" in source


# `--device cuda` with torch.cuda faked over CPU tensors: the plumbing of the CUDA mode only.
FAKE_CUDA = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fake_cuda.py"


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_cuda_mode_plumbing_with_fake_cuda(tmp_path):
    out_json = tmp_path / "cuda.json"
    cmd = [sys.executable, str(FAKE_CUDA), "--device", "cuda", "--quick", "--no-compile",
           "--cases", "small,3x5:bfloat16", "--json", str(out_json)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env_with())
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    with open(out_json, encoding="utf-8") as f:
        data = json.load(f)
    check_common(data, device="cuda")
    assert data["machine"]["gpu"]["name"] == "dry run (CPU)"
    for case in data["cases"]:
        assert case["llc"]["bytes"] == 2**20 and case["fits_in_cache"]  # the GPU's L2
        assert list(case["ops"]) == ["fwd", "fwdbwd"]
        for op, want in (("fwd", {"sd_out", "sd_alloc", "sd_raw", "tv", "timm"}),
                         ("fwdbwd", {"sd_out", "sd_alloc", "tv", "timm"})):
            op_res = case["ops"][op]
            rows = {r["impl"]: r for r in op_res["rows"]}
            assert want <= set(rows), (op, sorted(rows))
            for row in rows.values():
                check_row(row, 3)
            check_method(op, op_res, 3, case["kept_fraction"], case["tensor_bytes"])
            prims = op_res["ceiling"]["primitives"]
            assert list(prims["copy"]["impls"]) == ["torch .copy_",
                                                    "stochdepth _core.stream_copy_raw"]
            assert list(prims["add"]["impls"]) == ["torch.add(out=)", ceiling.SD_ADD]
        assert "fill" in case["ops"]["fwdbwd"]["ceiling"]["primitives"]


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_cuda_mode_without_gpu_says_why(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA benchmark belongs to benchmarks/gpu_check.sh")
    proc = subprocess.run([sys.executable, "-m", "stochdepth.bench", "--device", "cuda",
                           "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "torch.cuda.is_available() is False" in proc.stderr


def test_interleave_times_every_entry_in_every_round():
    log = []

    class Timer:
        def warm(self, entry, plan):
            return 1e6

        def burst(self, entry, n):
            log.append(entry.key)
            if entry.key == "r2" and log.count("r2") == 2:
                raise RuntimeError("broke in round 2")
            return [1000 + len(log)] * n

    entries = [timing.Entry(k, None) for k in ("c1", "c2", "r1", "r2")]
    plan = timing.TimingPlan(rounds=3, burst_time_s=0.0025, max_burst=10, warmup=1)
    order, records = timing.interleave(entries, plan, Timer())
    assert log == ["c1", "c2", "r1", "r2"] * 2 + ["c1", "c2", "r1"]
    assert order == [["c1", "c2", "r1", "r2"], ["c1", "c2", "r1"], ["c1", "c2", "r1"]]
    # With the ceilings fixed, the rows rotate by one place per round.
    log.clear()
    entries = [timing.Entry(k, None) for k in ("c1", "c2", "r1", "r3", "r4")]
    order, _ = timing.interleave(entries, plan, Timer(), rotate_from=2)
    assert order == [["c1", "c2", "r1", "r3", "r4"], ["c1", "c2", "r3", "r4", "r1"],
                     ["c1", "c2", "r4", "r1", "r3"]]
    assert records["r2"] == {"error": "RuntimeError: broke in round 2"}
    assert records["c1"]["calls_per_burst"] == 3  # 2.5 ms of 1 ms calls
    s = timing.summarize(records["r1"], 1e6)
    assert s["round_median_ms"] == [0.001003, 0.001007, 0.001011] and s["median_ms"] == 0.001007
    assert s["reps"] == 9 and s["gbps"] == pytest.approx(1e6 / 0.001007e-3 / 1e9)


def test_op_ceiling_is_the_best_implementation_in_the_ops_mix():
    t = 1e6  # bytes per tensor; a primitive at 1 ms per tensor moved = 1 GB/s per tensor
    s = lambda ms: {"median_ms": ms}  # noqa: E731
    summaries = {"ceiling:copy:a": s(2.0), "ceiling:copy:b": s(1.0), "ceiling:copy:c":
                 {"error": "x"}, "ceiling:fill:a": s(0.25), "ceiling:fill:b": s(0.5)}
    k = 0.75
    nbytes = bench.op_bytes("bwd", 1e6, 1, k)
    c = ceiling.op_ceiling("bwd", k, t, nbytes, summaries)
    assert c["primitives"]["copy"]["best"] == "b" and c["primitives"]["copy"]["ms"] == 1.0
    assert c["primitives"]["fill"]["best"] == "a" and c["primitives"]["copy"]["gbps"] == 2.0
    # copy rate: (1 + k) / 2 copies = 0.875 ms; the op's mix: k copies + (1 - k) fills = 0.8125
    assert c["model"] == "copy on kept rows, fill on dropped"
    assert c["ms"] == pytest.approx(0.8125) and c["gbps"] == pytest.approx(nbytes / 0.8125e6)
    # With only copies measured, the copy-rate model stands alone; the other says what it lacks.
    only_copy = {k2: v for k2, v in summaries.items() if ":copy:" in k2}
    c = ceiling.op_ceiling("bwd", k, t, nbytes, only_copy)
    assert c["model"] == "copy rate" and c["ms"] == pytest.approx(0.875)
    assert [m.get("missing") for m in c["models"]] == [None, ["fill"]]


@pytest.mark.parametrize("op", ["fwd", "fwd_out", "fwd_inplace", "infer", "bwd", "fwdbwd"])
@pytest.mark.parametrize("k", [0.0, 0.3, 0.8, 1.0])
def test_ceiling_models_move_exactly_the_ops_bytes(op, k):
    models = ceiling_models(op, k)
    assert models[0][0] == "copy rate" and len(models) == 2
    for _, mix in models:
        moved = sum(calls * PRIMITIVE_TENSORS[p] for p, calls in mix.items())
        assert moved == pytest.approx(bench.op_bytes(op, 1, 1, k))


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


def test_default_cases_grow_past_twice_the_llc():
    mib = 2**20
    assert bench.parse_case("big-f32", 32 * mib, 0.8)[1] == (256, 197, 768)  # already past
    _, shape, dtype, what = bench.parse_case("big-f32", 300 * mib, 0.8, 64 * 2**30)
    assert shape[0] % 64 == 0 and shape[0] > 256 and "grown to" in what
    tensor = math.prod(shape) * 4
    assert min(bench.op_bytes(op, 1, tensor, 0.8) for op in bench.OPS["cpu"]) > 600 * mib
    assert bench.op_bytes("bwd", 1, tensor * (shape[0] - 64) / shape[0], 0.8) < 600 * mib
    # Memory caps the growth (a tensor at most a sixteenth of what is available).
    assert bench.parse_case("big-bf16", 300 * mib, 0.8, 2 * 2**30)[1][0] == 512
    capped = bench.parse_case("big-bf16", 300 * mib, 0.8, 16 * 640 * 197 * 768 * 2)[1]
    assert capped[0] == 640 and bench.parse_case("big-bf16", 300 * mib, 0.8)[1][0] > 640


def test_llc_and_sizes_are_read():
    assert machine._size_bytes("32768K") == 32 * 2**20
    assert machine._size_bytes("1M") == 2**20 and machine._size_bytes("4096") == 4096
    llc = machine.last_level_cache()
    sources = [s for s in (llc["sysfs_bytes"], llc["lscpu_bytes"]) if s]
    assert llc["bytes"] == (max(sources) if sources else None)


def test_json_keeps_every_value_and_puts_number_lists_on_one_line(tmp_path):
    data = {"a": [[1, 2, 3], [4]], "b": [1.5, -2e-07], "s": ["x, \"y\"", "z\n,w"], "e": [],
            "d": {"n": None, "deep": [{"k": [0]}]}}
    path = tmp_path / "r.json"
    report.write_json(str(path), data)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == data
    assert '"a": [[1, 2, 3], [4]]' in text and '"b": [1.5, -2e-07]' in text


@pytest.mark.skipif(not HAS_PLOTLY, reason="needs plotly")
def test_plot_from_saved_results(tmp_path):
    from stochdepth.bench import plot

    row = {"label": "stochdepth", "pct_ceiling": 93.0, "median_ms": 1.0, "gbps": 30.0}
    results = {"device": "cpu", "machine": {"cpu_model": "m", "llc": {"text": "L3"}},
               "cases": [{"name": "c", "shape": [2, 3], "dtype": "float32", "ops": {"fwd": {
                   "rows": [row], "ceiling": {"gbps": 32.0, "model": "copy rate"}}}}]}
    src = tmp_path / "r.json"
    src.write_text(json.dumps(results))
    assert plot.main([str(src), str(tmp_path / "p.png")]) == 0
    has_kaleido = importlib.util.find_spec("kaleido") is not None
    written = tmp_path / ("p.png" if has_kaleido else "p.html")
    assert written.stat().st_size > 0
