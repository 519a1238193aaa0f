"""Lloyd's alternating solver (:mod:`eqcore.solvers.lloyd`) compiled with Numba for the CPU.

Parallel over chunks of rows, one group at a time in a per-chunk workspace of a few
group-length vectors (no (rows, cols) temporaries). It does the reference's arithmetic in the
reference's order, so scales and zero-points are bit-identical to it:

* every per-element product and quotient is the same IEEE operation (float32 quotients and
  levels, float64 products grouped as NumPy groups them, e.g. ``(w * lev) * lev``);
* each group sum is NumPy's: ``0.0 + pairwise(terms over the padded group)``, NumPy's
  pairwise summation (runs of < 8 in order, blocks of <= 128 in 8 strided accumulators, longer
  runs halved at a multiple of 8), over all ``g`` positions of the padded group, the padding
  and the outliers contributing exact zeros as in the reference;
* without column scales it uses columns of 1.0 and without a mask a mask of ones, which changes
  no result (x / 1, v * 1, real * e and 1 * (1 * 1) are exact).

It stops a group early once its parameters repeat (the same (s, z) as one or two alternations
before): each alternation is a function of (s, z) alone, so every later candidate would be one
already scored, and the best is kept only on a strictly lower loss; the result is the one the
reference's 20 alternations give.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from .. import cache
from ..layout import GRID_ASYMMETRIC, GRID_CODEBOOK, GRID_SYMMETRIC, GRIDS, group_layout, max_scale
from .lloyd import ITERS

cache.install_numba_locator()

_jit = njit(error_model="numpy")  # no zero-divisor tests: every divisor here is tested > 0 (or IEEE as in NumPy)
LINEAR_MIDS = 15  # codebooks of up to 16 levels: count the midpoints below t in vectorised passes


@_jit
def _leaf(a, lo, n):
    """NumPy's pairwise sum of a run a[lo:lo + n] of at most 128 (numpy/_core/src/umath/loops_utils.h.src):
    in order below 8, else 8 strided accumulators combined as a tree, then the rest in order."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    end = lo + n - n % 8
    for i in range(lo + 8, end, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for k in range(end, lo + n):
        res += a[k]
    return res


def sum_plan(n: int) -> np.ndarray:
    """NumPy's pairwise summation of n values as a postfix program (int64): leaves (lo, len),
    runs of at most 128 in order, and a -1 for each sum of the last two results; runs longer than
    128 are halved at a multiple of 8, as NumPy does (no recursion in the compiled code: Numba
    cannot cache recursive functions)."""
    prog = []

    def walk(lo, m):
        if m <= 128:
            prog.extend((lo, m))
            return
        m2 = m // 2
        m2 -= m2 % 8
        walk(lo, m2)
        walk(lo + m2, m - m2)
        prog.extend((-1, -1))

    walk(0, n)
    return np.array(prog, np.int64)


@_jit
def _plan_sum(a, plan, stack):
    """``a``'s sum by ``plan`` (:func:`sum_plan`) as NumPy computes it for a row of a C-contiguous
    float64 array: 0.0 + the pairwise sum; ``stack``: float64 workspace, a slot per level."""
    sp = 0
    for k in range(0, plan.shape[0], 2):
        lo = plan[k]
        if lo >= 0:
            stack[sp] = _leaf(a, lo, plan[k + 1])
            sp += 1
        else:
            stack[sp - 2] = stack[sp - 2] + stack[sp - 1]
            sp -= 1
    return 0.0 + stack[0]


def np_sum(a, n: int) -> float:
    """``a[:n].sum()`` as NumPy computes it for a row of a C-contiguous float64 array."""
    return _plan_sum(np.ascontiguousarray(a, np.float64), sum_plan(n), np.empty(64, np.float64))


@_jit
def _min64(a, b):
    """np.minimum for float64 scalars (NaN in a propagates)."""
    return b if a > b else a


@_jit
def _params(s, m, smax, asym):
    """The reference's params: float32 s in (0, smax] (1.0 where not positive), z = -m / s."""
    s32 = np.float32(_min64(s, smax))
    if not s32 > 0:
        s32 = np.float32(1.0)
    z32 = np.float32(-m / np.float64(s32)) if asym else np.float32(0.0)
    return s32, z32


@_jit
def _codes_linear(t, n, mids, u):
    """u[i] = #{k: mids[k] < t[i]}, one vectorised pass per midpoint."""
    for i in range(n):
        u[i] = 0
    for k in range(mids.shape[0]):
        mk = mids[k]
        for i in range(n):
            u[i] += np.int32(mk < t[i])


@_jit
def _codes_search(t, n, mids, u):
    """u[i] = #{k: mids[k] < t[i]} by a branch-free binary search (mids increasing)."""
    nm = mids.shape[0]
    for i in range(n):
        ti = t[i]
        base = 0
        size = nm
        while size > 1:
            half = size // 2
            if mids[base + half - 1] < ti:
                base += half
            size -= half
        u[i] = base + np.int32(mids[base] < ti)


@_jit
def _score(grid, xr, yv, cv, rv, wv, n, plan, stack, s, z, qmin, qmax, nmax, mids, cb, t, u, T0, T1, T2, T3):
    """(loss, sums...) of one padded group at (s, z): the reference's score and the sums its next
    least-squares step takes, from the same codes. Codebook / symmetric: (loss, sum w lev lev,
    sum w lev y, 0); asymmetric: (loss, sum w u, sum w u u, sum w u y), u = lev + z."""
    if grid == GRID_CODEBOOK:
        for i in range(n):
            t[i] = yv[i] / s
        if mids.shape[0] <= LINEAR_MIDS:
            _codes_linear(t, n, mids, u)
        else:
            _codes_search(t, n, mids, u)
        for i in range(n):
            lv = cb[u[i]]
            v = np.float32(np.float32(lv * s) * cv[i])
            e = np.float64(v) - np.float64(xr[i])
            T0[i] = (rv[i] * e) * e
            l64 = np.float64(lv)
            wl = wv[i] * l64
            T1[i] = wl * l64
            T2[i] = wl * np.float64(yv[i])
    elif grid == GRID_SYMMETRIC:
        for i in range(n):
            q = min(max(np.rint(np.float32(yv[i] / s)), qmin), qmax)
            lv = np.float32(np.float32(q - qmin) + qmin)
            v = np.float32(np.float32(lv * s) * cv[i])
            e = np.float64(v) - np.float64(xr[i])
            T0[i] = (rv[i] * e) * e
            l64 = np.float64(lv)
            wl = wv[i] * l64
            T1[i] = wl * l64
            T2[i] = wl * np.float64(yv[i])
    else:
        z64 = np.float64(z)
        for i in range(n):
            q = min(max(np.rint(np.float32(np.float32(yv[i] / s) + z)), np.float32(0.0)), nmax)
            lv = np.float32(q - z)
            v = np.float32(np.float32(lv * s) * cv[i])
            e = np.float64(v) - np.float64(xr[i])
            T0[i] = (rv[i] * e) * e
            uu = np.float64(lv) + z64
            wu = wv[i] * uu
            T1[i] = wu
            T2[i] = wu * uu
            T3[i] = wu * np.float64(yv[i])
    loss, s1, s2 = _plan_sum(T0, plan, stack), _plan_sum(T1, plan, stack), _plan_sum(T2, plan, stack)
    s3 = _plan_sum(T3, plan, stack) if grid == GRID_ASYMMETRIC else 0.0
    return loss, s1, s2, s3


@_jit
def _same(s, z, s_, z_):
    """(s, z) bit for bit equal to (s_, z_) (s > 0; z's sign of zero included)."""
    return s == s_ and z == z_ and math.copysign(1.0, z) == math.copysign(1.0, z_)


@_jit
def _solve_group(grid, xr, yv, cv, rv, wv, n, plan, stack, bits, qmin, qmax, top, smax, mids, cb, iters, t, u, T0, T1, T2, T3):
    """(s, z) float32 of one group: the reference's start, alternations and best candidate."""
    asym = grid == GRID_ASYMMETRIC
    nmax = np.float32((1 << bits) - 1)
    if asym:  # min-max over the kept entries; 0 if none
        lo32 = np.float32(np.inf)
        hi32 = np.float32(-np.inf)
        for i in range(n):
            if rv[i] > 0:
                lo32 = min(lo32, yv[i])
                hi32 = max(hi32, yv[i])
        lo = np.float64(lo32) if np.isfinite(lo32) else 0.0
        hi = np.float64(hi32) if np.isfinite(hi32) else 0.0
        nl = (1 << bits) - 1
        flat = hi <= lo
        s = abs(lo) / nl if flat else (hi - lo) / nl
        if not s > 0:
            s = 1.0
        m = 0.0 if (flat and lo > 0) else lo
    else:  # max-abs over the whole group
        amax = np.float32(0.0)
        for i in range(n):
            amax = max(amax, abs(yv[i]))
        a64 = np.float64(amax)
        s = a64 / top if a64 > 0 else 1.0
        m = 0.0
    s32, z32 = _params(s, m, smax, asym)
    best_loss, s1, s2, s3 = _score(grid, xr, yv, cv, rv, wv, n, plan, stack, s32, z32, qmin, qmax, nmax, mids, cb,
                                   t, u, T0, T1, T2, T3)
    best_s, best_z = s32, z32
    if asym:  # sum w and sum w y: the same every alternation
        for i in range(n):
            T0[i] = wv[i]
            T1[i] = wv[i] * np.float64(yv[i])
        sw, sy = _plan_sum(T0, plan, stack), _plan_sum(T1, plan, stack)
    else:
        sw, sy = 0.0, 0.0
    ps, pz = np.float32(np.nan), np.float32(np.nan)  # the parameters one alternation before
    for _ in range(iters):
        s_old = np.float64(s32)
        if asym:
            su, suu, suy = s1, s2, s3
            swuu = sw * suu
            det = swuu - su * su
            ok = det > 1e-12 * (swuu if not swuu < 1e-300 else 1e-300)
            s_new = (sw * suy - su * sy) / det if ok else s_old
            if not s_new > 0:
                s_new = s_old
            m_new = (sy - s_new * su) / (sw if sw > 0 else 1.0) if ok else -np.float64(z32) * s_new
            ns, nz = _params(s_new, m_new, smax, True)
        else:
            a, b = s1, s2
            ns, nz = _params(b / a if (a > 0 and b > 0) else s_old, 0.0, smax, False)
        if _same(ns, nz, s32, z32) or _same(ns, nz, ps, pz):
            break  # every later candidate repeats one already scored
        ps, pz = s32, z32
        s32, z32 = ns, nz
        loss, s1, s2, s3 = _score(grid, xr, yv, cv, rv, wv, n, plan, stack, s32, z32, qmin, qmax, nmax, mids, cb,
                                  t, u, T0, T1, T2, T3)
        if loss < best_loss:
            best_loss, best_s, best_z = loss, s32, z32
    return best_s, best_z


@njit(parallel=True, cache=True, error_model="numpy")
def _lloyd_kernel(x, col, keep, g, plan, grid, bits, qmin, qmax, top, smax, mids, cb, iters, chunks, out_s, out_z):
    rows, cols = x.shape
    n_groups = out_s.shape[1]
    has_keep = keep.shape[0] > 0
    per = (rows + chunks - 1) // chunks
    for k in prange(chunks):  # one workspace per chunk of rows
        yv = np.empty(g, np.float32)
        cv = np.empty(g, np.float32)
        rv = np.empty(g, np.float64)
        wv = np.empty(g, np.float64)
        t = np.empty(g, np.float32)
        u = np.empty(g, np.int32)
        T0 = np.zeros(g, np.float64)  # zero beyond a short last group: the padding's terms
        T1 = np.zeros(g, np.float64)
        T2 = np.zeros(g, np.float64)
        T3 = np.zeros(g, np.float64)
        stack = np.empty(64, np.float64)
        for r in range(k * per, min(rows, k * per + per)):
            for j in range(n_groups):
                c0 = j * g
                n = min(g, cols - c0)
                xr = x[r, c0:c0 + n]
                for i in range(n):
                    c = col[c0 + i]
                    yv[i] = xr[i] / c
                    cv[i] = c
                    re = 1.0 if (not has_keep or keep[r, c0 + i]) else 0.0
                    rv[i] = re
                    c64 = np.float64(c)
                    wv[i] = re * (c64 * c64)
                for i in range(n, g):
                    T0[i] = 0.0
                    T1[i] = 0.0
                    T2[i] = 0.0
                    T3[i] = 0.0
                s, z = _solve_group(grid, xr, yv, cv, rv, wv, n, plan, stack, bits, qmin, qmax, top, smax, mids, cb, iters,
                                    t, u, T0, T1, T2, T3)
                out_s[r, j] = s
                out_z[r, j] = z


def solve(x, config, smax=None, codebook=None, col=None, keep=None):
    """:func:`eqcore.solvers.lloyd.solve` on the CPU, bit-identical: (scales, zeros) float32
    (rows, n_groups), zeros None except for the asymmetric grid."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    rows, cols = x.shape
    g, n_groups = group_layout(cols, config.group_size)
    smax = float(max_scale(np.float32, config.qmax) if smax is None else smax)
    grid = GRIDS.index(config.grid)
    c32 = np.ones(cols, np.float32) if col is None else np.ascontiguousarray(np.asarray(col, dtype=np.float32))
    kp = np.zeros((0, 0), np.bool_) if keep is None else np.ascontiguousarray(np.asarray(keep, dtype=np.bool_))
    if grid == GRID_CODEBOOK:
        cb = np.ascontiguousarray(np.asarray(codebook, dtype=np.float32))
        mids = ((cb[:-1] + cb[1:]) * np.float32(0.5)).astype(np.float32)
        top = float(np.abs(cb).max())
    else:
        cb = mids = np.zeros(1, np.float32)
        top = float(config.qmax)
    qmin, qmax = config.qmin, config.qmax
    out_s = np.empty((rows, n_groups), np.float32)
    out_z = np.empty((rows, n_groups), np.float32)
    chunks = max(1, min(rows, 4 * numba.get_num_threads()))
    _lloyd_kernel(x, c32, kp, g, sum_plan(g), grid, config.bits, np.float32(qmin), np.float32(qmax), top, smax, mids, cb, ITERS,
                  chunks, out_s, out_z)
    return out_s, (out_z if grid == GRID_ASYMMETRIC else None)
