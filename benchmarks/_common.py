"""Shared helpers of the reid_kernels benchmarks: timing, peak memory, tables, JSON.

Generic on purpose (bench_cmalign.py, bench_memory.py, bench_retrieval.py...):

* :func:`time_runs` -- wall time of repeated calls; CUDA events on a GPU, ``perf_counter`` on the CPU;
* :func:`peak_memory` -- extra memory one call needs at its peak (see ``MEMORY_NOTES`` for what
  that means on each device);
* :func:`format_table`, :func:`write_json`, :func:`environment`, :func:`add_common_args`.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

MEMORY_NOTES = {
    "cuda": "peak = torch.cuda.max_memory_allocated() during one call minus the memory allocated before it "
    "(tensors only; the caching allocator's reserve and workspaces outside it are not counted)",
    "cpu": "peak = rise of the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs "
    "after gc and malloc_trim) during one call: every page the call touched that was not resident before "
    "-- torch tensors, BLAS/OpenMP buffers, allocator slack -- at page granularity; approximate, "
    "compare orders of magnitude",
}


# ---------------------------------------------------------------------------
# Command line.


def add_common_args(parser: argparse.ArgumentParser, default_dtype: str = "float32") -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=default_dtype)
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per case (default: 5 CPU, 20 CUDA)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (compiles, caches)")
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="CPU timing clock: wall time (default) or this process's CPU time, which a machine shared with "
        "other jobs disturbs much less; use it with --threads 1 (with more threads it also counts OpenMP threads "
        "spin-waiting, so tiny cases inflate)",
    )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


# ---------------------------------------------------------------------------
# Timing.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2, clock: str = "wall"
) -> List[float]:
    """Seconds per call of ``fn`` for ``repeat`` calls after ``warmup`` untimed ones.

    CUDA: each call is bracketed by CUDA events (GPU time of the queued work); CPU: ``perf_counter``
    (``clock="wall"``) or ``process_time`` (``clock="process"``, CPU seconds of all threads).
    """
    now = time.process_time if clock == "process" else time.perf_counter
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = now()
            fn()
            times.append(now() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------
# Peak memory.


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes one call of ``fn`` needs at its peak above what was in use before (``MEMORY_NOTES``).

    Returns None where the device gives no way to measure it (CPU without Linux /proc).
    """
    if device.type == "cuda":
        synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_heap()
    if not _reset_peak_rss():
        return None
    before = _proc_status_kib("VmRSS")
    fn()
    peak = _proc_status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


# ---------------------------------------------------------------------------
# Output.


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns right-aligned except the first."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def fmt_ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def fmt_ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "-"
    return f"{numerator / denominator:.2f}x"


def fmt_bytes(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.1f}"


def git_commit() -> Optional[str]:
    """The checkout's commit (with "+dirty" when it has uncommitted changes), or None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device) -> Dict[str, object]:
    """Where the numbers come from (goes into the JSON)."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "memory_measure": MEMORY_NOTES[device.type],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    try:
        load = os.getloadavg()
        env["load_average_1m"] = round(load[0], 2)
    except OSError:
        pass
    return env


def write_json(path: str, payload: Dict[str, object]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        # numpy / torch scalars serialise through .item()
        json.dump(payload, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.write("\n")
