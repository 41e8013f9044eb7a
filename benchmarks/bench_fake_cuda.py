"""`python -m stochdepth.bench --device cuda` with torch.cuda faked over CPU tensors.

CUDA events become wall-clock stamps, the "GPU" is the CPU (device ordinal -1, 1 MiB of L2) and
build_info claims a CUDA build. Only the plumbing of the CUDA mode is exercised (builders,
autograd rows, ceilings, JSON), so that its one run on a real GPU does not die of a typo; the
numbers are CPU numbers. Used by `benchmarks/gpu_check.sh --dry-run` and tests/test_bench.py.
It relies on stochdepth accepting stream=0 with CPU arrays.

    python benchmarks/bench_fake_cuda.py --device cuda --quick --no-compile --json out.json
"""

import sys
import time
import types

import stochdepth.bench.cuda_rows as cuda_rows
import torch
from stochdepth.bench import main

import stochdepth


class Event:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter_ns()

    def elapsed_time(self, end):
        return (end.t - self.t) / 1e6


props = types.SimpleNamespace(name="dry run (CPU)", major=0, minor=0, multi_processor_count=1,
                              total_memory=2**30, L2_cache_size=2**20)
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.get_device_properties = lambda i: props
torch.cuda.synchronize = lambda *a, **k: None
torch.cuda.Event = Event
torch.cuda.current_stream = lambda *a, **k: types.SimpleNamespace(cuda_stream=0)
torch.cuda.empty_cache = lambda: None
cuda_rows.cuda_device = lambda t: (t.device("cpu"), -1)
info = dict(stochdepth.build_info(), cuda_compiled=True, cuda_device_count=1)
stochdepth.build_info = lambda: info
sys.exit(main(sys.argv[1:]))
