"""Wall-clock timing shared by the CPU benchmarks."""
from __future__ import annotations

import time


def best_time(fn, repeat: int = 1):
    """(best wall time in seconds over ``repeat`` calls of ``fn``, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out
