"""The benchmark's JAX model rows (stochdepth.bench.jax_model_rows) on a tiny ViT case: every
implementation trains, is timed in the same rounds and is judged against the formula and the
bound; the rows train the same stack (the same parameters, the library's op and skip-compute
the same loss). Functional only: no timing is judged here."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from stochdepth.bench import cli, jax_model_rows, model_rows  # noqa: E402

IMPLS = [impl for impl, _ in jax_model_rows.IMPLS]


def _case(name):
    return next(c for c in model_rows._cases(model_rows.QUICK_SHAPES) if c.name == name)


@pytest.mark.timeout(600)
def test_the_section_times_every_implementation_and_judges_it(capsys):
    args = cli.parse_args(["--quick", "--rounds", "1", "--model-optimizer", "sgd",
                           "--model-cases", "vit-s16-ls-0.4,convnext-0.4"])
    res = jax_model_rows.SECTION.run(args)
    # The ConvNeXt case is the torch section's only.
    assert [c["name"] for c in res["cases"]] == ["vit-s16-ls-0.4"]
    case = res["cases"][0]
    assert case["shape"] == [8, 17, 32] and (res["depth"], res["optimizer"]) == (2, "sgd")
    rows = {r["impl"]: r for r in case["rows"]}
    assert list(rows) == IMPLS and all("error" not in r for r in rows.values()), rows
    for r in rows.values():
        assert r["median_ms"] > 0 and r["compile_s"] > 0
        assert r["vs_timm"] == pytest.approx(rows["timm"]["median_ms"] / r["median_ms"])
    assert [set(r) for r in case["round_order"]] == [{"optimizer", *IMPLS}]
    bound, floor = case["bound"], rows["floor"]["median_ms"]
    kept = sum(1 - r for r in jax_model_rows.drop_rates(0.4, 2)) / 2
    assert bound["kept_fraction"] == pytest.approx(kept)
    assert bound["ms"] == pytest.approx(
        bound["optimizer_ms"] + max(floor - bound["optimizer_ms"], 0) * kept)
    out = capsys.readouterr().out
    assert "JAX model train steps (jax.jit, CPU)" in out and "stochastic_residual" in out


def test_drop_rates_are_timms_schedule():
    torch = pytest.importorskip("torch")
    from stochdepth.bench import _blocks

    for rate, depth in ((0.4, 4), (0.1, 12), (0.3, 1)):
        assert jax_model_rows.drop_rates(rate, depth) == pytest.approx(
            _blocks.drop_rates(rate, depth), abs=1e-7)
    del torch


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_rows_train_the_same_stack(optimizer):
    case = _case("vit-s16-ls-0.4")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 17, 32), np.float32))
    losses, params = {}, {}
    for impl in IMPLS:
        step, p, state = jax_model_rows.make_step(case, impl, 4, optimizer)
        p, state, loss = step(p, state, x, jnp.uint32(0))
        losses[impl], params[impl] = float(loss), p
    # The library's op and skip-compute draw the same masks: the same loss (to the rounding of
    # matmuls over fewer rows); the drop paths drop something, so the floor's differs.
    assert losses["skip"] == pytest.approx(losses["op"], rel=1e-5, abs=1e-6)
    assert losses["op"] != losses["floor"]
    assert np.isfinite(losses["timm"])
    # One update moved the parameters of every row: every one under AdamW (a normalised step);
    # under SGD the LayerScale gammas (1e-3 x a gradient of about 1e-5 rounds away against some
    # weights in float32).
    start = jax_model_rows._init(case, 4)
    for impl in IMPLS:
        moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                             params[impl], start)
        if optimizer == "adamw":
            assert all(jax.tree.leaves(moved)), impl
        assert all(b["ls1"] and b["ls2"] for b in moved), impl
