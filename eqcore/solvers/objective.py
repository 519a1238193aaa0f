"""What every scale solver minimises, in NumPy (the readable reference).

For each row (or group of ``group_size`` input columns) with non-outlier entries x
(outliers are zeroed, which removes them exactly: Q[0] - 0 = 0):

    Q[x] = s * clamp(rint(x / s), qmin, qmax)   (x / s in float32, half to even)
    L(s) = sum (Q[x] - x)^2,  dL/ds = 2 * sum (Q[x] - x) * clamp(rint(x / s))   (the paper's gradient)
"""
from __future__ import annotations

import numpy as np

from ..backends.numpy import codes
from ..layout import group_layout


def group_view(x: np.ndarray, group_size: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, cols) -> zero-padded (rows * n_groups, g) groups, their true sizes, n_groups."""
    rows, cols = x.shape
    g, n_groups = group_layout(cols, group_size)
    padded = np.zeros((rows, n_groups * g), dtype=x.dtype)
    padded[:, :cols] = x
    sizes = np.full(n_groups, g, dtype=np.float64)
    sizes[-1] = cols - (n_groups - 1) * g
    return padded.reshape(rows * n_groups, g), np.tile(sizes, rows), n_groups


def loss_and_grad(xg: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """L(s) and the paper's dL/ds = 2 sum (Q[x] - x) q for each group (row of ``xg``)."""
    q = codes(xg, s[:, None], qmin, qmax).astype(np.float64)
    err = s.astype(np.float64)[:, None] * q - xg.astype(np.float64)
    return (err * err).sum(axis=1), 2.0 * (err * q).sum(axis=1)


def initial_scales(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """Max-abs scales s0 = max|x| / qmax (float64); 1.0 for a group with nothing to quantize.
    Vectorised :func:`eqcore.solvers.rowmath.initial_scale`."""
    s0 = absmax.astype(np.float64) / qmax
    return np.where((s0 > 0) & np.isfinite(s0), s0, 1.0)


def reconstruction_loss(x: np.ndarray, scales: np.ndarray, config) -> np.ndarray:
    """Per-row sum of squared error of quantizing float32 ``x`` with ``scales``."""
    xg, _, n_groups = group_view(np.asarray(x, dtype=np.float32), config.group_size)
    loss, _ = loss_and_grad(xg, np.asarray(scales, dtype=np.float32).reshape(-1), config.qmin, config.qmax)
    return loss.reshape(-1, n_groups).sum(axis=1)
