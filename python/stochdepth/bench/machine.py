"""Facts about the machine stored beside every number: CPU, cores, memory, last-level cache.

The last-level cache decides whether a case measures memory or cache bandwidth
(docs/design.md, "Measuring speed"): it is read from sysfs (size of one instance times the
number of instances) and from `lscpu`, and the larger is kept, so that the "fits in cache" flag
errs towards saying so.
"""

from __future__ import annotations

import glob
import os
import platform
import subprocess
import sys
import time

from stochdepth.bench._util import jsonable, short_error

__all__ = ["gpu_cache", "last_level_cache", "machine_info", "mem_available_bytes"]

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _size_bytes(text):
    """'32768K', '32M', '1G' or a plain byte count -> bytes (None if unreadable)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * _UNITS[unit])
    except ValueError:
        return None


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def _llc_sysfs():
    """(level, bytes of one instance, number of instances) of the highest data cache level."""
    best = {}  # level -> (size, set of shared_cpu_list strings)
    for index in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*"):
        try:
            if _read(f"{index}/type") == "Instruction":
                continue
            level = int(_read(f"{index}/level"))
            size = _size_bytes(_read(f"{index}/size"))
            shared = _read(f"{index}/shared_cpu_list")
        except (OSError, ValueError):
            continue
        if size:
            entry = best.setdefault(level, (size, set()))
            entry[1].add(shared)
    if not best:
        return None
    level = max(best)
    size, instances = best[level]
    return level, size, len(instances)


def _llc_lscpu():
    """(level, bytes over all instances) of the highest cache level that `lscpu -C` lists."""
    try:
        proc = subprocess.run(["lscpu", "-B", "-C=LEVEL,ALL-SIZE,TYPE"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    best = None
    for line in proc.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 3 or parts[2] == "Instruction":
            continue
        try:
            level, size = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best


def last_level_cache():
    """{'bytes', 'level', 'per_instance_bytes', 'instances', 'sysfs_bytes', 'lscpu_bytes',
    'text'}; 'bytes' is None when neither source says anything."""
    sysfs = _llc_sysfs()
    lscpu = _llc_lscpu()
    info = {"level": None, "per_instance_bytes": None, "instances": None,
            "sysfs_bytes": None, "lscpu_bytes": None}
    if sysfs:
        info["level"], info["per_instance_bytes"], info["instances"] = sysfs
        info["sysfs_bytes"] = sysfs[1] * sysfs[2]
    if lscpu:
        info["level"] = max(info["level"] or 0, lscpu[0])
        info["lscpu_bytes"] = lscpu[1]
    sizes = [s for s in (info["sysfs_bytes"], info["lscpu_bytes"]) if s]
    info["bytes"] = max(sizes) if sizes else None
    if info["bytes"] is None:
        info["text"] = "unknown (no sysfs cache entries, no lscpu)"
    else:
        detail = []
        if sysfs:
            detail.append(f"sysfs {sysfs[2]} x {sysfs[1] / 2**20:.1f} MiB")
        if lscpu:
            detail.append(f"lscpu {lscpu[1] / 2**20:.1f} MiB")
        info["text"] = (f"L{info['level']} {info['bytes'] / 2**20:.1f} MiB "
                        f"({'; '.join(detail)})")
    return info


def gpu_cache(props):
    """The same dict for a GPU: its L2 (torch's device properties), the last level it has."""
    size = getattr(props, "L2_cache_size", None)
    if not size:
        return {"bytes": None, "level": 2, "text": "unknown (torch gives no L2_cache_size)"}
    return {"bytes": int(size), "level": 2, "text": f"L2 {size / 2**20:.1f} MiB"}


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
                    return sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
                                           "avx512vl", "avx512_bf16", "avx512_fp16", "sse4_2"})
    except OSError:
        pass
    return []


def _meminfo(key):
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def mem_available_bytes():
    return _meminfo("MemAvailable")


def machine_info(torch=None, stochdepth_module=None):
    """CPU, cores, memory, last-level cache, versions, stochdepth.build_info(), the date."""
    import numpy as np

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    total = _meminfo("MemTotal")
    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "mem_total_gib": round(total / 2**30, 1) if total else None,
        "llc": last_level_cache(),
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
                "llc": gpu_cache(props),
            }
    else:
        info["torch"] = None
    if stochdepth_module is not None:
        info["stochdepth"] = getattr(stochdepth_module, "__version__", None)
        try:
            info["stochdepth_build_info"] = jsonable(stochdepth_module.build_info())
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info["stochdepth_build_info"] = {"error": short_error(exc)}
    return info
