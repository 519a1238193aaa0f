"""The one pipeline: quantize = outliers -> scales (a solver) -> codes -> pack; dequantize;
pack and unpack. Each dispatches to the backend where the data lives
(:mod:`eqcore.backends`); the scale search to the configured solver (:mod:`eqcore.solvers`).
"""
from __future__ import annotations

import numpy as np

from . import backends, solvers
from .config import QuantConfig
from .dtypes import FLOAT32_MAX, dtype_name, weight_dtype
from .interop import array_module, as_array
from .layout import max_scale
from .outliers import find_outliers
from .tensor import QuantizedTensor


def check_weight(w):
    """Refuse anything but a finite, non-empty 2-D float matrix, with a clear message."""
    shape = getattr(w, "shape", None)
    if shape is None:
        raise TypeError(f"expected an array, got {type(w).__name__}")
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight matrix (out_features, in_features), got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"cannot quantize an empty matrix of shape {tuple(shape)}")
    weight_dtype(w.dtype)
    xp = array_module(w)
    if not bool(xp.isfinite(w.astype(np.float32) if w.dtype.itemsize == 2 else w).all()):
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    if w.dtype == np.float64:
        big = float(xp.abs(w).max())
        if big > FLOAT32_MAX:
            raise ValueError(f"float64 weight has values beyond float32's range (max |w| = {big:.3g}); "
                             "eqcore computes codes and scales in float32")
    return w


def quantize(w, config: QuantConfig | None = None, *, backend: str = "auto", **options) -> QuantizedTensor:
    """Quantize a 2-D weight matrix (out_features, in_features) with EasyQuant.

    ``config`` or keyword options (``bits=4, sigma=3.0, group_size=None, steps=500, ...``,
    see :class:`QuantConfig`). Accepts NumPy, CuPy or any DLPack array; the result
    lives where the data does. ``backend``: "auto", "numpy" (reference), "numba", "cupy".
    """
    config = config or QuantConfig()
    if options:
        config = config.replace(**options)
    w = check_weight(as_array(w))
    name = backends.select(backend, w)
    be = backends.get(name)
    w = be.asarray(w)
    outliers, mask = find_outliers(w, config.sigma, config.outlier_stats)
    x = w.astype(np.float32)
    x[mask] = 0.0  # outliers take no part in the scales, and get the code of 0
    del mask
    scales = solvers.get(config.solver, name)(x, config, max_scale(w.dtype, config.qmax))
    qweight = be.encode(x, scales, config.bits, config.group_size)
    return QuantizedTensor(qweight, scales, *outliers, shape=w.shape, dtype=dtype_name(w.dtype),
                           bits=config.bits, group_size=config.group_size, sigma=config.sigma)


def dequantize(qt: QuantizedTensor, dtype=None, *, backend: str = "auto"):
    """Dense (rows, cols) matrix of ``qt`` in ``dtype`` (default: the original dtype), outliers
    restored exactly, in one pass; where ``qt``'s arrays live (NumPy or CuPy)."""
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"expected a QuantizedTensor, got {type(qt).__name__}")
    qt.validate()  # O(scales + nnz): its arrays may have been changed since construction
    return backends.get(backends.select(backend, qt.qweight)).dequantize(qt, dtype)


def pack(codes, bits: int, *, backend: str = "auto"):
    """Pack unsigned codes (rows, cols), each < 2**bits, into (rows, ceil(cols/32)*bits) uint32
    (layout: :mod:`eqcore.backends.numpy`)."""
    codes = as_array(codes)
    return backends.get(backends.select(backend, codes)).pack(codes, bits)


def unpack(packed, bits: int, cols: int, *, backend: str = "auto"):
    """Inverse of :func:`pack`: (rows, packed_cols) uint32 -> (rows, cols) uint8 codes."""
    packed = as_array(packed)
    return backends.get(backends.select(backend, packed)).unpack(packed, bits, cols)
