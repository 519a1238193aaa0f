"""What the solvers minimise, in NumPy (the readable reference).

The symmetric solvers (Adam, exact): for each row (or group of ``group_size`` input columns) with non-outlier entries x
(outliers are zeroed, which removes them exactly: Q[0] - 0 = 0):

    Q[x] = s * clamp(rint(x / s), qmin, qmax)   (x / s in float32, half to even)
    L(s) = sum (Q[x] - x)^2,  dL/ds = 2 * sum (Q[x] - x) * clamp(rint(x / s))   (the paper's gradient)

with s * q in float64. The other grids' solver (Lloyd) measures :func:`dequant_error`: the error
of exactly what dequantization returns, float32 products included.
"""
from __future__ import annotations

import numpy as np

from ..backends.numpy import codes, grid_codes, grid_levels
from ..interop import array_module
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


def dequant_values(x, s, bits: int, zeros=None, codebook=None, col=None):
    """(levels, values) float32 of float32 ``x`` on one grid, NumPy or CuPy: the levels of the
    codes of x / col (col: column scales or None) and level * s (* col), as dequantization
    computes them before saturating. ``s`` and ``zeros`` broadcast against ``x``."""
    y = x if col is None else x / col
    level = grid_levels(grid_codes(y, s, bits, zeros, codebook), bits, zeros, codebook)
    v = level * s
    return level, (v if col is None else v * col)


def dequant_error(x, scales, config, zeros=None, codebook=None, col=None, keep=None):
    """Each row's sum of squared error (float64) of float32 ``x`` (rows, cols) against its
    dequantization with per-group ``scales`` / ``zeros`` (rows, n_groups), NumPy or CuPy; only
    where ``keep`` (bool, or None for everywhere)."""
    xp = array_module(x)
    cols = x.shape[1]

    def per_element(a):
        return None if a is None else xp.repeat(a.astype(np.float32), group_layout(cols, config.group_size)[0],
                                                axis=1)[:, :cols]

    _, v = dequant_values(x, per_element(scales), config.bits, per_element(zeros),
                          None if codebook is None else xp.asarray(codebook, np.float32),
                          None if col is None else col.astype(np.float32))
    e = v.astype(np.float64) - x
    e = e * e
    return (e if keep is None else e * keep).sum(axis=1)
