"""Timing shared by the CPU benchmarks."""
from __future__ import annotations

import time


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
