"""The benchmark's model section (stochdepth.bench.model_rows), run with a tiny configuration:
it times every implementation of every case it is asked for in the same rounds, judges them
against the timm row and the bound, and every implementation trains the same model. Nothing
here is a measurement: the numbers of a shared test machine are not compared with anything."""

from __future__ import annotations

import importlib.util
import json

import pytest

torch = pytest.importorskip("torch")

from stochdepth.bench import _blocks, cli, model_rows  # noqa: E402
from stochdepth.bench.report import write_json  # noqa: E402
from torch_util import assert_same, randn  # noqa: E402

pytestmark = pytest.mark.torch

IMPLS = [impl for impl, _ in model_rows.IMPLS]


def _args(*extra):
    return cli.parse_args(["--quick", "--no-compile", "--rounds", "1", *extra])


@pytest.mark.timeout(600)
def test_the_section_times_every_implementation_and_judges_it(tmp_path, capsys):
    args = _args("--model-cases", "vit-s16-ls-0.4,convnext-0.1", "--model-optimizer", "sgd")
    res = model_rows.SECTION.run(args)
    assert (res["batch"], res["depth"], res["optimizer"], res["rounds"]) == (8, 2, "sgd", 1)
    assert [(c["name"], c["compiled"]) for c in res["cases"]] == [
        ("vit-s16-ls-0.4", False), ("convnext-0.1", False)]
    assert res["cases"][0]["shape"] == [8, 17, 32]
    assert res["cases"][1]["shape"] == [8, 16, 8, 8]
    for case in res["cases"]:
        rows = {r["impl"]: r for r in case["rows"]}
        assert list(rows) == IMPLS and all("error" not in r for r in rows.values()), rows
        for r in rows.values():
            assert r["median_ms"] > 0 and len(r["round_median_ms"]) == 1
            assert r["vs_timm"] == pytest.approx(rows["timm"]["median_ms"] / r["median_ms"])
        assert rows["timm"]["vs_timm"] == 1.0
        # Every entry ran once per round, the optimizer step first.
        assert [set(r) for r in case["round_order"]] == [{"optimizer", *IMPLS}]
        assert case["round_order"][0][0] == "optimizer"
        bound, floor = case["bound"], rows["floor"]["median_ms"]
        rates = _blocks.drop_rates(case["drop_path_rate"], 2)
        assert bound["kept_fraction"] == pytest.approx(sum(1 - r for r in rates) / 2)
        assert bound["ms"] == pytest.approx(
            bound["optimizer_ms"] + max(floor - bound["optimizer_ms"], 0) * bound["kept_fraction"])
        assert rows["patch"]["of_bound"] == pytest.approx(bound["ms"] / rows["patch"]["median_ms"])
    out = capsys.readouterr().out
    assert ("Model train steps on cpu: forward + backward + sgd step, batch 8, depth 2 (median "
            "of 1 interleaved rounds, ms; no compiled rows: --no-compile)") in out
    assert "patch(model)" in out and "x vs timm" in out and "of bound" in out
    # The results go into the JSON as they are.
    path = tmp_path / "r.json"
    write_json(str(path), {"model": res})
    assert json.loads(path.read_text())["model"]["cases"][1]["name"] == "convnext-0.1"
    if importlib.util.find_spec("plotly") is not None:
        from stochdepth.bench.plot import figure

        names = {t.name for t in figure({"model": res}).data}
        assert {"model: patch(model)", "model: timm formula",
                "model: bound (dropped work)"} <= names


@pytest.mark.parametrize("name", ["vit-s16-ls-0.4", "vit-b16-0.1", "convnext-0.4"])
def test_every_implementation_trains_the_same_model(name):
    """The same weights and, at eval (no drop path), the same function, bit for bit."""
    (case,) = model_rows.selected_cases(_args("--model-cases", name))
    x = randn(case.input_shape(4))
    outs = {}
    for impl in IMPLS:
        model = model_rows.build(case, impl, 2).eval()
        with torch.no_grad():
            outs[impl] = model(x).contiguous()
        params = sorted(p.numel() for p in model.parameters())
        if impl == "floor":
            floor_params = params
        assert params == floor_params, impl
    for impl in IMPLS:
        assert_same(outs[impl], outs["floor"])
    # The timm row keeps timm's drop paths; the patched one has the library's.
    assert any(type(m) is _blocks.DropPath for m in model_rows.build(case, "timm", 2).modules())
    model = model_rows.build(case, "patch", 2)
    drops = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drops and all(m.__module__ == "stochdepth.torch.modules" for m in drops)


def test_options_are_checked():
    with pytest.raises(SystemExit, match=r"--model-cases: unknown \['vit-h14-0.1'\]"):
        model_rows.selected_cases(_args("--model-cases", "vit-h14-0.1"))
    with pytest.raises(SystemExit):
        cli.parse_args(["--model-depth", "0"])
    assert [c.name for c in model_rows.selected_cases(_args())] == list(model_rows.QUICK_CASES)
    assert len(model_rows.selected_cases(cli.parse_args([]))) == len(model_rows.MODEL_CASES) == 10
    assert model_rows.SECTION.skipped(cli.parse_args(["--no-model"])) == "disabled by --no-model"
    assert model_rows.SECTION.skipped(cli.parse_args([])) is None
    assert model_rows.SECTION in cli.SECTIONS


# dynamo inspects tensors it did not create and triggers this warning inside torch
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_compiled_rows_run_and_report_their_compile_time():
    """The compiled mode's rows (dynamo with the eager backend here: inductor would compile
    every graph with a C++ compiler, minutes on a small machine)."""
    from stochdepth.bench.timing import CpuTimer, TimingPlan

    args = _args("--model-compile-backend", "eager")
    (case,) = model_rows.selected_cases(args)
    rows, opt_ms, order = model_rows._time_case(
        torch, args, case, True, CpuTimer(), TimingPlan(rounds=1, burst_time_s=0.0, max_burst=1,
                                                        warmup=1))
    assert list(rows) == IMPLS and opt_ms > 0 and len(order) == 1
    for r in rows.values():
        assert "error" not in r, r
        assert r["label"].endswith(", compiled") and r["compile_s"] > 0 and r["median_ms"] > 0
