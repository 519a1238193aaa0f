"""The exact scale solver compiled with Numba for the CPU, parallel over (row, group).

The body is :mod:`eqcore.solvers.exact_sweep` (shared with the CUDA kernel); the result equals
the reference's (:mod:`eqcore.solvers.exact`): the float32 scale of least contract loss.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import float32, njit, prange

from ..backends.numba import quant_code
from ..layout import group_layout, max_scale
from .exact_sweep import BLOCKS, make_group_exact, rounding_bounds

BOUNDS = rounding_bounds()


@njit
def _code(a, s, top):
    return quant_code(a, s, float32(0.0), top)


@njit
def _up(f):
    """The next float32 above positive finite ``f`` (one more in its bit pattern)."""
    return np.int32(np.float32(f).view(np.int32) + 1).view(np.float32)


@njit
def _down(f):
    """The next float32 below positive ``f``."""
    return np.int32(np.float32(f).view(np.int32) - 1).view(np.float32)


def _view(source, target):
    """A compiled function: a ``source`` value's bit pattern read as a ``target`` value."""
    @njit
    def view(v):
        return source(v).view(target)
    return view


_bits, _from_bits = _view(np.float32, np.int32), _view(np.int32, np.float32)
_bits64, _from_bits64 = _view(np.float64, np.int64), _view(np.int64, np.float64)


# error_model="numpy": no zero-divisor test (and exception exit) in each division, which kept LLVM
# from if-converting exact_thresholds' loop; no divisor here is ever 0, so no result changes
_jit = njit(error_model="numpy")
group_exact = make_group_exact(_jit, njit(fastmath={"reassoc"}, error_model="numpy"), _code, _up, _down, _bits,
                               _from_bits, _bits64, _from_bits64, njit(lambda v: np.trunc(v)))


@njit
def workspace(g, cap):
    """The per-thread workspace of :data:`group_exact` for groups of at most g and cap thresholds
    per piece: (wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk, wc, wA, wB, ks, kq), in its argument order.
    The distinct pairs' wd is allocated last, so the sweep's arrays keep their old places relative
    to one another (placed before them it measured about 1% slower on 384-column rows, 1 thread,
    2026-12-01, near the machine's noise)."""
    wa, wtop, wcu, wcw = np.empty(g, np.float32), np.empty(g, np.float32), np.empty(g, np.int32), np.empty(g, np.int32)
    wt, wk, wb = np.empty(cap + 1, np.float32), np.empty(cap + BLOCKS, np.int32), np.empty(cap, np.int32)
    st, sk, wc = np.empty(cap, np.float32), np.empty(cap, np.int32), np.empty(2 * cap + 1, np.int32)
    wA, wB, ks, kq = np.empty(cap + 1, np.float64), np.empty(cap + 1, np.float64), np.empty(1, np.float32), np.empty(1)
    wd = np.empty((3, g + 1), np.float32)
    return wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk, wc, wA, wB, ks, kq


@njit(parallel=True, cache=True)
def _exact_kernel(flat, rows, cols, g, n_groups, qmax, smax, chunks, cap, bounds, out):
    total = rows * n_groups
    per = (total + chunks - 1) // chunks
    g = min(g, cols)
    for c in prange(chunks):  # one workspace per chunk, reused by its groups
        # unpacked once per chunk: a slice of the tuple at each call would build a tuple per group
        wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk, wc, wA, wB, ks, kq = workspace(g, cap)
        for k in range(c * per, min(total, (c + 1) * per)):
            r = k // n_groups
            lo = (k - r * n_groups) * g
            n = min(g, cols - lo)
            out[k] = group_exact(flat, r * cols + lo, n, qmax, smax, wa, wtop, wcu, wcw, wd, wt, wk, wb,
                                 st, sk, wc, wA, wB, bounds, ks, kq)


def default_cap(g: int) -> int:
    """Thresholds per workspace piece for groups of g (any cap >= 1 gives the same scales)."""
    return 4 * g + 64


def optimize_scales(x: np.ndarray, config, smax=None, cap=None) -> np.ndarray:
    """Exact scales (rows, n_groups) float32; see :func:`eqcore.solvers.exact.optimize_scales`.
    ``cap``: thresholds per workspace piece (default 4 * group + 64; any cap >= 1 gives the
    same scales)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, config.group_size)
    out = np.empty(rows * n_groups, dtype=np.float32)
    smax = max_scale(np.float32, config.qmax) if smax is None else np.float32(smax)
    chunks = max(1, min(rows * n_groups, 8 * numba.get_num_threads()))
    cap = default_cap(g) if cap is None else max(1, int(cap))
    _exact_kernel(x.reshape(-1), rows, cols, g, n_groups, np.float32(config.qmax), smax, chunks, cap, BOUNDS,
                  out)
    return out.reshape(rows, n_groups)
