"""The Keras suite: runs once per backend, each in its own process (Keras fixes its backend at
import time). tests/test_keras_backends.py starts those processes with KERAS_BACKEND set and
STOCHDEPTH_KERAS_SUITE=1; a plain `pytest` run of the whole tree collects nothing here, so the
suite never runs under whatever backend happened to be the default.

To run one backend by hand:

    STOCHDEPTH_KERAS_SUITE=1 KERAS_BACKEND=jax python -m pytest tests/keras
"""

from __future__ import annotations

import os

if os.environ.get("STOCHDEPTH_KERAS_SUITE") != "1":
    collect_ignore_glob = ["test_*.py"]
else:
    # TensorFlow's C++ start-up chatter on stderr; harmless, and it buries real failures.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_configure(config):
    # pyproject.toml turns warnings into errors. These come from the frameworks themselves at
    # import or trace time, not from stochdepth; everything else stays an error.
    for line in (
        "ignore::DeprecationWarning:tensorflow.*",
        "ignore::DeprecationWarning:keras.*",
        "ignore::DeprecationWarning:jax.*",
        "ignore::DeprecationWarning:google.*",
        "ignore::DeprecationWarning:flatbuffers.*",
        "ignore::DeprecationWarning:h5py.*",
        "ignore::FutureWarning:keras.*",
    ):
        config.addinivalue_line("filterwarnings", line)


def pytest_report_header(config):
    if os.environ.get("STOCHDEPTH_KERAS_SUITE") != "1":
        return []
    import keras

    return [f"keras {keras.__version__}, backend {keras.backend.backend()}"]
