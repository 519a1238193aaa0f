"""The grids beyond the symmetric one: their codebooks and the column scales that go with them.

* ``nf_codebook(bits)``: normal-float levels (NF4 at 4 bits, as bitsandbytes builds them:
  quantiles of the standard normal, 2^(k-1) positive, 2^(k-1) - 1 negative, and 0, scaled to a
  largest magnitude of 1).
* ``fit_codebook(y, ...)``: levels fitted to the weights that remain once outliers are removed:
  each group is divided by its largest magnitude, and 2^k levels are fitted to the pooled values
  by Lloyd-Max (1-D k-means from the quantiles; the weights of the column scales count), then
  scaled to a largest magnitude of 1. One codebook per tensor (2^k float32 values). At
  ``ZERO_LEVEL_BITS`` bits or fewer one level is held at 0, so that small weights dequantize to
  0, as on the symmetric grid and in NF4: without it each small weight of an input channel that
  carries a large activation moves by a whole level (SmolLM2 at 3 bits: v_proj's output error
  twice the symmetric grid's, perplexity 313 against 73.8 with the zero level, tune split). At 4
  bits the free fit did better on the tune split (41.5 against 42.7 per row, 40.1 against 40.9
  in groups of 128).
* ``column_scales(x, ...)``: a scale per input column that evens out the columns' spread before
  the row / group grid is applied (in the spirit of SINQ's Sinkhorn normalisation): starting
  from 1, each round divides the matrix by the columns' scales, normalises every row by its
  standard deviation, and moves each column's scale by the square root of its standard
  deviation relative to the mean (a geometric step), for ``COLUMN_ROUNDS`` rounds.

All work on NumPy or CuPy arrays (the codebook fit itself runs on the host, on at most
``FIT_SAMPLE`` values).
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
from numba import njit

from .interop import array_module
from .layout import float_dtype, group_layout

CODEBOOKS = ("fit", "nf")
COLUMN_ROUNDS = 6
FIT_ROUNDS = 30
ZERO_LEVEL_BITS = 3  # at most this many bits: the fitted codebook keeps a level at 0
FIT_SAMPLE = 1 << 20  # values the codebook fit looks at (an even subsample of larger tensors)


def nf_codebook(bits: int) -> np.ndarray:
    """Normal-float levels for ``bits`` (bitsandbytes' recipe, offset 0.9677), float32, increasing."""
    offset = 0.9677
    half = 1 << (bits - 1)
    nd = NormalDist()
    pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, half + 1)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, half)[:-1]]
    levels = np.array(sorted(pos + neg + [0.0]))
    return (levels / np.abs(levels).max()).astype(np.float32)


def _normalised(y, group_size):
    """Each group of ``y`` divided by its largest magnitude, flattened group by group (all-zero
    groups dropped): the values the codebook is fitted to (on NumPy, :func:`_normalised_sample`
    takes fit_codebook's sample of them directly)."""
    xp = array_module(y)
    rows, cols = y.shape
    g, n_groups = group_layout(cols, group_size)
    parts = []
    for j in range(n_groups):
        part = y[:, j * g:(j + 1) * g]
        amax = xp.abs(part).max(axis=1, keepdims=True)
        keep = amax[:, 0] > 0
        parts.append((part[keep] / amax[keep]).reshape(-1))
    return xp.concatenate(parts)


@njit(cache=True)
def _normalised_sample(y, g, n_groups, n, limit):
    """What fit_codebook samples from :func:`_normalised` (``y`` float32 C-contiguous, groups of
    ``g``): its nonzero values if there are at least ``n`` (else all), every step-th of them so that
    at most ``limit`` remain; in the same order (group by group, then row by row)."""
    rows, cols = y.shape
    amax = np.zeros((n_groups, rows), np.float32)
    total, nonzero = 0, 0
    for j in range(n_groups):
        c0, c1 = j * g, min(j * g + g, cols)
        for r in range(rows):
            a = np.float32(0)
            for c in range(c0, c1):
                a = max(a, abs(y[r, c]))
            amax[j, r] = a
            if a > 0:
                total += c1 - c0
                for c in range(c0, c1):
                    if np.float32(y[r, c] / a) != 0:
                        nonzero += 1
    drop_zeros = nonzero >= n
    size = nonzero if drop_zeros else total
    step = -(-size // limit) if size > limit else 1
    out = np.empty(-(-size // step), np.float32)
    i, k = 0, 0
    for j in range(n_groups):
        c0, c1 = j * g, min(j * g + g, cols)
        for r in range(rows):
            a = amax[j, r]
            if a > 0:
                for c in range(c0, c1):
                    q = np.float32(y[r, c] / a)
                    if q != 0 or not drop_zeros:
                        if i % step == 0:
                            out[k] = q
                            k += 1
                        i += 1
    return out


@njit(cache=True)
def _run_sums(v, b):
    """Sum of v[b[k]:b[k + 1]] for each k, each left to right in float64."""
    out = np.zeros(b.shape[0] - 1)
    for k in range(out.shape[0]):
        t = 0.0
        for i in range(b[k], b[k + 1]):
            t += v[i]
        out[k] = t
    return out


def _with_zero(lev):
    """``lev`` (increasing) with its level nearest 0 set to 0 (the order is kept: the levels on
    either side of it have opposite signs or larger magnitudes)."""
    xp = array_module(lev)
    lev = lev.copy()
    lev[int(xp.argmin(xp.abs(lev)))] = 0.0
    return lev


def fit_codebook(y, bits: int, group_size: int | None) -> np.ndarray:
    """2^bits levels fitted to ``y`` (float32, outliers zeroed), float32, increasing, max |level| 1;
    one of them 0 at ``ZERO_LEVEL_BITS`` bits or fewer."""
    xp = array_module(y)
    y = xp.asarray(y, dtype=np.float32)
    if xp is np:  # the same sample in two passes over y, without the normalised copy
        v = _normalised_sample(np.ascontiguousarray(y), *group_layout(y.shape[1], group_size), 1 << bits, FIT_SAMPLE)
    else:
        v = _normalised(y, group_size)
        v = v[v != 0] if int((v != 0).sum()) >= (1 << bits) else v
        if v.size > FIT_SAMPLE:
            v = v[:: -(-v.size // FIT_SAMPLE)]
        v = v.get()  # the fit runs on the host: the same levels as from NumPy
    v = np.sort(v).astype(np.float64)
    n = 1 << bits
    if v.size < n:
        return nf_codebook(bits)
    pin = _with_zero if bits <= ZERO_LEVEL_BITS else (lambda lev: lev)
    lev = pin(v[(((np.arange(n) + 0.5) / n) * v.size).astype(np.int64)])  # start from the quantiles
    for _ in range(FIT_ROUNDS):
        # level k takes the run of the sorted v in (mids[k-1], mids[k]]: its bounds by binary search,
        # its sum left to right, as a bincount over every value would add them
        b = np.concatenate(([0], np.searchsorted(v, (lev[1:] + lev[:-1]) / 2, side="right"), [v.size]))
        counts = np.diff(b)
        sums = _run_sums(v, b)
        lev = pin(np.where(counts > 0, sums / np.maximum(counts, 1), lev))
    lev = np.sort(lev)
    out = (lev / np.abs(lev).max()).astype(np.float32)
    for j in range(1, n):  # strictly increasing in float32, whatever the fit
        if out[j] <= out[j - 1]:
            out[j] = np.nextafter(out[j - 1], np.float32(np.inf))
    return out


def codebook_for(y, config) -> np.ndarray | None:
    """The codebook of ``config`` for ``y`` (None unless the grid is "codebook")."""
    if config.grid != "codebook":
        return None
    return nf_codebook(config.bits) if config.codebook == "nf" else fit_codebook(y, config.bits, config.group_size)


def column_scales(x, scale_dtype: str = "float32"):
    """The column scales of float32 ``x`` (outliers zeroed), in ``scale_dtype`` (see the module)."""
    xp = array_module(x)
    y0 = xp.asarray(x, dtype=np.float64)
    c = xp.ones(x.shape[1], dtype=np.float64)
    for _ in range(COLUMN_ROUNDS):
        y = y0 / c
        r = y.std(axis=1, keepdims=True)
        y = y / xp.where(r > 0, r, 1.0)
        cs = y.std(axis=0)
        mean = float(cs[cs > 0].mean()) if bool((cs > 0).any()) else 1.0
        c = c * xp.sqrt(xp.where(cs > 0, cs / mean, 1.0))
    c = c / float(xp.exp(xp.log(c).mean()))  # geometric mean 1: the row scales carry the magnitude
    c = xp.maximum(c, xp.abs(y0).max(axis=0) * 2.0 ** -126)  # x / c stays finite in float32
    sd = float_dtype(scale_dtype)
    c = xp.clip(c, float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max)) if sd == np.float16 else c
    return c.astype(np.float32).astype(sd)
