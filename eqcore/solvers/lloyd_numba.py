"""Lloyd's alternating solver (:mod:`eqcore.solvers.lloyd`) compiled with Numba for the CPU.

Parallel over chunks of rows, one group at a time in a per-chunk workspace of a few
group-length vectors (no (rows, cols) temporaries); each score runs over the group a summation
leaf (<= 128 entries) at a time: one loop for the entries' terms, then their four leaf sums as
four interleaved <8 x double> chains (:func:`_lanes4`). Codebooks of up to 16 levels find each
level by 15 selects in registers; larger ones (8 bits) by a binary search. It does the
reference's arithmetic in the reference's order, so scales and zero-points are bit-identical:

* every per-element product and quotient is the same IEEE operation (float32 quotients and
  levels, float64 products grouped as NumPy groups them, e.g. ``(w * lev) * lev``);
* each group sum is NumPy's: ``0.0 + pairwise(terms over the padded group)``, NumPy's
  pairwise summation (runs of < 8 in order, blocks of <= 128 in 8 strided accumulators, longer
  runs halved at a multiple of 8), over all ``g`` positions of the padded group, the padding
  and the outliers contributing exact zeros as in the reference (a zero, not 0 * inf, where a
  taken-out entry's grid value overflows);
* without column scales its loops read x alone, and without a mask it uses a mask of ones: the
  reference's x / 1, v * 1, real * e and 1 * (1 * 1) are exact, so neither changes a result.

It stops a group early once its parameters repeat (the same (s, z) as one or two alternations
before): each alternation is a function of (s, z) alone, so every later candidate would be one
already scored, and the best is kept only on a strictly lower loss; the result is the one the
reference's 20 alternations give.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

from .. import cache
from ..layout import GRID_ASYMMETRIC, GRID_CODEBOOK, GRID_SYMMETRIC, GRIDS, group_layout, max_scale
from .lloyd import ITERS

cache.install_numba_locator()

# error_model="numpy": no zero-divisor tests; every divisor is tested > 0 first, or divides as NumPy does (IEEE).
# The hot helpers are inlined into _score at the Numba level: called instead, each call costs reference counts.
_jit = njit(error_model="numpy")
_inline = njit(error_model="numpy", inline="always")
SMALL_MIDS = 15  # codebooks of up to 16 levels (padded to 16): levels by 15 selects in registers


@_inline
def _leaf(a, lo, n):
    """NumPy's pairwise sum of a run a[lo:lo + n] of at most 128 (numpy/_core/src/umath/loops_utils.h.src):
    in order below 8, else 8 strided accumulators combined as a tree, then the rest in order.
    Unsigned indices: no negative-index wraparound tests (twice as fast)."""
    lo, n = uint64(lo), uint64(n)
    one = uint64(1)
    if n < 8:
        res = 0.0
        i = lo
        while i < lo + n:
            res += a[i]
            i += one
        return res
    r0, r1, r2, r3 = a[lo], a[lo + one], a[lo + uint64(2)], a[lo + uint64(3)]
    r4, r5, r6, r7 = a[lo + uint64(4)], a[lo + uint64(5)], a[lo + uint64(6)], a[lo + uint64(7)]
    end = lo + n - n % uint64(8)
    i = lo + uint64(8)
    while i < end:
        r0 += a[i]
        r1 += a[i + one]
        r2 += a[i + uint64(2)]
        r3 += a[i + uint64(3)]
        r4 += a[i + uint64(4)]
        r5 += a[i + uint64(5)]
        r6 += a[i + uint64(6)]
        r7 += a[i + uint64(7)]
        i += uint64(8)
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < lo + n:
        res += a[i]
        i += one
    return res


@intrinsic
def _lanes4(typingctx, b0, b1, b2, b3, m):
    """NumPy's eight strided accumulators over the first m - m % 8 (m >= 8) entries of four float64
    arrays, each kept as one <8 x double> chain of IEEE additions (lane j adds entries j, j + 8, ...
    in order, as NumPy's r[j]), combined ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)). The four
    chains interleave, so four leaves cost about one: LLVM does not vectorise the scalar form."""
    sig = types.UniTuple(types.float64, 4)(b0, b1, b2, b3, m)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        vty = ir.VectorType(ir.DoubleType(), 8)
        datas = [context.make_array(sig.args[k])(context, builder, args[k]).data for k in range(4)]
        end = builder.sub(args[4], builder.srem(args[4], ir.Constant(i64, 8)))

        def vload(data, idx):
            return builder.load(builder.bitcast(builder.gep(data, [idx]), vty.as_pointer()), align=8)

        accs = [cgutils.alloca_once_value(builder, vload(d, ir.Constant(i64, 0))) for d in datas]
        with cgutils.for_range_slice(builder, ir.Constant(i64, 8), end, ir.Constant(i64, 8)) as (idx, _):
            for d, acc in zip(datas, accs):
                builder.store(builder.fadd(builder.load(acc), vload(d, idx)), acc)
        add, outs = builder.fadd, []
        for acc in accs:
            v = builder.load(acc)
            r = [builder.extract_element(v, ir.Constant(ir.IntType(32), j)) for j in range(8)]
            outs.append(add(add(add(r[0], r[1]), add(r[2], r[3])), add(add(r[4], r[5]), add(r[6], r[7]))))
        return context.make_tuple(builder, sig.return_type, outs)

    return sig, codegen


@_inline
def _leaf4(B0, B1, B2, B3, m):
    """(_leaf(Bk, 0, m) for k = 0..3), bit for bit, with the vector chains of :func:`_lanes4`."""
    if m < 8:  # NumPy adds a short run in order from 0.0
        r0 = r1 = r2 = r3 = 0.0
        start = 0
    else:
        r0, r1, r2, r3 = _lanes4(B0, B1, B2, B3, m)
        start = m - m % 8
    for k in range(start, m):
        r0 += B0[k]
        r1 += B1[k]
        r2 += B2[k]
        r3 += B3[k]
    return r0, r1, r2, r3


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


@_inline
def _combine(plan, leaves, q, stack):
    """0.0 + the pairwise sum from the sums ``leaves[q]`` of ``plan``'s leaves (NumPy's row sum of a
    C-contiguous float64 array); ``stack``: float64 workspace, a slot per level. (No row view of
    ``leaves``: each view costs two atomic reference counts.)"""
    sp = 0
    li = 0
    for k in range(0, plan.shape[0], 2):
        if plan[k] >= 0:
            stack[sp] = leaves[q, li]
            li += 1
            sp += 1
        else:
            stack[sp - 2] = stack[sp - 2] + stack[sp - 1]
            sp -= 1
    return 0.0 + stack[0]


@_jit
def _plan_sum(a, plan, stack, vals):
    li = 0
    for k in range(0, plan.shape[0], 2):
        if plan[k] >= 0:
            vals[0, li] = _leaf(a, plan[k], plan[k + 1])
            li += 1
    return _combine(plan, vals, 0, stack)


def np_sum(a, n: int) -> float:
    """``a[:n].sum()`` as NumPy computes it for a row of a C-contiguous float64 array."""
    plan = sum_plan(n)
    return _plan_sum(np.ascontiguousarray(a, np.float64), plan, np.empty(64), np.empty((1, len(plan) // 2)))


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
def _levels_search(t, m, mids, cb, lv):
    """lv[i] = cb[#{k: mids[k] < t[i]}] by a branch-free binary search (mids increasing)."""
    nm = uint64(mids.shape[0])
    one = uint64(1)
    for i in range(m):
        ti = t[i]
        base = uint64(0)
        size = nm
        while size > one:
            half = size >> one
            if mids[base + half - one] < ti:
                base += half
            size -= half
        lv[i] = cb[base + uint64(mids[base] < ti)]


@_inline
def _masked_square(r, e):
    """The reference's (r * e) * e of a mask r in {0, 1}, as an exact zero where r is 0 (not
    0 * inf where a taken-out entry's grid value overflows)."""
    return (r * e) * e if r > 0.0 else 0.0


@_inline
def _terms(grid, has_col, xr, yv, cv, rv, wv, lo, m, s, z, qmin, qmax, nmax, mids, cb, t, lv, B0, B1, B2, B3):
    """The per-element terms of the group's entries lo .. lo + m - 1 into B0.. (from 0): loss
    (r e) e, and the least-squares step's (w lev) lev, (w lev) y, or w u, (w u) u, (w u) y."""
    base = uint64(lo)
    if grid == GRID_CODEBOOK and mids.shape[0] == SMALL_MIDS:  # levels by selects in registers, one loop
        m0, m1, m2, m3, m4, m5, m6, m7 = mids[0], mids[1], mids[2], mids[3], mids[4], mids[5], mids[6], mids[7]
        m8, m9, m10, m11, m12, m13, m14 = mids[8], mids[9], mids[10], mids[11], mids[12], mids[13], mids[14]
        c0, c1, c2, c3, c4, c5, c6, c7 = cb[0], cb[1], cb[2], cb[3], cb[4], cb[5], cb[6], cb[7]
        c8, c9, c10, c11, c12, c13, c14, c15 = cb[8], cb[9], cb[10], cb[11], cb[12], cb[13], cb[14], cb[15]
        for i in range(m):
            j = base + uint64(i)
            xj = xr[j]
            yj = yv[j] if has_col else xj
            ti = np.float32(yj / s)
            li = c0  # the midpoints below ti are a prefix (mids increasing): the last select that holds wins
            li = c1 if m0 < ti else li
            li = c2 if m1 < ti else li
            li = c3 if m2 < ti else li
            li = c4 if m3 < ti else li
            li = c5 if m4 < ti else li
            li = c6 if m5 < ti else li
            li = c7 if m6 < ti else li
            li = c8 if m7 < ti else li
            li = c9 if m8 < ti else li
            li = c10 if m9 < ti else li
            li = c11 if m10 < ti else li
            li = c12 if m11 < ti else li
            li = c13 if m12 < ti else li
            li = c14 if m13 < ti else li
            li = c15 if m14 < ti else li
            v = np.float32(li * s)
            if has_col:
                v = np.float32(v * cv[j])
            e = np.float64(v) - np.float64(xj)
            r = rv[j]
            B0[i] = _masked_square(r, e)
            l64 = np.float64(li)
            wl = (wv[j] if has_col else r) * l64
            B1[i] = wl * l64
            B2[i] = wl * np.float64(yj)
    elif grid == GRID_CODEBOOK:  # more levels: a binary search
        if has_col:
            for i in range(m):
                t[i] = yv[base + uint64(i)] / s
        else:
            for i in range(m):
                t[i] = xr[base + uint64(i)] / s
        _levels_search(t, m, mids, cb, lv)
        for i in range(m):
            j = base + uint64(i)
            li = lv[i]
            x64 = np.float64(xr[j])
            v = np.float32(li * s)
            if has_col:
                v = np.float32(v * cv[j])
            e = np.float64(v) - x64
            r = rv[j]
            B0[i] = _masked_square(r, e)
            l64 = np.float64(li)
            wl = (wv[j] if has_col else r) * l64
            B1[i] = wl * l64
            B2[i] = wl * np.float64(yv[j] if has_col else xr[j])
    elif grid == GRID_SYMMETRIC:
        if has_col:
            for i in range(m):
                j = base + uint64(i)
                q = min(max(np.rint(np.float32(yv[j] / s)), qmin), qmax)
                li = np.float32(np.float32(q - qmin) + qmin)
                e = np.float64(np.float32(np.float32(li * s) * cv[j])) - np.float64(xr[j])
                B0[i] = _masked_square(rv[j], e)
                l64 = np.float64(li)
                wl = wv[j] * l64
                B1[i] = wl * l64
                B2[i] = wl * np.float64(yv[j])
        else:
            for i in range(m):
                j = base + uint64(i)
                xj = xr[j]
                q = min(max(np.rint(np.float32(xj / s)), qmin), qmax)
                li = np.float32(np.float32(q - qmin) + qmin)
                x64 = np.float64(xj)
                e = np.float64(np.float32(li * s)) - x64
                r = rv[j]
                B0[i] = _masked_square(r, e)
                l64 = np.float64(li)
                wl = r * l64
                B1[i] = wl * l64
                B2[i] = wl * x64
    else:
        z64 = np.float64(z)
        zero = np.float32(0.0)
        if has_col:
            for i in range(m):
                j = base + uint64(i)
                q = min(max(np.rint(np.float32(np.float32(yv[j] / s) + z)), zero), nmax)
                li = np.float32(q - z)
                e = np.float64(np.float32(np.float32(li * s) * cv[j])) - np.float64(xr[j])
                B0[i] = _masked_square(rv[j], e)
                uu = np.float64(li) + z64
                wu = wv[j] * uu
                B1[i] = wu
                B2[i] = wu * uu
                B3[i] = wu * np.float64(yv[j])
        else:
            for i in range(m):
                j = base + uint64(i)
                xj = xr[j]
                q = min(max(np.rint(np.float32(np.float32(xj / s) + z)), zero), nmax)
                li = np.float32(q - z)
                x64 = np.float64(xj)
                e = np.float64(np.float32(li * s)) - x64
                r = rv[j]
                B0[i] = _masked_square(r, e)
                uu = np.float64(li) + z64
                wu = r * uu
                B1[i] = wu
                B2[i] = wu * uu
                B3[i] = wu * x64


@_jit
def _score(grid, has_col, xr, yv, cv, rv, wv, n, plan, stack, leaves, s, z, qmin, qmax, nmax, mids, cb, t, lv,
           B0, B1, B2, B3):
    """(loss, sums...) of one padded group at (s, z): the reference's score and the sums its next
    least-squares step takes, from the same codes. Codebook / symmetric: (loss, sum w lev lev,
    sum w lev y, 0); asymmetric: (loss, sum w u, sum w u u, sum w u y), u = lev + z. A leaf of the
    summation plan at a time: its terms (zero on the padding), then its four sums."""
    li = 0
    for k in range(0, plan.shape[0], 2):
        lo = plan[k]
        if lo < 0:
            continue
        m = plan[k + 1]
        c = min(m, n - lo) if n > lo else 0
        _terms(grid, has_col, xr, yv, cv, rv, wv, lo, c, s, z, qmin, qmax, nmax, mids, cb, t, lv, B0, B1, B2, B3)
        for i in range(c, m):
            B0[i] = 0.0
            B1[i] = 0.0
            B2[i] = 0.0
            B3[i] = 0.0
        leaves[0, li], leaves[1, li], leaves[2, li], leaves[3, li] = _leaf4(B0, B1, B2, B3, m)
        li += 1
    loss = _combine(plan, leaves, 0, stack)
    s1 = _combine(plan, leaves, 1, stack)
    s2 = _combine(plan, leaves, 2, stack)
    s3 = _combine(plan, leaves, 3, stack) if grid == GRID_ASYMMETRIC else 0.0
    return loss, s1, s2, s3


@_jit
def _fixed_sums(has_col, xr, yv, rv, wv, n, plan, stack, leaves, B0, B1):
    """(sum w, sum w y) of one padded group, as the reference sums them."""
    li = 0
    for k in range(0, plan.shape[0], 2):
        lo = plan[k]
        if lo < 0:
            continue
        m = plan[k + 1]
        c = min(m, n - lo) if n > lo else 0
        for i in range(c):
            j = uint64(lo) + uint64(i)
            B0[i] = wv[j] if has_col else rv[j]
            B1[i] = B0[i] * np.float64(yv[j] if has_col else xr[j])
        for i in range(c, m):
            B0[i] = 0.0
            B1[i] = 0.0
        leaves[0, li], leaves[1, li], _, _ = _leaf4(B0, B1, B0, B1, m)
        li += 1
    return _combine(plan, leaves, 0, stack), _combine(plan, leaves, 1, stack)


@_jit
def _same(s, z, s_, z_):
    """(s, z) bit for bit equal to (s_, z_) (s > 0; z's sign of zero included)."""
    return s == s_ and z == z_ and math.copysign(1.0, z) == math.copysign(1.0, z_)


@_jit
def _solve_group(grid, has_col, xr, yv, cv, rv, wv, n, plan, stack, leaves, bits, qmin, qmax, top, smax, mids, cb,
                 iters, t, lv, B0, B1, B2, B3):
    """(s, z) float32 of one group: the reference's start, alternations and best candidate."""
    asym = grid == GRID_ASYMMETRIC
    nmax = np.float32((1 << bits) - 1)
    if asym:  # min-max over the kept entries; 0 if none
        lo32 = np.float32(np.inf)
        hi32 = np.float32(-np.inf)
        for i in range(n):
            if rv[i] > 0:
                yi = yv[i] if has_col else xr[i]
                lo32 = min(lo32, yi)
                hi32 = max(hi32, yi)
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
            amax = max(amax, abs(yv[i] if has_col else xr[i]))
        a64 = np.float64(amax)
        s = a64 / top if a64 > 0 else 1.0
        m = 0.0
    s32, z32 = _params(s, m, smax, asym)
    best_loss, best_s, best_z = 0.0, s32, z32
    s1 = s2 = s3 = sw = sy = 0.0
    ps, pz = np.float32(np.nan), np.float32(np.nan)  # the parameters one alternation before
    for it in range(iters + 1):  # the start, then the alternations (one _score call site: compiled once)
        if it > 0:
            s_old = np.float64(s32)
            if asym:  # weighted least squares of y on (u, 1)
                su, suu, suy = s1, s2, s3
                swuu = sw * suu
                det = swuu - su * su
                ok = det > 1e-12 * (swuu if not swuu < 1e-300 else 1e-300)
                s_new = (sw * suy - su * sy) / det if ok else s_old
                if not s_new > 0:
                    s_new = s_old
                m_new = (sy - s_new * su) / (sw if sw > 0 else 1.0) if ok else -np.float64(z32) * s_new
                ns, nz = _params(s_new, m_new, smax, True)
            else:  # s = <y, lev> / <lev, lev>
                a, b = s1, s2
                ns, nz = _params(b / a if (a > 0 and b > 0) else s_old, 0.0, smax, False)
            if _same(ns, nz, s32, z32) or _same(ns, nz, ps, pz):
                break  # every later candidate repeats one already scored
            ps, pz = s32, z32
            s32, z32 = ns, nz
        loss, s1, s2, s3 = _score(grid, has_col, xr, yv, cv, rv, wv, n, plan, stack, leaves, s32, z32, qmin, qmax,
                                  nmax, mids, cb, t, lv, B0, B1, B2, B3)
        if it == 0:
            best_loss = loss
            if asym:  # sum w and sum w y: the same every alternation
                sw, sy = _fixed_sums(has_col, xr, yv, rv, wv, n, plan, stack, leaves, B0, B1)
        elif loss < best_loss:
            best_loss, best_s, best_z = loss, s32, z32
    return best_s, best_z


@njit(parallel=True, cache=True, error_model="numpy")
def _lloyd_kernel(x, col, keep, g, plan, grid, bits, qmin, qmax, top, smax, mids, cb, iters, chunks, out_s, out_z):
    rows, cols = x.shape
    n_groups = out_s.shape[1]
    has_keep = keep.shape[0] > 0
    has_col = col.shape[0] > 0
    per = (rows + chunks - 1) // chunks
    leaf = min(g, 128)
    n_leaves = 0
    for k in range(0, plan.shape[0], 2):
        n_leaves += plan[k] >= 0
    for k in prange(chunks):  # one workspace per chunk of rows
        yv = np.empty(g if has_col else 0, np.float32)
        cv = np.empty(g if has_col else 0, np.float32)
        wv = np.empty(g if has_col else 0, np.float64)
        rv = np.empty(g, np.float64)
        t = np.empty(leaf, np.float32)
        lv = np.empty(leaf, np.float32)
        B0 = np.empty(leaf, np.float64)
        B1 = np.empty(leaf, np.float64)
        B2 = np.empty(leaf, np.float64)
        B3 = np.zeros(leaf, np.float64)  # B3 stays 0 but on the asymmetric grid
        leaves = np.empty((4, n_leaves), np.float64)
        stack = np.empty(64, np.float64)
        for r in range(k * per, min(rows, k * per + per)):
            for j in range(n_groups):
                c0 = j * g
                n = min(g, cols - c0)
                xr = x[r, c0:c0 + n]
                for i in range(n):
                    rv[i] = 1.0 if (not has_keep or keep[r, c0 + i]) else 0.0
                if has_col:
                    for i in range(n):
                        c = col[c0 + i]
                        yv[i] = xr[i] / c
                        cv[i] = c
                        c64 = np.float64(c)
                        wv[i] = rv[i] * (c64 * c64)
                s, z = _solve_group(grid, has_col, xr, yv, cv, rv, wv, n, plan, stack, leaves, bits, qmin, qmax, top,
                                    smax, mids, cb, iters, t, lv, B0, B1, B2, B3)
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
    c32 = np.zeros(0, np.float32) if col is None else np.ascontiguousarray(np.asarray(col, dtype=np.float32))
    kp = np.zeros((0, 0), np.bool_) if keep is None else np.ascontiguousarray(np.asarray(keep, dtype=np.bool_))
    if grid == GRID_CODEBOOK:
        cb = np.ascontiguousarray(np.asarray(codebook, dtype=np.float32))
        mids = ((cb[:-1] + cb[1:]) * np.float32(0.5)).astype(np.float32)
        top = float(np.abs(cb).max())
        if len(mids) < SMALL_MIDS:  # +inf midpoints are never below a quotient: the same codes
            pad = SMALL_MIDS - len(mids)
            mids = np.concatenate([mids, np.full(pad, np.inf, np.float32)])
            cb = np.concatenate([cb, np.full(pad, cb[-1], np.float32)])
    else:
        cb = mids = np.zeros(1, np.float32)
        top = float(config.qmax)
    qmin, qmax = config.qmin, config.qmax
    out_s = np.empty((rows, n_groups), np.float32)
    out_z = np.empty((rows, n_groups), np.float32)
    chunks = max(1, min(rows, 4 * numba.get_num_threads()))
    _lloyd_kernel(x, c32, kp, g, sum_plan(g), grid, config.bits, np.float32(qmin), np.float32(qmax), top, smax, mids,
                  cb, ITERS, chunks, out_s, out_z)
    return out_s, (out_z if grid == GRID_ASYMMETRIC else None)
