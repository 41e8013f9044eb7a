"""The binding tests need no torch: run them in a subprocess with `import torch` blocked
(STOCHDEPTH_TEST_BLOCK_IMPORTS=torch, see tests/conftest.py) and check, from its JUnit report,
that every test of the torch-free files ran and passed, and that only the torch file skipped,
because of the block. A module-level `importorskip("torch")` in the wrong file fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sd_testutil import junit_outcomes

HERE = Path(__file__).resolve().parent
TORCH_FREE = ["test_bindings.py", "test_bindings_arrays.py", "test_bindings_dlpack.py"]
TORCH_ONLY = "test_bindings_torch.py"
# Skips that the torch-free files may report, by reason: the machine, not torch.
ALLOWED_SKIPS = {
    r"longdouble is float64 here": "np.longdouble is float64 on some platforms",
    r"the fake CUDA capsule would be dereferenced on a GPU": "a machine with a CUDA device",
}
# Well below the ~180 torch-free tests: a tripwire for a file that silently collects nothing.
MIN_PASSED = 150


def test_binding_tests_run_without_torch(tmp_path):
    xml = tmp_path / "junit.xml"
    env = dict(os.environ, STOCHDEPTH_TEST_BLOCK_IMPORTS="torch")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *(str(HERE / f) for f in TORCH_FREE + [TORCH_ONLY])]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout[-6000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"
    by_module = junit_outcomes(xml)

    torch_only = by_module.pop(TORCH_ONLY.removesuffix(".py"), [])
    assert torch_only, f"{TORCH_ONLY} reported nothing\n{output}"
    assert all(o == "skipped" and "blocked by STOCHDEPTH_TEST_BLOCK_IMPORTS" in m
               for _, o, m in torch_only), torch_only

    passed = 0
    for name in TORCH_FREE:
        results = by_module.pop(name.removesuffix(".py"), [])
        counts = Counter(o for _, o, _ in results)
        assert counts["passed"] > 0, f"{name}: nothing passed without torch: {counts}\n{output}"
        bad = [(t, m) for t, o, m in results if o == "skipped"
               and not any(re.search(p, m) for p in ALLOWED_SKIPS)]
        assert not bad, f"{name}: skips without torch that are not allowed: {bad}"
        passed += counts["passed"]
    assert not by_module, f"unexpected modules in the report: {sorted(by_module)}"
    assert passed >= MIN_PASSED, f"only {passed} binding tests passed without torch\n{output}"
