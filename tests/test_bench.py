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
from stochdepth.bench import (
    anchors,
    ceiling,
    cli,
    cpu_rows,
    cuda_rows,
    jax_rows,
    keras_rows,
    machine,
    report,
    tf_rows,
    timing,
)
from stochdepth.bench.cases import OPS, PRIMITIVE_TENSORS, ceiling_models
from stochdepth.bench.rows import Row, Section

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
    data, proc = run_bench(tmp_path, "--quick", "--no-torch", "--ops", "fwd,bwd", "--rounds",
                           "2", "--cases", "3x5:float64,4x7x3:float16")
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
    # The frameworks and sections left out say why, in the header.
    assert "torch: not used (disabled by --no-torch)" in proc.stdout
    assert ("Keras rows (torch backend): skipped (needs torch, disabled by --no-torch)"
            in proc.stdout)
    assert "JAX rows: skipped" not in proc.stdout and "jax" in data
    # The Keras-on-TensorFlow section runs without torch too (a subprocess on that backend).
    assert "Keras rows (TensorFlow backend): skipped" not in proc.stdout
    if importlib.util.find_spec("tensorflow") is not None:
        tf_rows_ = data["keras_tf"]["rows"]
        assert [(r["impl"], r["op"]) for r in tf_rows_] == [
            (impl, op) for impl in ("stochdepth.keras", "kerasfactory")
            for op in ("forward", "forward+backward")]
        ours = [r for r in tf_rows_ if r["impl"] == "stochdepth.keras"]
        assert all("error" not in r and 0 < r["min_ms"] <= r["median_ms"] for r in ours), ours
    # The JAX model train steps need no torch: the quick ViT case, every row timed.
    jax_cases = data["jax_model"]["cases"]
    assert [c["name"] for c in jax_cases] == ["vit-s16-ls-0.4"]
    assert all("error" not in r and r["median_ms"] > 0 for r in jax_cases[0]["rows"])
    # The Keras model train steps: the backends --no-torch leaves, both layers in each.
    model_rows = data["keras_model"]["rows"]
    backends = ["jax"] + (["tensorflow"] if importlib.util.find_spec("tensorflow") else [])
    assert [r["backend"] for r in model_rows if r["impl"] == "stochdepth.keras"] == backends
    for r in model_rows:
        if r["impl"] == "stochdepth.keras" or importlib.util.find_spec("kerasfactory"):
            assert "error" not in r and 0 < r["min_ms"] <= r["median_ms"], r


def test_compare_isas_rows(tmp_path):
    """By default the library's main row of each op also runs on every other vector ISA this
    CPU supports ("sd@isa"), labelled with its ISA, in the same rounds; --compare-isas none and
    an explicit list choose them; an unsupported name is refused."""
    import stochdepth

    others = [i for i in stochdepth.build_info()["cpu_isas_supported"]
              if i not in ("scalar", stochdepth.get_isa())]
    for args, want in ((), others), (("--compare-isas", "none"), []), (
            ("--compare-isas", "scalar"), ["scalar"]):
        data, _ = run_bench(tmp_path, "--quick", "--no-torch", "--no-tf", "--no-model", "--ops",
                            "fwd,bwd", "--rounds", "2", "--cases", "4x7x3:bfloat16", *args)
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
    summaries = {"copy": {"a": s(2.0), "b": s(1.0), "c": {"error": "x"}},
                 "fill": {"a": s(0.25), "b": s(0.5)}}
    k = 0.75
    nbytes = bench.op_bytes("bwd", 1e6, 1, k)
    c = ceiling.op_ceiling("bwd", k, t, nbytes, summaries)
    assert c["primitives"]["copy"]["best"] == "b" and c["primitives"]["copy"]["ms"] == 1.0
    assert c["primitives"]["fill"]["best"] == "a" and c["primitives"]["copy"]["gbps"] == 2.0
    # copy rate: (1 + k) / 2 copies = 0.875 ms; the op's mix: k copies + (1 - k) fills = 0.8125
    assert c["model"] == "copy on kept rows, fill on dropped"
    assert c["ms"] == pytest.approx(0.8125) and c["gbps"] == pytest.approx(nbytes / 0.8125e6)
    # With only copies measured, the copy-rate model stands alone; the other says what it lacks.
    only_copy = {"copy": summaries["copy"]}
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
    case = bench.parse_case("2x3:bfloat16", p=0.5)
    assert (case.shape, case.dtype, case.what, case.p, case.n_elems) == (
        (2, 3), "bfloat16", "custom", 0.5, 6)


def test_default_cases_grow_past_twice_the_llc():
    mib = 2**20
    assert bench.parse_case("big-f32", 32 * mib, 0.8).shape == (256, 197, 768)  # already past
    case = bench.parse_case("big-f32", 300 * mib, 0.8, 64 * 2**30)
    shape = case.shape
    assert shape[0] % 64 == 0 and shape[0] > 256 and "grown to" in case.what
    tensor = math.prod(shape) * 4
    assert min(bench.op_bytes(op, 1, tensor, 0.8) for op in bench.OPS["cpu"]) > 600 * mib
    assert bench.op_bytes("bwd", 1, tensor * (shape[0] - 64) / shape[0], 0.8) < 600 * mib
    # Memory caps the growth (a tensor at most a sixteenth of what is available).
    assert bench.parse_case("big-bf16", 300 * mib, 0.8, 2 * 2**30).shape[0] == 512
    capped = bench.parse_case("big-bf16", 300 * mib, 0.8, 16 * 640 * 197 * 768 * 2).shape
    assert capped[0] == 640 and bench.parse_case("big-bf16", 300 * mib, 0.8).shape[0] > 640


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


# -- the structure: Case, Row and Section objects (stochdepth.bench.rows)
ROW_LISTS = {"cpu_rows": cpu_rows.ROWS, "cuda_rows": cuda_rows.ROWS, "anchors": anchors.ROWS,
             "ceiling": ceiling.ROWS, "jax_rows": jax_rows.ROWS,
             "jax_rows.KERAS_ROWS": jax_rows.KERAS_ROWS, "keras_rows": keras_rows.ROWS,
             "tf_rows.KERAS_ROWS": tf_rows.KERAS_ROWS}
PRIMITIVES = set(PRIMITIVE_TENSORS)


@pytest.mark.parametrize("module", list(ROW_LISTS))
def test_every_exported_row_is_a_row_with_a_unique_name(module):
    """Within a module and device (and for the ceiling, a primitive), names are unique: they are
    the rows' keys in the JSON. Every op a row builds is an op of one of its devices."""
    rows = ROW_LISTS[module]
    assert rows and all(isinstance(r, Row) for r in rows)
    seen = set()
    for r in rows:
        for device in r.devices:
            for op in r.ops:
                assert (device, op, r.name) not in seen, (module, device, op, r.name)
                seen.add((device, op, r.name))
        assert r.ops and all(callable(b) for b in r.ops.values()), r.name
        assert (r.anchor is None) == r.ours or module == "ceiling", r.name
        if module == "ceiling":
            assert len(r.ops) == 1 and set(r.ops) <= PRIMITIVES and r.anchor is None, r.name
        elif module in ("cpu_rows", "cuda_rows", "anchors"):
            valid = set().union(*(OPS[d] for d in r.devices))
            assert set(r.ops) <= valid, (r.name, set(r.ops) - valid)
    if module in ("cpu_rows", "cuda_rows", "anchors"):  # the tables: one name per device
        names = [(d, r.name) for r in rows for d in r.devices]
        assert len(names) == len(set(names))


def test_anchor_rows_are_the_tables_columns():
    assert [r.anchor for r in anchors.ROWS] == ["numpy", "torchvision", "timm", "compile"]
    assert all(r.column and r.column.startswith("vs ") for r in anchors.ROWS)
    assert [r.name for r in cli.OP_ROWS if "cuda" in r.devices and r.anchor] == [
        "tv", "timm", "compile"]


def test_rows_of_an_op_in_table_order():
    """What each op's table lists (when everything is available), in order: the library's rows,
    then the anchors."""
    def names(device, op):
        return [r.name for r in cli.OP_ROWS
                if r.skipped(device, op, "float32", lambda framework: None) is None]

    assert names("cpu", "fwd") == ["sd", "sd_torch", "sd_adapter", "numpy", "tv", "timm",
                                   "compile"]
    assert names("cpu", "fwd_out") == ["sd", "sd_raw", "sd_torch", "numpy", "tv", "timm",
                                       "compile"]
    assert names("cpu", "bwd") == ["sd", "sd_out", "sd_torch", "sd_adapter", "numpy", "tv",
                                   "timm", "compile"]
    assert names("cuda", "fwd") == ["sd_out", "sd_alloc", "sd_raw", "sd_adapter", "tv", "timm",
                                    "compile"]
    assert names("cuda", "fwdbwd") == ["sd_out", "sd_alloc", "sd_adapter", "tv", "timm",
                                       "compile"]


def test_row_skipped_says_why():
    row = next(r for r in anchors.ROWS if r.name == "tv")
    why = {"torch": "disabled by --no-torch"}.get
    assert row.skipped("cpu", "fwd", "float32", why) == "disabled by --no-torch"
    assert row.skipped("cpu", "fwdbwd", "float32", lambda f: None) is None  # the op is its own
    numpy_row = next(r for r in anchors.ROWS if r.name == "numpy")
    assert numpy_row.skipped("cuda", "fwd", "float32", why) == "not on cuda"
    assert numpy_row.skipped("cpu", "fwdbwd", "float32", why) == "no fwdbwd"
    add = next(r for r in ceiling.ROWS if r.name == "np.add(out=) (1 thread)")
    assert add.skipped("cpu", "add", "bfloat16", why) == "not for bfloat16"


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_disabled_frameworks_rows_are_left_out():
    env = cli.Env(cli.parse_args(["--no-adapter", "--no-compile", "--compare-isas", "none"]))
    assert env.unavailable("stochdepth.torch") == "disabled by --no-adapter"
    assert env.unavailable("torch.compile") == "disabled by --no-compile"
    assert env.unavailable("torch") is None and env.unavailable("numpy") is None
    case = bench.parse_case("small")
    assert [r.name for r in cli._rows(env, case, "bwd")] == [
        "sd", "sd_out", "sd_torch", "numpy", "tv", "timm"]
    env = cli.Env(cli.parse_args(["--no-torch"]))
    assert env.unavailable("stochdepth.torch") == "needs torch"
    assert [r.name for r in cli._rows(env, case, "fwd")][:1] == ["sd"]
    assert {"sd_torch", "tv", "timm", "compile"}.isdisjoint(
        r.name for r in cli._rows(env, case, "fwd"))
    assert [p for p, _ in cli._ceiling_rows(env, bench.parse_case("3x5:float16"), "fwd")] == [
        "copy", "copy", "add"]  # NumPy's float16 add left out, no torch


def test_a_new_row_and_a_new_section_plug_in(monkeypatch, capsys):
    """One Row object in the rows list puts it in the table and the JSON; one Section object in
    SECTIONS runs it and stores its results under its key."""
    def fwd(d):
        sc, r = d.shortcut, d.residual
        return (lambda: sc - r), None

    extra = Row("extra", "an extra row", framework="numpy", ops={"fwd": fwd})
    ran = []
    section = Section(key="extra_section", title="Extra rows", devices=("cpu",),
                      skipped=lambda args: None, run=lambda args: ran.append(args) or {"n": 1})
    monkeypatch.setattr(cli, "OP_ROWS", cli.OP_ROWS + [extra])
    monkeypatch.setattr(cli, "SECTIONS", [section])
    args = cli.parse_args(["--quick", "--no-torch", "--no-progress", "--cases", "3x5:float32",
                           "--ops", "fwd", "--rounds", "2", "--compare-isas", "none"])
    results, failures = cli.run(args)
    assert failures == [] and results["extra_section"] == {"n": 1} and len(ran) == 1
    rows = {r["impl"]: r for r in results["cases"][0]["ops"]["fwd"]["rows"]}
    assert list(rows) == ["sd", "numpy", "extra"]
    check_row(rows["extra"], 2)
    assert rows["extra"]["label"] == "an extra row" and rows["extra"]["anchor"] is None
    assert "row:extra" in results["cases"][0]["ops"]["fwd"]["round_order"][0]
    assert "an extra row" in capsys.readouterr().out


def test_a_failing_row_of_ours_fails_the_run(monkeypatch, capsys):
    def broken(d):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(cli, "OP_ROWS", cli.OP_ROWS + [
        Row("ours_broken", "ours, broken", framework="numpy", ours=True, ops={"fwd": broken}),
        Row("anchor_broken", "anchor, broken", framework="numpy", anchor="broken",
            column="vs broken", ops={"fwd": broken})])
    monkeypatch.setattr(cli, "SECTIONS", [])
    args = cli.parse_args(["--quick", "--no-torch", "--no-progress", "--cases", "3x5:float32",
                           "--ops", "fwd", "--rounds", "2", "--compare-isas", "none"])
    results, failures = cli.run(args)
    assert failures == ["3x5:float32/fwd/ours, broken: RuntimeError: no such kernel"]
    rows = {r["impl"]: r for r in results["cases"][0]["ops"]["fwd"]["rows"]}
    assert rows["anchor_broken"]["error"] == "RuntimeError: no such kernel"
    assert "ours, broken: FAILED: RuntimeError: no such kernel" in capsys.readouterr().out
