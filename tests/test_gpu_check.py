"""benchmarks/gpu_check.sh --dry-run: the GPU check's own plumbing, on every CI run.

The one GPU run must not die of a typo: the dry run runs every step (wheels, build check, pytest
with JUnit XML, the sanitizer command lines without the sanitizer, the compact benchmark, the
benchmark under a faked torch.cuda) and prints the final table. A second run with a tiny budget
shows the shared deadline: steps that run out are TIMED OUT or NOT RUN, and the table still
comes last.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

import stochdepth

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["wheels", "build", "compact", "bench", "pytest", "sanitize"]  # the order they run in
TARGETS = ["training forward >= 90% of copy", "forward+backward >= 1.45x torch eager",
           "forward+backward >= 1.2x torch.compile", "compact scatter >= 80% of copy",
           "compact gather >= 80% of copy"]

pytestmark = [
    pytest.mark.skipif(not stochdepth.build_info()["cuda_compiled"],
                       reason="the dry run checks a CUDA build"),
    pytest.mark.skipif(os.environ.get("STOCHDEPTH_IN_GPU_CHECK") == "1",
                       reason="inside gpu_check.sh itself: its device time is for the GPU"),
]


def dry_run(tmp_path, timeout, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    for key in ("PYTEST_ADDOPTS", "STOCHDEPTH_IN_GPU_CHECK"):
        full_env.pop(key, None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.rstrip("\n").splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("==== gpu_check targets"))
    table = {}
    for line in lines[start + 2:]:  # title, header, then one line per step or target
        status = next(s for s in ("PASS", "FAIL", "NOT RUN") if f"  {s} " in line + " ")
        table[line.split(f"  {status}")[0].strip()] = status
    return proc, lines, start, table, out


def test_dry_run_every_step_passes_and_the_table_is_last(tmp_path):
    pytest.importorskip("torch")  # the benchmark step fakes torch.cuda
    proc, lines, start, table, out = dry_run(tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert lines[start - 1].startswith("==== DRY RUN"), "a dry run says: not GPU numbers"
    assert [k for k in table if k.startswith("step ")] == [f"step {s}" for s in STEPS]
    assert all(table[f"step {s}"] == "PASS" for s in STEPS), table
    for target in TARGETS:  # measured by the CPU stand-ins: a verdict, whatever it is
        rows = [k for k in table if k.startswith(target)]
        # The dry run's benchmark has no torch.compile rows (--no-compile): nothing to judge.
        want = ("NOT RUN",) if "torch.compile" in target else ("PASS", "FAIL")
        assert rows and all(table[k] in want for k in rows), (target, table)
    assert len(lines) - start - 2 == len(table), "nothing may follow the table"
    assert (out / "pytest.xml").exists() and (out / "compact.json").exists()
    assert (out / "bench_cuda.json").exists() and (out / "gpu_check.log").exists()
    table_file = (out / "gpu_table.txt").read_text()
    assert "==== gpu_check targets" in table_file and "step sanitize" in table_file


def test_shared_deadline_reports_late_steps_and_still_prints_the_table(tmp_path):
    # Each step spends 5 s first: 20 s minus the table's 8 s reserve then holds two steps at
    # most, however fast this machine runs the stand-ins.
    proc, lines, start, table, _ = dry_run(tmp_path, timeout=120, SD_BUDGET="20",
                                           SD_DRY_STEP_SECONDS="5")
    late = {s: table[f"step {s}"] for s in STEPS}
    why = f"{late}\n{proc.stdout[-3000:]}"
    assert proc.returncode == 1, why
    assert late["wheels"] == "PASS", why
    assert late["bench"] == "NOT RUN", why
    assert "TIMED OUT" in proc.stdout or "no time left" in proc.stdout, why
    assert table[TARGETS[0] + " (vit1024-bf16, out=)"] == "NOT RUN", why
    assert len(lines) - start - 2 == len(table), "nothing may follow the table"


def test_the_checks_pytest_command_line_runs_with_pytest_timeout_installed():
    # pytest-timeout registers itself through its entry point; the GPU image has it. Naming it
    # again with -p made pluggy abort every pytest run of the check at start-up.
    import pytest_timeout  # noqa: F401  (in the test extra: this test must not skip)

    env = dict(os.environ, PYTHON=sys.executable)
    got = subprocess.run(["bash", str(SCRIPT), "--pytest-args"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    args = got.stdout.splitlines()
    assert "--timeout=60" in args and "pytest_timeout" not in args, args
    assert args[args.index("-m") + 1] == "not slow"
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *args, "tests/test_philox.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
