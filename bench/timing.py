"""Timing and report writing shared by the CPU benchmarks."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def best_time(fn, repeat: int = 1, clock=time.perf_counter):
    """(best time in seconds by ``clock`` over ``repeat`` calls of ``fn``, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = clock()
        out = fn()
        best = min(best, clock() - t0)
    return best, out


def interleaved(fns, repeat: int):
    """``repeat`` rounds of every function in turn (a b a b ..., so that all see the same load):
    (per function its wall times, its process CPU times, its last result)."""
    wall, cpu, outs = [[] for _ in fns], [[] for _ in fns], [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            c0, t0 = time.process_time(), time.perf_counter()
            outs[i] = fn()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return wall, cpu, outs


def machine_line(load0: float, load1: float) -> str:
    """A report's line naming this machine, with the 1-min load average at a run's start and end."""
    from eqcore.machine import cpu_name

    return (f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; 1-min load average at start "
            f"{load0:.2f}, at end {load1:.2f}")


def write_report(text: str, out: Path, *, echo: bool = True) -> int:
    """Write a benchmark's report to ``out`` (its folder made), print it (or where it went); 0."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text if echo else f"wrote {out}")
    return 0
