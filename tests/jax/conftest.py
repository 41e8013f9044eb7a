"""The JAX suite: runs in its own process, started by tests/test_jax.py with
STOCHDEPTH_JAX_SUITE=1; a plain `pytest` run of the whole tree collects nothing here. JAX,
once its backend starts, warns on every os.fork() (an error under this suite's warning
filter), which would break the fork tests of the outer run.

To run it by hand:

    STOCHDEPTH_JAX_SUITE=1 python -m pytest tests/jax
"""

from __future__ import annotations

import os

if os.environ.get("STOCHDEPTH_JAX_SUITE") != "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_configure(config):
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:jax.*")
