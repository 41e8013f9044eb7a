"""Interleaved timing: the ceiling and the rows it judges measured in the same rounds.

For one op, every entry (ceiling implementations first, then the rows) is warmed up, then
timed in rounds: round r times a short burst of each entry in turn, ceilings then rows, and
the next round starts again with the ceilings. An entry's time is the median over rounds of
its per-round median, so that a machine whose bandwidth drifts judges each row against the
ceiling of the same minutes (docs/design.md, "Measuring speed"). Timers return nanoseconds.
"""

from __future__ import annotations

import gc
import math
import time

from stochdepth.bench._util import median, short_error

__all__ = ["CpuTimer", "CudaTimer", "Entry", "TimingPlan", "interleave", "summarize",
           "POST_COMPILE_CALLS"]

# Untimed calls right after torch.compile's first (compiling) call, before the warm-up: a freshly
# compiled function stays slow for its first few calls.
POST_COMPILE_CALLS = 5


class TimingPlan:
    """How to time one op: `warmup` calls (and `warmup_time_s`) per entry, then `rounds`
    rounds of one burst per entry, each burst `burst_time_s` long (at least 1 and at most
    `max_burst` calls, sized from the warm-up calls)."""

    def __init__(self, rounds, burst_time_s, max_burst, warmup, warmup_time_s=0.0):
        self.rounds = int(rounds)
        self.burst_time_ns = int(burst_time_s * 1e9)
        self.max_burst = int(max_burst)
        self.warmup = int(warmup)
        self.warmup_time_ns = int(warmup_time_s * 1e9)

    def calls_per_burst(self, call_ns):
        if call_ns <= 0 or not math.isfinite(call_ns):
            return self.max_burst
        return max(1, min(self.max_burst, math.ceil(self.burst_time_ns / call_ns)))

    def as_dict(self):
        return {"rounds": self.rounds, "burst_time_s": self.burst_time_ns / 1e9,
                "max_burst": self.max_burst, "warmup": self.warmup,
                "warmup_time_s": self.warmup_time_ns / 1e9}


class Entry:
    """One thing to time: `fn(*setup())`; `setup` (or None) runs untimed before each call."""

    def __init__(self, key, fn, setup=None):
        self.key = key
        self.fn = fn
        self.setup = setup


class CpuTimer:
    """Wall time per call (time.perf_counter_ns). A call's result is dropped after the clock
    stops, so freeing it is not timed (the same for every implementation)."""

    def _one(self, entry):
        args = entry.setup() if entry.setup is not None else ()
        t0 = time.perf_counter_ns()
        result = entry.fn(*args)
        t1 = time.perf_counter_ns()
        del result, args
        return t1 - t0

    def warm(self, entry, plan):
        # The first call pays one-time costs (a fresh 155 MB output's page faults took 160 ms
        # against 10 ms later); left in, it sized the bursts of the first row to one call.
        self._one(entry)
        times = []
        end = time.perf_counter_ns() + plan.warmup_time_ns
        while len(times) < max(plan.warmup, 1) or time.perf_counter_ns() < end:
            times.append(self._one(entry))
        return median(times)

    def burst(self, entry, n):
        return [self._one(entry) for _ in range(n)]


class CudaTimer:
    """Device time per call from a torch.cuda.Event pair around it, on the current stream.

    A burst queues its calls and their events, then one synchronize reads them, so the host
    never waits between calls (a launch-bound op shows its launch gaps, as in training)."""

    def __init__(self, torch):
        self.torch = torch

    def warm(self, entry, plan):
        sync = self.torch.cuda.synchronize
        sync()
        calls = 0
        end = time.perf_counter_ns() + plan.warmup_time_ns
        while calls < plan.warmup or time.perf_counter_ns() < end:
            self._call(entry)
            calls += 1
            if calls % 10 == 0:
                sync()  # keep the host from queueing unboundedly ahead
        sync()
        return median(self.burst(entry, 3))

    def _call(self, entry):
        args = entry.setup() if entry.setup is not None else ()
        result = entry.fn(*args)
        del result, args

    def burst(self, entry, n):
        cuda = self.torch.cuda
        cuda.synchronize()
        events = [(cuda.Event(enable_timing=True), cuda.Event(enable_timing=True))
                  for _ in range(n)]
        for start, end in events:
            args = entry.setup() if entry.setup is not None else ()
            start.record()
            result = entry.fn(*args)
            end.record()
            del result, args
        cuda.synchronize()
        return [int(round(s.elapsed_time(e) * 1e6)) for s, e in events]  # elapsed_time: ms


def interleave(entries, plan, timer, on_round=None, rotate_from=None):
    """Times `entries` in `plan.rounds` rounds, each round one burst per entry in list order;
    with `rotate_from=k`, entries[k:] (the rows, after the ceiling primitives) are rotated by
    one place per round, so that no row always runs right after the ceilings (the first row
    after them was seen to pay for what they left behind: 20-35% slower in some rounds).

    Returns (order, records): order[r] lists the keys timed in round r, in the order they ran;
    records[key] is {"calls_per_burst", "warm_ms", "round_calls_ns": [[ns, ...] per round]} or
    {"error": ...} for an entry that raised (it is dropped from the later rounds).
    The garbage collector is off meanwhile, as in `timeit`.
    """
    records = {}
    live = []
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for e in entries:
            try:
                est = timer.warm(e, plan)
            except Exception as exc:  # noqa: BLE001 - a failing entry is reported, not fatal
                records[e.key] = {"error": short_error(exc)}
                continue
            records[e.key] = {"calls_per_burst": plan.calls_per_burst(est), "warm_ms": est / 1e6,
                              "round_calls_ns": []}
            live.append(e)
        order = []
        first = {id(e) for e in entries[:len(entries) if rotate_from is None else rotate_from]}
        for r in range(plan.rounds):
            ran = []
            head = [e for e in live if id(e) in first]
            rest = [e for e in live if id(e) not in first]
            shift = r % len(rest) if rest else 0
            for e in head + rest[shift:] + rest[:shift]:
                rec = records[e.key]
                try:
                    rec["round_calls_ns"].append(timer.burst(e, rec["calls_per_burst"]))
                    ran.append(e.key)
                except Exception as exc:  # noqa: BLE001
                    records[e.key] = {"error": short_error(exc)}
                    live.remove(e)
            order.append(ran)
            if on_round is not None:
                on_round(r)
        return order, records
    finally:
        if gc_was_enabled:
            gc.enable()


def summarize(record, nbytes):
    """Medians of one entry's record: the median over rounds of each round's median call."""
    if "error" in record:
        return {"error": record["error"]}
    rounds = record["round_calls_ns"]
    per_round = [median(r) / 1e6 for r in rounds]
    calls = [t for r in rounds for t in r]
    med = median(per_round)
    return {
        "median_ms": med,
        "min_ms": min(calls) / 1e6,
        "mean_ms": sum(calls) / len(calls) / 1e6,
        "reps": len(calls),
        "rounds": len(rounds),
        "calls_per_burst": record["calls_per_burst"],
        "round_median_ms": [round(x, 6) for x in per_round],
        "round_calls_ns": rounds,
        "bytes": nbytes,
        "gbps": nbytes / (med * 1e-3) / 1e9 if med > 0 else math.inf,
    }
