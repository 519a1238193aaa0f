"""n-sigma outlier isolation: |W - mean| >= n * std, stored as CSR per output row."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .interop import array_module
from .layout import col_index_dtype


class Outliers(NamedTuple):
    """CSR of the outliers of a (rows, cols) matrix.

    rowptr  int32 (rows + 1,): outliers of row r are entries rowptr[r]:rowptr[r+1]
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
    if rowptr.dtype != np.int32 or tuple(rowptr.shape) != (rows + 1,):
        raise ValueError(f"outlier_rowptr must be int32 ({rows + 1},), got {rowptr.dtype} {tuple(rowptr.shape)}")
    nnz = int(rowptr[-1])
    if int(rowptr[0]) != 0 or bool((xp.diff(rowptr) < 0).any()):
        raise ValueError("outlier_rowptr must start at 0 and be non-decreasing")
    if cols.dtype != col_index_dtype(n_cols) or tuple(cols.shape) != (nnz,):
        raise ValueError(f"outlier_cols must be {col_index_dtype(n_cols)} ({nnz},) as outlier_rowptr[-1] says, "
                         f"got {cols.dtype} {tuple(cols.shape)}")
    if tuple(vals.shape) != (nnz,):
        raise ValueError(f"outlier_vals must have {nnz} entries as outlier_rowptr[-1] says, got {tuple(vals.shape)}")
    if not nnz:
        return
    c = cols.astype(np.int64)
    if int(c.min()) < 0 or int(c.max()) >= n_cols:
        raise ValueError(f"outlier_cols out of range [0, {n_cols})")
    ok = c[1:] > c[:-1]
    starts = rowptr[1:-1]
    starts = starts[(starts > 0) & (starts < nnz)]
    ok[starts - 1] = True  # a new row may start anywhere
    if not bool(ok.all()):
        raise ValueError("outlier_cols must be strictly increasing within each row")
    v = vals.astype(np.float32) if vals.dtype.itemsize == 2 else vals
    if not bool(xp.isfinite(v).all()):
        raise ValueError("outlier_vals must be finite")


def outlier_mask(w: np.ndarray, sigma: float | None, stats: str = "tensor") -> np.ndarray:
    """Boolean mask of entries with |w - mean| >= sigma * std (float64 statistics).

    ``stats="tensor"`` uses one mean/std for the matrix (the paper), ``"row"`` one per
    output row. ``sigma=None`` selects nothing. A constant matrix has no outliers.
    """
    xp = array_module(w)
    mask = xp.zeros(w.shape, dtype=bool)
    if sigma is None:
        return mask
    mean, std = _mean_std(w, per_row=stats == "row")
    for rows in row_chunks(w.shape):  # float64 work in slices: memory stays ~ one tensor
        dev = xp.abs(w[rows].astype(np.float64) - mean[rows])
        mask[rows] = (dev >= sigma * std[rows]) & (std[rows] > 0)
    return mask


def _mean_std(w: np.ndarray, per_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass float64 mean and (population) std, per row or of the whole matrix, as (rows, 1)."""
    xp = array_module(w)
    rows, cols = w.shape
    row_sum = xp.zeros((rows, 1))
    for r in row_chunks(w.shape):
        row_sum[r] = w[r].sum(axis=1, dtype=np.float64, keepdims=True)
    mean = row_sum / cols if per_row else xp.broadcast_to(row_sum.sum() / w.size, (rows, 1))
    row_sq = xp.zeros((rows, 1))
    for r in row_chunks(w.shape):
        d = w[r].astype(np.float64) - mean[r]
        row_sq[r] = xp.sum(d * d, axis=1, keepdims=True)
    var = row_sq / cols if per_row else xp.broadcast_to(row_sq.sum() / w.size, (rows, 1))
    return mean, xp.sqrt(var)


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
    nnz = int(rowptr[-1])
    if nnz > np.iinfo(np.int32).max:
        raise ValueError(f"too many outliers ({nnz}) for int32 row pointers")
    return Outliers(rowptr.astype(np.int32), cols.astype(col_index_dtype(w.shape[1])), w[rows, cols])


def find_outliers(w: np.ndarray, sigma: float | None = 3.0, stats: str = "tensor") -> tuple[Outliers, np.ndarray]:
    """Split ``w`` into its outliers (CSR) and the boolean mask that selected them."""
    mask = outlier_mask(w, sigma, stats)
    return to_csr(w, mask), mask
