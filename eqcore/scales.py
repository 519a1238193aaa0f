"""Quantization-range optimisation: the NumPy reference of EasyQuant's Adam on scales.

For each row (or group of ``group_size`` input columns) with non-outlier entries x
(outliers are zeroed, which removes them exactly: Q[0] - 0 = 0):

    s0   = max|x| / qmax                      (1.0 if the group is all zero)
    Q[x] = s * clamp(rint(x / s), qmin, qmax)  (x / s in float32, half to even)
    L(s) = sum (Q[x] - x)^2,  dL/ds = 2 * sum (Q[x] - x) * clamp(rint(x / s))

Adam runs on the relative scale u = s / s0 against the normalised loss
L / (n * s0^2), so ``lr`` means the same for weights of any magnitude. Every step
evaluates L at the current s = min(float32(u * s0), smax) and the best scale seen (s0
included, at step 1) is returned, never the last. ``smax`` (:func:`max_scale`) keeps
qmax * s within the weight dtype's finite range; it only binds for weights within a few
grid steps of that range.
"""
from __future__ import annotations

import numpy as np

from .config import QuantConfig
from .dtypes import finite_max


def group_layout(cols: int, group_size: int | None) -> tuple[int, int]:
    """(g, n_groups): columns per scale (``cols`` when group_size is None, and never more
    than ``cols``) and the number of groups per row; the last group may be shorter."""
    g = cols if group_size is None else min(int(group_size), cols)
    return g, -(-cols // g)


def group_view(x: np.ndarray, group_size: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, cols) -> zero-padded (rows * n_groups, g) groups, their true sizes, n_groups."""
    rows, cols = x.shape
    g, n_groups = group_layout(cols, group_size)
    padded = np.zeros((rows, n_groups * g), dtype=x.dtype)
    padded[:, :cols] = x
    sizes = np.full(n_groups, g, dtype=np.float64)
    sizes[-1] = cols - (n_groups - 1) * g
    return padded.reshape(rows * n_groups, g), np.tile(sizes, rows), n_groups


def codes_reference(x: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Signed codes clamp(rint(x / s)) as float32; x and s float32, s broadcastable."""
    return np.clip(np.rint(x / s), qmin, qmax)


def loss_and_grad(xg: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """L(s) and the paper's dL/ds = 2 sum (Q[x] - x) q for each group (row of ``xg``)."""
    q = codes_reference(xg, s[:, None], qmin, qmax).astype(np.float64)
    err = s.astype(np.float64)[:, None] * q - xg.astype(np.float64)
    return (err * err).sum(axis=1), 2.0 * (err * q).sum(axis=1)


def initial_scales(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """Vectorised :func:`eqcore.rowmath.initial_scale` (float64)."""
    s0 = absmax.astype(np.float64) / qmax
    return np.where((s0 > 0) & np.isfinite(s0), s0, 1.0)


def max_scale(dtype, qmax: int) -> np.float32:
    """Largest float32 scale s with qmax * s <= the finite maximum of ``dtype`` (exact test)."""
    top = finite_max(dtype)
    s = np.float32(top / qmax)
    while float(s) * qmax > top:
        s = np.nextafter(s, np.float32(0))
    return s


def optimize_scales_reference(x: np.ndarray, config: QuantConfig, smax=None) -> np.ndarray:
    """Best scales (rows, n_groups) float32 for float32 ``x`` with outliers zeroed, each at most
    ``smax`` (default: :func:`max_scale` of float32)."""
    rows = x.shape[0]
    xg, n, n_groups = group_view(np.asarray(x, dtype=np.float32), config.group_size)
    qmin, qmax = config.qmin, config.qmax
    smax = max_scale(np.float32, qmax) if smax is None else np.float32(smax)
    s0 = initial_scales(np.abs(xg).max(axis=1), qmax)
    best_s = np.minimum(s0.astype(np.float32), smax)
    if config.steps == 0:
        return best_s.reshape(rows, n_groups)
    b1, b2 = config.betas
    u = np.ones_like(s0)
    m = np.zeros_like(s0)
    v = np.zeros_like(s0)
    best_loss = np.full_like(s0, np.inf)
    for t in range(1, config.steps + 1):
        with np.errstate(over="ignore"):  # u * s0 past float32's range: capped at smax
            s = np.minimum((u * s0).astype(np.float32), smax)
        loss, grad = loss_and_grad(xg, s, qmin, qmax)
        better = loss < best_loss
        best_loss = np.where(better, loss, best_loss)
        best_s = np.where(better, s, best_s)
        g = grad / (n * s0)
        m = b1 * m + (1.0 - b1) * g
        v = b2 * v + (1.0 - b2) * g * g
        mhat = m / (1.0 - b1 ** t)
        vhat = v / (1.0 - b2 ** t)
        u = np.maximum(u - config.lr * mhat / (np.sqrt(vhat) + config.eps), 1e-3)
    return best_s.reshape(rows, n_groups)


def expand_scales(scales: np.ndarray, cols: int, group_size: int | None) -> np.ndarray:
    """Per-element scales (rows, cols) from per-group scales (rows, n_groups)."""
    g, _ = group_layout(cols, group_size)
    return np.repeat(scales, g, axis=1)[:, :cols]


def reconstruction_loss(x: np.ndarray, scales: np.ndarray, config: QuantConfig) -> np.ndarray:
    """Per-row sum of squared error of quantizing float32 ``x`` with ``scales``."""
    xg, _, n_groups = group_view(np.asarray(x, dtype=np.float32), config.group_size)
    loss, _ = loss_and_grad(xg, np.asarray(scales, dtype=np.float32).reshape(-1), config.qmin, config.qmax)
    return loss.reshape(-1, n_groups).sum(axis=1)
