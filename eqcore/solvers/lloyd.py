"""Lloyd's alternating solver for every grid, on NumPy or CuPy arrays (the reference and the GPU path).

For each group it alternates the two exact half-steps of least squares: the nearest codes for
the current grid parameters (the contract's rounding, :func:`eqcore.backends.numpy.grid_codes`),
then the grid parameters that best fit those codes (weighted least squares: the scale s for
the symmetric and codebook grids, s and the offset m = -s z for the asymmetric one). Each
candidate is scored by :func:`eqcore.solvers.objective.dequant_error`, the error of exactly
what dequantization returns, and the best seen is kept, the start included, so the result is
never worse than the start: max-abs scaling (symmetric, codebook) or min-max (asymmetric).

With column scales c the grid is fitted to y = x / c, and the least-squares steps weight
column j by c_j^2, so that they minimise the error of x itself.
"""
from __future__ import annotations

import numpy as np

from ..interop import array_module
from ..layout import group_layout, max_scale
from .objective import dequant_values

ITERS = 20


def _groups(a, g, n_groups, fill=0.0):
    """(rows, cols) -> (rows * n_groups, g), the last group padded with ``fill``."""
    xp = array_module(a)
    rows, cols = a.shape
    out = xp.full((rows, n_groups * g), fill, dtype=a.dtype)
    out[:, :cols] = a
    return out.reshape(rows * n_groups, g)


def _start(yg, real, bits, top):
    """Max-abs scale (m None) or, with ``top`` None, the asymmetric min-max (s, m), float64."""
    xp = array_module(yg)
    if top is not None:
        amax = xp.abs(yg).max(axis=1).astype(np.float64)
        return xp.where(amax > 0, amax / top, 1.0), None
    lo = xp.where(real, yg, np.inf).min(axis=1).astype(np.float64)
    hi = xp.where(real, yg, -np.inf).max(axis=1).astype(np.float64)
    lo, hi = xp.where(xp.isfinite(lo), lo, 0.0), xp.where(xp.isfinite(hi), hi, 0.0)  # nothing kept: 0
    n = (1 << bits) - 1
    flat = hi <= lo  # one value v: s = |v| / (2^k - 1) and v on the top (v > 0) or bottom code
    s = xp.where(flat, xp.abs(lo) / n, (hi - lo) / n)
    s = xp.where(s > 0, s, 1.0)
    return s, xp.where(flat & (lo > 0), 0.0, lo)  # x^ = s u + m


def solve(x, config, smax=None, codebook=None, col=None, keep=None):
    """(scales, zeros) float32 (rows, n_groups) of float32 ``x`` (outliers zeroed) for
    ``config.grid``; zeros is None except for the asymmetric grid. ``codebook``: the codebook
    grid's levels (float32, increasing); ``col``: column scales (float32) or None; ``keep``: bool
    (rows, cols), False where an outlier was taken out (its code is overwritten: it counts for
    nothing), None for all True."""
    xp = array_module(x)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, config.group_size)
    smax = float(max_scale(np.float32, config.qmax) if smax is None else smax)
    bits = config.bits
    x32 = xp.asarray(x, dtype=np.float32)
    c32 = None if col is None else xp.asarray(col, dtype=np.float32)
    y = x32 if c32 is None else x32 / c32
    xg, yg = _groups(x32, g, n_groups), _groups(y, g, n_groups)
    cg = None if c32 is None else _groups(xp.broadcast_to(c32, (rows, cols)), g, n_groups, fill=1.0)
    real = _groups(xp.ones((rows, cols), np.float64) if keep is None else keep.astype(np.float64), g,
                   n_groups)  # 0 on outliers and the padding
    wg = real if cg is None else real * cg.astype(np.float64) ** 2
    cb = None if codebook is None else xp.asarray(codebook, np.float32)
    asym = config.grid == "asymmetric"
    y64 = yg.astype(np.float64)
    s, m = _start(yg, real > 0, bits, None if asym else (float(xp.abs(cb).max()) if cb is not None
                                                          else float(config.qmax)))

    def params(s, m):  # float32 (s, z) within (0, smax]
        s32 = xp.minimum(s, smax).astype(np.float32)
        s32 = xp.where(s32 > 0, s32, np.float32(1.0))
        return s32, None if m is None else (-m / s32.astype(np.float64)).astype(np.float32)

    def score(s32, z32):  # each group's dequantization error, and its levels
        lev, v = dequant_values(yg if cg is None else xg, s32[:, None], bits, None if z32 is None else z32[:, None],
                                cb, cg)
        e = xp.where(real > 0, v.astype(np.float64) - xg, 0.0)  # not 0 * inf where a taken-out
        return (real * e * e).sum(axis=1), lev.astype(np.float64)  # entry's grid value overflows

    s32, z32 = params(s, m)
    best_loss, lev = score(s32, z32)
    best_s, best_z = s32, z32
    for _ in range(ITERS):
        s_old = s32.astype(np.float64)
        if asym:  # weighted least squares of y on (u, 1): y^ = s u + m, with u = level + z
            u = lev + z32[:, None].astype(np.float64)
            sw, su, sy = wg.sum(1), (wg * u).sum(1), (wg * y64).sum(1)
            suu, suy = (wg * u * u).sum(1), (wg * u * y64).sum(1)
            det = sw * suu - su * su
            ok = det > 1e-12 * xp.maximum(sw * suu, 1e-300)
            s_new = xp.where(ok, (sw * suy - su * sy) / xp.where(ok, det, 1.0), s_old)
            s_new = xp.where(s_new > 0, s_new, s_old)
            m_new = xp.where(ok, (sy - s_new * su) / xp.where(sw > 0, sw, 1.0), -z32.astype(np.float64) * s_new)
            s32, z32 = params(s_new, m_new)
        else:  # weighted least squares of y on the levels: s = <y, lev> / <lev, lev>
            a, b = (wg * lev * lev).sum(1), (wg * lev * y64).sum(1)
            s32, z32 = params(xp.where((a > 0) & (b > 0), b / xp.where(a > 0, a, 1.0), s_old), None)
        loss, lev = score(s32, z32)
        better = loss < best_loss
        best_loss = xp.where(better, loss, best_loss)
        best_s = xp.where(better, s32, best_s)
        if asym:
            best_z = xp.where(better, z32, best_z)
    return best_s.reshape(rows, n_groups), (None if best_z is None else best_z.reshape(rows, n_groups))
