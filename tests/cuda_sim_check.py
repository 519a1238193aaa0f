"""Run eqcore.cuda_scales on the Numba CUDA simulator against the NumPy reference.

Run as a script (the simulator must be enabled before numba.cuda is imported):
    python tests/cuda_sim_check.py
Prints one line per case and exits non-zero on the first mismatch.
"""
import os
import sys
import time

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
# The simulator runs each CUDA thread as a Python thread, and they hand over to one another at
# every barrier: kept on one core, the handovers need no cross-core wake-up. On a 2-core VM (Zen 3,
# 2026-12-02) the cases took 119 s spread over both cores and 9 s on one.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np

from eqcore.solvers import adam_cuda as cuda_scales
from eqcore.solvers import exact, exact_cuda
from eqcore.config import QuantConfig
from eqcore.dtypes import bfloat16
from eqcore.solvers.adam import optimize_scales as optimize_scales_reference
from eqcore.solvers.objective import reconstruction_loss

# (rows, cols, bits, group_size, steps): one-warp and multi-warp blocks, non-divisor
# groups (ragged last group), per-row scales, zero rows, steps 0; the last flag
# forces the global-memory path (group data re-read every step).
# Steps: a few carry Adam's moments from step to step; every further step runs the same code, and
# each costs the simulator 0.7-7.5 s a case (2026-12-01: 210 s for the list with 4-12 steps a case)
CASES = [
    (3, 40, 4, None, 4, False),
    (2, 70, 3, 32, 4, False),
    (2, 40, 2, 16, 3, False),
    (2, 70, 8, None, 4, False),
    (2, 40, 4, 13, 0, False),
    (2, 300, 4, None, 3, False),  # 128 threads: 4 warps, cross-warp reduction
    (1, 210, 3, 200, 3, False),  # 64 threads; last group of 10 leaves most threads idle
    (2, 30, 8, 7, 3, False),
    (2, 70, 4, 64, 3, True),  # global-memory fallback path
    (1, 24, 4, None, 3, False, 0.004),  # a scale cap (smax) that binds, as for weights near the dtype max
]


def make(rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[rng.random((rows, cols)) < 0.05] = 0.0  # zeroed outliers
    if rows > 1:
        x[0] = 0.0  # an all-zero row
    return x


def main() -> int:
    assert cuda_scales.SIMULATOR, "NUMBA_ENABLE_CUDASIM was not honoured"
    t0 = time.time()
    limit = cuda_scales._MAX_SHARED_FLOATS
    for i, (rows, cols, bits, group, steps, use_global, *cap) in enumerate(CASES):
        smax = np.float32(cap[0]) if cap else None
        cfg = QuantConfig(bits=bits, group_size=group, steps=steps, lr=5e-3)
        x = make(rows, cols, i)
        g = cols if group is None else min(group, cols)
        cuda_scales._MAX_SHARED_FLOATS = g - 1 if use_global else limit
        threads, in_shared = cuda_scales.launch_config(g)
        assert in_shared != use_global
        t1 = time.time()
        got = cuda_scales.optimize_scales(x, cfg, smax)
        t1 = time.time() - t1
        ref = optimize_scales_reference(x, cfg, smax)
        if smax is not None:
            assert ref.max() == smax, "the cap should bind in this case"
        ok = got.dtype == np.float32 and got.shape == ref.shape and np.array_equal(got, ref)
        lg = reconstruction_loss(x, got, cfg).sum()
        lr_ = reconstruction_loss(x, ref, cfg).sum()
        print(f"{rows}x{cols} bits={bits} group={group} steps={steps} smax={smax} threads={threads} "
              f"{'shared' if in_shared else 'global'}: "
              f"{'exact' if ok else 'MISMATCH'} loss gpu={lg:.6e} ref={lr_:.6e} ({t1:.1f}s)")
        if not ok:
            print("got", got, "\nref", ref)
            return 1
    print(f"all {len(CASES)} cases exact in {time.time() - t0:.1f}s")
    return exact_cases()


# the exact solver: (rows, cols, bits, group_size, workspace cap[, pool]); a cap of 4 forces many
# pieces; a pool: the row's entries drawn from that many bfloat16 values, so that the sweep goes
# over distinct (magnitude, top) pairs with counts (512 entries at 8 bits take that path)
EXACT_CASES = [(2, 24, 4, None, None), (2, 20, 2, 8, 4), (1, 16, 8, None, None), (2, 12, 3, 5, 2),
               (1, 10, 4, None, 1), (3, 7, 3, 1, None), (1, 512, 8, None, None, 40)]


def exact_cases() -> int:
    t0 = time.time()
    for i, (rows, cols, bits, group, cap, *pool) in enumerate(EXACT_CASES):
        cfg = QuantConfig(bits=bits, group_size=group)
        x = make(rows, cols, 100 + i)
        if pool:
            rng = np.random.default_rng(i)
            values = rng.choice(x[x != 0], pool[0]) * rng.choice([-1, 1], pool[0])
            x = rng.choice(values, (rows, cols)).astype(bfloat16).astype(np.float32)
        got = exact_cuda.optimize_scales(x, cfg, cap=cap)
        ref = exact.optimize_scales(x, cfg)
        lg, lr_ = reconstruction_loss(x, got, cfg), reconstruction_loss(x, ref, cfg)
        ok = got.dtype == np.float32 and got.shape == ref.shape and np.all(lg <= lr_ * (1 + 1e-12))
        print(f"exact {rows}x{cols} bits={bits} group={group} cap={cap} pool={pool}: {'exact' if ok else 'MISMATCH'} "
              f"same scales {np.mean(got == ref):.2f} loss gpu={lg.sum():.6e} ref={lr_.sum():.6e}")
        if not ok:
            print("got", got, "\nref", ref)
            return 1
    print(f"all {len(EXACT_CASES)} exact-solver cases exact in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
