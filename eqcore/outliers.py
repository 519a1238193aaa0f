"""n-sigma outlier isolation: |W - mean| >= n * std, stored as CSR per output row."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


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


def col_index_dtype(n_cols: int) -> np.dtype:
    """Narrowest column-index dtype for a matrix with ``n_cols`` columns."""
    return np.dtype(np.uint16) if n_cols <= 65536 else np.dtype(np.int32)


def outlier_mask(w: np.ndarray, sigma: float | None, stats: str = "tensor") -> np.ndarray:
    """Boolean mask of entries with |w - mean| >= sigma * std (float64 statistics).

    ``stats="tensor"`` uses one mean/std for the matrix (the paper), ``"row"`` one per
    output row. ``sigma=None`` selects nothing. A constant matrix has no outliers.
    """
    if sigma is None:
        return np.zeros(w.shape, dtype=bool)
    x = w.astype(np.float64)
    axis = None if stats == "tensor" else 1
    mean = x.mean(axis=axis, keepdims=True)
    std = x.std(axis=axis, keepdims=True)
    return (np.abs(x - mean) >= sigma * std) & (std > 0)


def to_csr(w: np.ndarray, mask: np.ndarray) -> Outliers:
    """The masked entries of ``w`` as CSR (row-major order)."""
    rows, cols = np.nonzero(mask)
    counts = np.bincount(rows, minlength=w.shape[0])
    rowptr = np.zeros(w.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=rowptr[1:])
    if rowptr[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"too many outliers ({rowptr[-1]}) for int32 row pointers")
    return Outliers(rowptr.astype(np.int32), cols.astype(col_index_dtype(w.shape[1])), w[rows, cols])


def find_outliers(w: np.ndarray, sigma: float | None = 3.0, stats: str = "tensor") -> tuple[Outliers, np.ndarray]:
    """Split ``w`` into its outliers (CSR) and the boolean mask that selected them."""
    mask = outlier_mask(w, sigma, stats)
    return to_csr(w, mask), mask
