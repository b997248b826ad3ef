"""Timing, peak memory, copy bandwidth and the record of where a measurement was taken."""

import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

# Larger than any current GPU's L2 cache: zeroing it between timed calls evicts their inputs.
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def time_cpu(fn: Callable, warmup: int, reps: int, min_seconds: float) -> List[float]:
    """Seconds per call on the host's monotonic clock, warm-up excluded.

    Runs at least ``reps`` calls and keeps going (up to 10x ``reps``) until ``min_seconds``
    have been spent, so fast calls get more samples.
    """
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_seconds and len(times) < 10 * reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_cuda(fn: Callable, warmup: int, reps: int) -> List[float]:
    """Seconds per call from CUDA events, with the L2 cache flushed before each call."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]


def time_fn(fn: Callable, device: torch.device, warmup: int, reps: int, min_seconds: float) -> List[float]:
    if device.type == "cuda":
        return time_cuda(fn, warmup, reps)
    return time_cpu(fn, warmup, reps, min_seconds)


def rel_err(outputs, expected) -> float:
    """Largest ||out - ref|| / ||ref|| over a step's outputs, in float64."""
    worst = 0.0
    for out, ref in zip(outputs, expected):
        ref64 = ref.detach().double()
        diff = (out.detach().double() - ref64).norm().item()
        worst = max(worst, diff / max(ref64.norm().item(), 1e-30))
    return worst


def _nbytes(outputs) -> int:
    return sum(t.numel() * t.element_size() for t in outputs)


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's C++ side logs every start and stop to fd 2; keep the table readable.
    Python exceptions are unaffected."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable) -> Tuple[int, tuple]:
    """Peak of the bytes allocated during one call, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    with _native_stderr_silenced():
        activities = [ProfilerActivity.CPU]
        with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
            outputs = fn()
        timeline = MemoryProfileTimeline(prof._memory_profile()).timeline
    live = peak = 0
    for _, action, _, nbytes in timeline:
        if action == Action.CREATE:
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak, outputs


def peak_extra_bytes(fn: Callable, device: torch.device) -> Tuple[Optional[int], Optional[str]]:
    """Peak memory of one call beyond its inputs (allocated before) and its outputs.

    Returns (bytes, None), or (None, why it could not be measured).
    """
    gc.collect()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            outputs = fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak, outputs = _cpu_peak_bytes(fn)
    except Exception as exc:  # the profiler's memory timeline is a private API
        return None, f"{type(exc).__name__}: {exc}"
    return max(peak - _nbytes(outputs), 0), None


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> Dict:
    """A large device-to-device copy: the practical bandwidth ceiling, bytes read + written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=reps, min_seconds=0.5)
    median = statistics.median(times)
    return {"bytes_moved": 2 * nbytes, "times_s": times, "median_s": median, "gbps": 2 * nbytes / median / 1e9}


def _git(*args) -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> Dict:
    """Device, versions and commit, saved beside every set of raw timings."""
    import tome_kernels

    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "tome_kernels": tome_kernels.__version__,
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_info = {"type": "cuda", "name": props.name, "sm_count": props.multi_processor_count,
                       "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    else:
        device_info = {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": device_info,
        "versions": versions,
        "commit": {"sha": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "host": platform.node(),
        "backends": {name: s.reason or "available" for name, s in tome_kernels.available_backends().items()},
    }


def save_results(results: Dict, out_dir: str, prefix: str = "") -> str:
    """Write ``results`` (with "device" and "created" as ``environment()`` gives them) to
    <out_dir>/<prefix><device type>_<device name>_<UTC time>.json; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    device = re.sub(r"[^a-z0-9]+", "-", results["device"]["name"].lower()).strip("-")
    stamp = results["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = os.path.join(out_dir, f"{prefix}{results['device']['type']}_{device}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return path


def load_average() -> Optional[List[float]]:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def machine(load_before: Optional[List[float]]) -> Dict:
    """How busy the machine was around a run and how many threads it ran with: a timing from
    a busy machine, or from one thread where the record had two, is not the same figure."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(), "usable_cpus": usable,
        "load_before": load_before, "load_after": load_average(),
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                    "env": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}},
    }


def cpu_snapshot() -> Optional[Tuple[float, float, float]]:
    """(monotonic seconds, CPU seconds the whole machine has been busy, CPU seconds of this
    process), or None where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    # Steal counts as busy: time the hypervisor gave this VM's CPUs to another machine.
    busy = sum(ticks) - ticks[3] - ticks[4]
    own = os.times()
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


# Below this, the clock ticks (10 ms) that /proc/stat counts in are too coarse for a share.
_MIN_WINDOW_S = 0.2


def others_cpu_share(before, after) -> Optional[float]:
    """The share of the machine's CPU time that other processes (compile workers included)
    used between two ``cpu_snapshot()``s, or None when it cannot be told."""
    if before is None or after is None or after[0] - before[0] < _MIN_WINDOW_S:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others) / ((after[0] - before[0]) * (os.cpu_count() or 1))
