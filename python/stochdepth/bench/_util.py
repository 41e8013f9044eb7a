"""Helpers for `python -m stochdepth.bench`: timers, a progress bar, machine facts, tables.

Nothing here knows about the op itself; bench.py holds the cases, the implementations and the
byte counts. Timers return nanoseconds per repetition; the caller takes medians.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import shutil
import sys
import time

__all__ = [
    "TimingPlan",
    "time_cpu",
    "time_cuda",
    "Progress",
    "machine_info",
    "format_table",
    "short_error",
    "median",
]


class TimingPlan:
    """How long to time one row: warm-up calls, then reps until `min_time_s` of timed work.

    At least `min_reps` and at most `max_reps` timed repetitions are taken.
    """

    def __init__(self, warmup, min_reps, max_reps, min_time_s, warmup_time_s=0.0):
        self.warmup = int(warmup)
        self.warmup_time_ns = int(warmup_time_s * 1e9)
        self.min_reps = int(min_reps)
        self.max_reps = int(max_reps)
        self.min_time_ns = int(min_time_s * 1e9)

    def as_dict(self):
        return {
            "warmup": self.warmup,
            "warmup_time_s": self.warmup_time_ns / 1e9,
            "min_reps": self.min_reps,
            "max_reps": self.max_reps,
            "min_time_s": self.min_time_ns / 1e9,
        }


def median(values):
    v = sorted(values)
    n = len(v)
    if n == 0:
        return math.nan
    mid = n // 2
    return float(v[mid]) if n % 2 else (v[mid - 1] + v[mid]) / 2.0


def _more(plan, reps, spent_ns):
    """Whether to time another repetition."""
    return reps < plan.max_reps and (reps < plan.min_reps or spent_ns < plan.min_time_ns)


def time_cpu(fn, plan, setup=None):
    """Wall time of `fn(*setup())` per repetition, in ns (time.perf_counter_ns).

    Warm-up: at least `plan.warmup` calls and `plan.warmup_time_s` seconds (a torch.compile'd
    function stays slow for its first few calls after compiling).

    `setup` (optional, untimed) runs before every call and returns the call's arguments: the
    backward rows use it to build a fresh autograd graph. The result of `fn` is dropped after the
    clock stops, so freeing it is not timed (the same for every implementation). The garbage
    collector is off while timing, as in `timeit`.
    """
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        warm_calls = 0
        warm_end = time.perf_counter_ns() + plan.warmup_time_ns
        while warm_calls < plan.warmup or time.perf_counter_ns() < warm_end:
            args = setup() if setup is not None else ()
            result = fn(*args)
            del result, args
            warm_calls += 1
        times = []
        spent = 0
        while _more(plan, len(times), spent):
            args = setup() if setup is not None else ()
            t0 = time.perf_counter_ns()
            result = fn(*args)
            t1 = time.perf_counter_ns()
            del result, args
            times.append(t1 - t0)
            spent += t1 - t0
        return times
    finally:
        if gc_was_enabled:
            gc.enable()


def time_cuda(fn, plan, torch, batch=25):
    """Device time of `fn()` per repetition, in ns, from torch.cuda.Event pairs (current stream).

    Reps are queued in batches of `batch` event pairs, then one synchronize reads them, so the
    host never waits between reps (a launch-bound op then shows its launch gaps, as in training).
    """
    torch.cuda.synchronize()
    warm_calls = 0
    warm_end = time.perf_counter_ns() + plan.warmup_time_ns
    while warm_calls < plan.warmup or time.perf_counter_ns() < warm_end:
        result = fn()
        del result
        warm_calls += 1
        if warm_calls % 10 == 0:
            torch.cuda.synchronize()  # keep the host from queueing unboundedly ahead
    torch.cuda.synchronize()
    times = []
    spent = 0
    while _more(plan, len(times), spent):
        n = min(batch, plan.max_reps - len(times))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            start.record()
            result = fn()
            end.record()
            del result
        torch.cuda.synchronize()
        for start, end in events:
            ns = int(round(start.elapsed_time(end) * 1e6))  # elapsed_time is in ms
            times.append(ns)
            spent += ns
    return times


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
        frac = self.done / self.total
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
            self.stream.write(f"done: {self.done} rows in {elapsed:.1f} s\n")
            self.stream.flush()


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "sse4_2"})
    except OSError:
        pass
    return []


def _mem_total_gib():
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info(torch=None, stochdepth_module=None):
    """Facts to store beside the numbers: CPU, cores, memory, versions, stochdepth.build_info()."""
    import numpy as np

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gib": _mem_total_gib(),
        "numpy": np.__version__,
    }
    try:
        import ml_dtypes

        info["ml_dtypes"] = ml_dtypes.__version__
    except ImportError:
        info["ml_dtypes"] = None
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            idx = torch.cuda.current_device()
            props = torch.cuda.get_device_properties(idx)
            info["gpu"] = {
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "memory_gib": round(props.total_memory / 2**30, 1),
                "device_index": idx,
            }
    else:
        info["torch"] = None
    if stochdepth_module is not None:
        info["stochdepth"] = getattr(stochdepth_module, "__version__", None)
        try:
            info["stochdepth_build_info"] = _jsonable(stochdepth_module.build_info())
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info["stochdepth_build_info"] = {"error": short_error(exc)}
    return info


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def short_error(exc, limit=300):
    """One line: 'TypeName: first line of the message' (cut at `limit` characters)."""
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(headers, rows, align=None):
    """Plain-text table with aligned columns. `align`: per column '<' or '>' (default: '<' for the
    first column, '>' for the rest). A row that is a str is printed as is (a note line)."""
    ncol = len(headers)
    if align is None:
        align = ["<"] + [">"] * (ncol - 1)
    widths = [len(h) for h in headers]
    for row in rows:
        if isinstance(row, str):
            continue
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def fmt(cells):
        parts = []
        for i, cell in enumerate(cells):
            parts.append(cell.ljust(widths[i]) if align[i] == "<" else cell.rjust(widths[i]))
        return "  ".join(parts).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append(row if isinstance(row, str) else fmt(row))
    return "\n".join(out)
