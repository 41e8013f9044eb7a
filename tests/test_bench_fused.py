"""The benchmark's fused section (stochdepth.bench.fused_rows), run with a tiny configuration: it
times every implementation of every op and pass in the same rounds as the copy ceiling, judges
ours against the others, and the rows compute the same thing. Nothing here is a measurement."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

import stochdepth.torch as sdt  # noqa: E402
from stochdepth.bench import cli, fused_rows  # noqa: E402
from stochdepth.bench.report import write_json  # noqa: E402

pytestmark = pytest.mark.torch


def _args(*extra):
    return cli.parse_args(["--quick", "--rounds", "1", *extra])


@pytest.mark.timeout(600)
def test_the_section_times_every_op_and_pass_against_the_ceiling(tmp_path, capsys):
    res = fused_rows.SECTION.run(_args())
    want = [(list(s), d, op, ps) for s, d in fused_rows.QUICK_CASES for op in fused_rows.OPS
            for ps in fused_rows.PASSES]
    assert [(c["shape"], c["dtype"], c["op"], c["pass"]) for c in res["cases"]] == want
    for c in res["cases"]:
        rows = {r["impl"]: r for r in c["rows"]}
        # --quick: no compiled rows; every other row ran.
        assert list(rows) == ["ours", "eager"] and all("error" not in r for r in rows.values())
        ours = rows["ours"]["median_ms"]
        assert c["vs_eager"] == pytest.approx(rows["eager"]["median_ms"] / ours)
        assert c["vs_compile"] is None
        elem = 4 if c["dtype"] == "float32" else 2
        n = elem * 16 * 17 * 64
        assert c["grad_shortcut_copy"] is False  # tiny tensors: grad_out handed back as is
        assert c["bytes"] == fused_rows.op_bytes(c["op"], c["pass"], 0.8) * n
        assert c["ceiling_ms"] == pytest.approx(c["bytes"] / (c["copy_gbps"] * 1e9) * 1e3)
        assert c["pct_ceiling"] == pytest.approx(100 * c["ceiling_ms"] / ours)
        assert set(c["copies"]) == {"copy: stochdepth _core.stream_copy", "copy: torch .copy_"}
    out = capsys.readouterr().out
    assert "Fused ops on the CPU, p=0.8" in out and "no compiled rows" in out
    path = tmp_path / "r.json"
    write_json(str(path), {"fused": res})
    assert json.loads(path.read_text())["fused"]["cases"][0]["op"] == "layer scale"


def test_op_bytes_count_the_fused_ops_traffic():
    assert fused_rows.op_bytes("layer scale", "forward", 0.8) == pytest.approx(2.8)
    assert fused_rows.op_bytes("layer scale", "backward", 0.5) == pytest.approx(2.5)
    assert fused_rows.op_bytes("layer scale", "backward", 0.5, True) == pytest.approx(4.5)
    assert fused_rows.op_bytes("layer norm", "forward", 1.0) == pytest.approx(4.0)
    assert fused_rows.op_bytes("rms norm", "backward", 0.8) == pytest.approx(5.8)


@pytest.mark.parametrize("op", fused_rows.OPS)
def test_the_rows_compute_the_same_op(op):
    # With every sample kept (p = 1) the unfused sequence and the library's op are the same
    # function: the rows compare like with like (to rounding: the orders differ).
    args = fused_rows._inputs(torch, op, (4, 5, 24), "float64", grad=True)
    ours = fused_rows._ours(sdt, op)(*args, 1.0)
    theirs = fused_rows._unfused(torch, op)(*args, 1.0)
    ours, theirs = (x if isinstance(x, tuple) else (x,) for x in (ours, theirs))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(sum(x.sum() for x in ours), args)
    gb = torch.autograd.grad(sum(x.sum() for x in theirs), args)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b)


def test_no_fused_skips_the_section():
    assert fused_rows.SECTION.skipped(cli.parse_args(["--no-fused"])) == "disabled by --no-fused"
    assert fused_rows.SECTION.skipped(cli.parse_args(["--no-torch"])).startswith("needs torch")
    assert fused_rows.SECTION.skipped(cli.parse_args([])) is None
