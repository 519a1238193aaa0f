"""dequantize(): packed codes * scales, with the outliers scattered back, in one pass."""
from __future__ import annotations

import numpy as np

from . import backend as _backend
from .dtypes import finite_max, saturate, weight_dtype
from .packing import unpack
from .scales import expand_scales
from .tensor import QuantizedTensor


def dequantize_reference(qt: QuantizedTensor, dtype=None) -> np.ndarray:
    """NumPy reference: float32(q) * scale, clamped to ``dtype``'s finite range, cast (round to
    nearest even) to ``dtype``, then the outlier values (cast to ``dtype``) written at their
    positions."""
    dtype = weight_dtype(dtype or qt.dtype)
    rows, cols = qt.shape
    q = unpack(qt.qweight, qt.bits, cols).astype(np.float32) - np.float32(1 << (qt.bits - 1))
    top = np.float32(finite_max(dtype))
    with np.errstate(over="ignore"):  # a float32 product past the range is clamped next
        out = np.clip(q * expand_scales(qt.scales, cols, qt.group_size), -top, top).astype(dtype)
    r = np.repeat(np.arange(rows), np.diff(qt.outlier_rowptr))
    out[r, qt.outlier_cols.astype(np.int64)] = saturate(qt.outlier_vals, dtype)
    return out


def dequantize(qt: QuantizedTensor, dtype=None, *, backend: str = "auto"):
    """Dense (rows, cols) matrix of ``qt`` in ``dtype`` (default: the original dtype)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}")
    qt.validate()  # O(scales + nnz): its arrays may have been changed since construction
    be = _backend.select(backend, qt.qweight)
    if be == "numpy":
        return dequantize_reference(qt, dtype)
    if be == "cupy":
        from . import gpu

        return gpu.dequantize(qt, dtype)
    from . import cpu

    return cpu.dequantize(qt, weight_dtype(dtype or qt.dtype))
