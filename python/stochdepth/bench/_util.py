"""Small helpers shared by the benchmark's modules: medians, one-line errors, a progress bar.

Nothing here knows about the op, the timers or the report.
"""

from __future__ import annotations

import math
import shutil
import sys
import time

__all__ = ["Progress", "jsonable", "median", "short_error"]


def median(values):
    v = sorted(values)
    n = len(v)
    if n == 0:
        return math.nan
    mid = n // 2
    return float(v[mid]) if n % 2 else (v[mid - 1] + v[mid]) / 2.0


def short_error(exc, limit=300):
    """One line: 'TypeName: first line of the message' (cut at `limit` characters)."""
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def jsonable(obj):
    """`obj` with dict keys made strings and anything JSON cannot hold made a string."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal).

    Off a terminal (a log file, a pipe) it prints a plain line now and then instead of redrawing,
    so logs stay readable.
    """

    def __init__(self, total, enabled=True, stream=None):
        self.total = max(int(total), 1)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self._width = 0
        self._last_key = None
        self._label = ""

    def _draw(self, label):
        cols = shutil.get_terminal_size((100, 20)).columns
        frac = min(self.done / self.total, 1.0)
        bar_w = 24
        filled = int(round(frac * bar_w))
        elapsed = time.monotonic() - self.t0
        head = f"[{'#' * filled}{'.' * (bar_w - filled)}] {self.done}/{self.total} {elapsed:6.1f}s "
        line = (head + label)[: max(cols - 1, 20)]
        pad = max(self._width - len(line), 0)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def note(self, label, key=None):
        """Say what runs next (does not advance). Off a terminal, a line is printed only when
        `key` changes (e.g. once per case and op), so logs stay short."""
        if not self.enabled:
            return
        if self.tty:
            self._label = label
            self._draw(label)
        elif key is None or key != self._last_key:
            self._last_key = key
            label = key if key is not None else label
            elapsed = time.monotonic() - self.t0
            self.stream.write(f"[{self.done}/{self.total} {elapsed:6.1f}s] {label}\n")
            self.stream.flush()

    def step(self):
        self.done += 1
        if self.enabled and self.tty:
            self._draw(self._label)

    def clear(self):
        """Erase the bar before printing a table on stdout."""
        if self.enabled and self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def finish(self):
        self.clear()
        if self.enabled:
            elapsed = time.monotonic() - self.t0
            self.stream.write(f"done: {self.done} steps in {elapsed:.1f} s\n")
            self.stream.flush()
