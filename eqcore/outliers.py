"""Outliers: which entries stay exact, and their CSR per output row.

Selectors (:data:`SELECTORS`, chosen by ``QuantConfig.outliers``), all data-free:

* ``"sigma"``: the paper's rule, |w - mean| >= sigma * std, with the statistics of the whole
  matrix or of each row (``outlier_stats``).
* ``"adpq"``: AdpQ's adaptive soft-thresholding (arXiv 2405.13358). Its adaptive-LASSO penalty
  lambda / |w| keeps w out of the dense part where |w|^2 > lambda; lambda is set per scale group
  (or row) from a robust spread that the outliers themselves cannot inflate:
  lambda = (sigma * 1.4826 * MAD)^2 about the group median. eqcore stores the selected entries
  exactly instead of as a soft-thresholded residual.
* ``"budget"``: error-driven, for a budget of ``outlier_fraction`` of the matrix. For each row,
  the loss after solving its scales again without its m largest entries, L(m), is measured for
  m = 0 .. DEPTH; the budget goes, one outlier at a time, to the row whose next removals lower
  the total loss most per outlier (greedy on the measured gains). Entries with a large rounding
  error but in range gain little from removal, so a plain "largest residual" rule wastes budget
  on them; this one does not.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dtypes import all_finite
from .interop import array_module
from .layout import col_index_dtype, narrow_rowptr, rowptr_dtype


class Outliers(NamedTuple):
    """CSR of the outliers of a (rows, cols) matrix.

    rowptr  (rows + 1,): outliers of row r are entries rowptr[r]:rowptr[r+1]; uint16 when there
            are at most 65535 outliers, else int32 (:func:`eqcore.layout.rowptr_dtype`)
    cols    uint16 when cols <= 65536, else int32; increasing within a row
    vals    the original values, in the weight's own dtype
    """

    rowptr: np.ndarray
    cols: np.ndarray
    vals: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.vals.shape[0])



def check_csr(rowptr, cols, vals, shape) -> None:
    """ValueError unless the CSR only points inside ``shape`` (rows, cols), in order, with finite
    values. O(rows + nnz), on NumPy or CuPy arrays; run before anything writes through it."""
    xp = array_module(rowptr)
    rows, n_cols = shape
    if rowptr.dtype not in (np.int32, np.uint16) or tuple(rowptr.shape) != (rows + 1,):
        raise ValueError(f"outlier_rowptr must be int32 or uint16 ({rows + 1},), got {rowptr.dtype} {tuple(rowptr.shape)}")
    nnz = int(rowptr[-1])
    if int(rowptr[0]) != 0 or bool((xp.diff(rowptr.astype(np.int64)) < 0).any()):
        raise ValueError("outlier_rowptr must start at 0 and be non-decreasing")
    if cols.dtype != col_index_dtype(n_cols) or tuple(cols.shape) != (nnz,):
        raise ValueError(f"outlier_cols must be {col_index_dtype(n_cols)} ({nnz},) as outlier_rowptr[-1] says, "
                         f"got {cols.dtype} {tuple(cols.shape)}")
    if tuple(vals.shape) != (nnz,):
        raise ValueError(f"outlier_vals must have {nnz} entries as outlier_rowptr[-1] says, got {tuple(vals.shape)}")
    if not nnz:
        return
    c = cols  # compared in their own dtype: no int64 copy (uint16 is never negative)
    if (c.dtype.kind != "u" and int(c.min()) < 0) or int(c.max()) >= n_cols:
        raise ValueError(f"outlier_cols out of range [0, {n_cols})")
    ok = c[1:] > c[:-1]
    starts = rowptr[1:-1]
    starts = starts[(starts > 0) & (starts < nnz)]
    ok[starts - 1] = True  # a new row may start anywhere
    if not bool(ok.all()):
        raise ValueError("outlier_cols must be strictly increasing within each row")
    if not all_finite(vals):
        raise ValueError("outlier_vals must be finite")


def adpq_mask(w, sigma: float | None, group_size: int | None) -> np.ndarray:
    """AdpQ's rule per scale group: |w - median| > sigma * 1.4826 * MAD (see the module)."""
    from .layout import group_layout

    xp = array_module(w)
    rows, cols = w.shape
    mask = xp.zeros(w.shape, dtype=bool)
    if sigma is None:
        return mask
    g, n_groups = group_layout(cols, group_size)
    for j in range(n_groups):
        part = w[:, j * g:(j + 1) * g].astype(np.float32)
        med = xp.median(part, axis=1, keepdims=True)
        dev = xp.abs(part - med)
        mad = xp.median(dev, axis=1, keepdims=True) * np.float32(1.4826)
        mask[:, j * g:(j + 1) * g] = (dev > sigma * mad) & (mad > 0)
    return mask


DEPTH = 8  # removals per row whose effect the budget selector measures


def budget_mask(w, fraction: float, row_losses, depth: int = DEPTH) -> np.ndarray:
    """The budget selector (see the module). ``row_losses(x)``: each row's loss at its best scales,
    for a float32 matrix ``x`` (the configured solver and grid)."""
    budget = int(round(fraction * w.size))
    if budget <= 0:
        return array_module(w).zeros(w.shape, dtype=bool)
    return take_budget(w, *removal_losses(w, row_losses, depth), budget)


def removal_losses(w, row_losses, depth: int = DEPTH):
    """(order, losses): each row's ``depth`` largest-magnitude columns, largest first, and
    losses[r, m], row r's loss with its m largest entries removed (m = 0 .. depth)."""
    xp = array_module(w)
    rows, cols = w.shape
    depth = min(depth, cols)
    x = w.astype(np.float32)
    order = xp.argsort(-xp.abs(x), axis=1)[:, :depth]
    losses = np.empty((rows, depth + 1))
    for chunk in row_chunks(w.shape, 1 << 20):
        xc = x[chunk].copy()
        r = xp.arange(xc.shape[0])
        for m in range(depth + 1):
            if m:
                xc[r, order[chunk][:, m - 1]] = 0.0
            losses[chunk, m] = np.asarray(row_losses(xc) if xp is np else row_losses(xc).get())
    return order, losses


def take_budget(w, order, losses, budget: int) -> np.ndarray:
    """The mask of ``budget`` outliers (or fewer, when no removal gains more) given
    :func:`removal_losses`: one row step at a time, the best gain per outlier first."""
    import heapq

    xp = array_module(w)
    rows, depth = order.shape
    gain = losses[:, :1] - losses  # gain[r, m]: loss saved by removing row r's m largest entries
    taken = np.zeros(rows, dtype=np.int64)

    def best_step(r):  # the best average gain per outlier over the row's next steps
        m0 = taken[r]
        if m0 >= depth:
            return None
        j = np.arange(m0 + 1, depth + 1)
        rate = (gain[r, j] - gain[r, m0]) / (j - m0)
        k = int(np.argmax(rate))
        return -rate[k], r, int(j[k])

    heap = [step for step in (best_step(r) for r in range(rows)) if step is not None] if budget > 0 else []
    heapq.heapify(heap)
    left = budget
    while heap and left > 0:
        neg, r, m = heapq.heappop(heap)
        if -neg <= 0:
            break
        take = min(m - taken[r], left)
        taken[r] += take
        left -= take
        step = best_step(r)
        if step is not None:
            heapq.heappush(heap, step)
    keep = np.arange(depth)[None, :] < taken[:, None]
    order_h = order if xp is np else order.get()
    rr, cc = np.nonzero(keep)
    mask_h = np.zeros(w.shape, dtype=bool)
    mask_h[rr, order_h[rr, cc]] = True
    return mask_h if xp is np else xp.asarray(mask_h)


def outlier_mask(w: np.ndarray, sigma: float | None, stats: str = "tensor") -> np.ndarray:
    """Boolean mask of entries with |w - mean| >= sigma * std (float64 statistics).

    ``stats="tensor"`` uses one mean/std for the matrix (the paper), ``"row"`` one per
    output row, each sum taken left to right (what a row's loop does; the Numba backend fuses
    this with the float32 cast: ``split_outliers``). ``sigma=None`` selects nothing. A constant
    matrix has no outliers.
    """
    xp = array_module(w)
    mask = xp.zeros(w.shape, dtype=bool)
    if sigma is None:
        return mask
    if stats == "row":  # each slice of rows holds its own statistics: one float64 copy of it
        for rows in row_chunks(w.shape):
            dev = w[rows].astype(np.float64)
            dev -= _row_sums(dev) / w.shape[1]
            std = xp.sqrt(_row_sums(dev * dev) / w.shape[1])
            mask[rows] = (xp.abs(dev) >= sigma * std) & (std > 0)
        return mask
    mean, std = _tensor_mean_std(w)
    if std == 0:
        return mask
    for rows in row_chunks(w.shape):  # float64 work in slices: memory stays ~ one tensor
        mask[rows] = xp.abs(w[rows].astype(np.float64) - mean) >= sigma * std
    return mask


def _row_sums(a):
    """(rows, 1) float64 sums of each row of ``a``, left to right (NumPy's ``sum`` adds pairwise)."""
    return array_module(a).cumsum(a, axis=1)[:, -1:]


def _tensor_mean_std(w: np.ndarray) -> tuple[float, float]:
    """Two-pass float64 mean and (population) std of the whole matrix: per-row sums in row
    slices, then their sum."""
    xp = array_module(w)
    row_sum = xp.zeros((w.shape[0], 1))
    for r in row_chunks(w.shape):
        row_sum[r] = w[r].sum(axis=1, dtype=np.float64, keepdims=True)
    mean = float(row_sum.sum()) / w.size
    row_sq = xp.zeros((w.shape[0], 1))
    for r in row_chunks(w.shape):
        d = w[r].astype(np.float64) - mean
        row_sq[r] = xp.sum(d * d, axis=1, keepdims=True)
    return mean, float(xp.sqrt(row_sq.sum() / w.size))


def row_chunks(shape, elements: int = 1 << 18):
    """Row slices of a 2-D shape holding about ``elements`` entries each."""
    step = max(1, elements // max(1, shape[1]))
    return (slice(r, r + step) for r in range(0, shape[0], step))


def to_csr(w: np.ndarray, mask: np.ndarray) -> Outliers:
    """The masked entries of ``w`` as CSR (row-major order), on NumPy or CuPy arrays."""
    xp = array_module(w)
    rows, cols = xp.nonzero(mask)
    rowptr = xp.zeros(w.shape[0] + 1, dtype=np.int64)
    rowptr[1:] = xp.cumsum(xp.bincount(rows, minlength=w.shape[0]))
    return Outliers(narrow_rowptr(rowptr), cols.astype(col_index_dtype(w.shape[1])), w[rows, cols])


def concat_csr(parts) -> Outliers:
    """The CSR of consecutive row blocks (NumPy), given each block's own: row pointers shifted by
    the entries before the block, in :func:`eqcore.layout.rowptr_dtype` of the total."""
    if len(parts) == 1 and parts[0].rowptr.dtype == rowptr_dtype(parts[0].nnz):  # already so
        return parts[0]
    nnz = np.cumsum([0] + [p.nnz for p in parts])
    rowptr = np.concatenate([np.zeros(1, np.int64)] +
                            [np.asarray(p.rowptr[1:], np.int64) + n for p, n in zip(parts, nnz)])
    return Outliers(narrow_rowptr(rowptr), np.concatenate([p.cols for p in parts]),
                    np.concatenate([p.vals for p in parts]))


def csr_rows(rowptr) -> np.ndarray:
    """The row of each entry of a CSR with row pointers ``rowptr`` (NumPy)."""
    rowptr = np.asarray(rowptr)
    return np.repeat(np.arange(rowptr.shape[0] - 1), np.diff(rowptr))


def kept(outliers: Outliers, shape):
    """The bool mask (NumPy) that is False exactly at the outliers of a CSR."""
    mask = np.ones(shape, dtype=bool)
    mask[csr_rows(outliers.rowptr), np.asarray(outliers.cols)] = False
    return mask


def find_outliers(w: np.ndarray, sigma: float | None = 3.0, stats: str = "tensor") -> tuple[Outliers, np.ndarray]:
    """Split ``w`` into its outliers (CSR) and the boolean mask that selected them (the sigma rule)."""
    mask = outlier_mask(w, sigma, stats)
    return to_csr(w, mask), mask


def select(w, config, residual=None):
    """The outlier mask of ``w`` for ``config.outliers``; ``residual(x)`` gives each row's loss at
    its best scales for a float32 matrix x (only the budget selector calls it)."""
    if config.outliers == "sigma":
        return outlier_mask(w, config.sigma, config.outlier_stats)
    if config.outliers == "adpq":
        return adpq_mask(w, config.sigma, config.group_size)
    if config.outliers == "budget":
        return budget_mask(w, config.outlier_fraction, residual)
    raise ValueError(f"unknown outlier selector {config.outliers!r}")


SELECTORS = ("sigma", "adpq", "budget")
