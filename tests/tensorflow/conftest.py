"""The TensorFlow ops suite: runs in its own process, started by tests/test_tensorflow.py with
STOCHDEPTH_TF_SUITE=1; a plain `pytest` run of the whole tree collects nothing here. TensorFlow
and torch in one process can conflict (two copies of their shared libraries, threads started at
import), and TensorFlow's start-up would slow every later fork test of the outer run.

To run it by hand:

    STOCHDEPTH_TF_SUITE=1 python -m pytest tests/tensorflow
"""

from __future__ import annotations

import os

if os.environ.get("STOCHDEPTH_TF_SUITE") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    # TensorFlow's C++ start-up chatter on stderr; harmless, and it buries real failures.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_configure(config):
    # pyproject.toml turns warnings into errors; these come from TensorFlow itself at import or
    # trace time, not from stochdepth.
    for line in (
        "ignore::DeprecationWarning:tensorflow.*",
        "ignore::DeprecationWarning:google.*",
        "ignore::DeprecationWarning:flatbuffers.*",
    ):
        config.addinivalue_line("filterwarnings", line)
