"""The exact scale solver, NumPy reference: the float32 scale of least reconstruction loss.

For one group with magnitudes a_i = |x_i| (the loss only depends on them: q_i x_i = |q_i| a_i),
the contract codes are c_i(s) = min(rint(fl(a_i / s)), top_i), with top_i = qmax for x_i >= 0
and qmax + 1 = |qmin| for x_i < 0, and the loss is

    L(s) = sum (s c_i(s) - a_i)^2 = A s^2 - 2 B s + C,   A = sum c_i^2, B = sum a_i c_i, C = sum a_i^2.

fl(a / s) is monotone in s, so each c_i is a staircase that steps down from top_i to 0 as s
grows: it drops below level m + 1 at a float32 threshold t_im (the smallest float32 s with
c_i(s) <= m, next to a_i / (m + 1/2)). Between consecutive thresholds every code is fixed and L
is the quadratic above, exactly, whose least float32 point is the float32 nearest to B / A,
clamped into the interval. Sweeping all thresholds in order (A -= 2m + 1, B -= a_i at each)
and keeping the best interval gives the global minimum of L over every float32 scale, at
most ``smax``: nothing is left out, so the result is never worse than any scale Adam (or
max-abs scaling) can reach.

Why no narrower bracket: below the smallest threshold every code is clamped and L rises to C
as s -> 0; above the largest, every code is 0 and L = C, which is the largest L can be (each
term is at most a_i^2). In between, the minimum can lie far from s0 = max|x| / qmax on either
side (a few large entries among many small ones are better clipped; two entries a and 0.55 a
at 3 bits are best served by s = a / 2 > s0 * qmax / (qmax - 1/2)), so the reference sweeps
everything. The fast paths (:mod:`eqcore.solvers.exact_numba`) prove a narrower bracket per
group with lower bounds instead.
"""
from __future__ import annotations

import numpy as np

from ..layout import group_layout, max_scale

TINY = np.float32(np.finfo(np.float32).smallest_subnormal)
INF = np.float32(np.inf)
BAND = 3e-14  # the quadratic form ranks to about 1e-15 of C: closer candidates go to the direct sum


def codes(a: np.ndarray, s, top: np.ndarray) -> np.ndarray:
    """Contract code magnitudes min(rint(fl(a / s)), top) as float64 (a, s float32)."""
    with np.errstate(over="ignore", divide="ignore"):
        return np.minimum(np.rint(a / s), top).astype(np.float64)


def thresholds(a: np.ndarray, top: np.ndarray):
    """Every (element, level m < top_i): the smallest float32 t with code <= m; returns
    (t, element index, m), unsorted."""
    idx = np.repeat(np.arange(a.size), top.astype(np.int64))
    m = np.concatenate([np.arange(k) for k in top.astype(np.int64)]) if idx.size else np.zeros(0, np.int64)
    ai, ti = a[idx], top[idx]
    t = np.maximum((ai.astype(np.float64) / (m + 0.5)).astype(np.float32), TINY)
    for _ in range(64):  # fl(a / (m + 1/2)) is within an ulp or two of the float32 threshold
        up = codes(ai, t, ti) > m
        prev = np.nextafter(t, np.float32(0))
        down = ~up & (prev > 0) & (codes(ai, np.maximum(prev, TINY), ti) <= m)
        if not (up.any() or down.any()):
            break
        t = np.where(up, np.nextafter(t, INF), np.where(down, prev, t))
    else:  # pragma: no cover - would mean non-monotone division
        raise AssertionError("threshold search did not settle")
    return t, idx, m


def group_loss(a: np.ndarray, s: np.float32, top: np.ndarray) -> float:
    """The contract loss sum (s c - a)^2 in float64 at float32 ``s`` (the direct sum)."""
    c = codes(a, np.float32(s), top)
    e = np.float64(np.float32(s)) * c - a.astype(np.float64)
    return float(np.dot(e, e))


def best_scale(x: np.ndarray, qmax: int, smax: np.float32) -> np.float32:
    """The float32 scale s <= smax minimising the contract loss of group ``x`` (float32)."""
    x = np.asarray(x, np.float32)
    a = np.abs(x)
    if not a.size or a.max() == 0:
        return min(np.float32(1.0), smax)  # nothing to quantize: the max-abs convention
    top = np.where(x < 0, qmax + 1, qmax).astype(np.float32)
    t, idx, m = thresholds(a, top)
    order = np.argsort(t, kind="stable")
    t, idx, m = t[order], idx[order], m[order]
    A0, B0 = float(np.sum(top.astype(np.float64) ** 2)), float(np.dot(a.astype(np.float64), top))
    C = float(np.dot(a.astype(np.float64), a))
    A = np.concatenate([[A0], A0 - np.cumsum(2.0 * m + 1.0)])      # codes in interval j: after j updates
    B = np.concatenate([[B0], B0 - np.cumsum(a[idx].astype(np.float64))])
    lo = np.concatenate([[TINY], t])                                 # interval j = [lo_j, hi_j)
    hi = np.concatenate([t, [INF]])
    last = np.minimum(np.nextafter(hi, np.float32(0)), smax)         # its largest usable float32
    ok = (lo < hi) & (lo <= last)
    A, B, lo, last = A[ok], B[ok], lo[ok], last[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(A > 0, B / A, 0.0)
    f = np.clip(v.astype(np.float32), lo, last)  # each interval's float32 points next to B / A
    g = np.clip(np.where(f < v, np.nextafter(f, INF), np.nextafter(f, np.float32(0))), lo, last)
    s = np.where(np.abs(g.astype(np.float64) - v) < np.abs(f.astype(np.float64) - v), g, f)
    s64 = s.astype(np.float64)
    q = A * s64 * s64 - 2.0 * B * s64 + C
    near = np.flatnonzero(q <= q.min() + BAND * C)  # the quadratic form cannot tell these apart
    losses = [group_loss(a, s[i], top) for i in near]
    return np.float32(s[near[int(np.argmin(losses))]])


def optimize_scales(x: np.ndarray, config, smax=None) -> np.ndarray:
    """Exact scales (rows, n_groups) float32 for float32 ``x`` with outliers zeroed, each at most
    ``smax`` (default: :func:`eqcore.layout.max_scale` of float32). ``config.steps`` and the Adam
    settings are not used."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, config.group_size)
    smax = max_scale(np.float32, config.qmax) if smax is None else np.float32(smax)
    out = np.empty((rows, n_groups), np.float32)
    for r in range(rows):
        for j in range(n_groups):
            out[r, j] = best_scale(x[r, j * g:(j + 1) * g], config.qmax, smax)
    return out
