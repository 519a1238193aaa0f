"""quantize(): outliers -> scale optimisation -> codes -> packing, for one weight matrix."""
from __future__ import annotations

import numpy as np

from . import backend as _backend
from .config import QuantConfig
from .dtypes import FLOAT32_MAX, dtype_name, weight_dtype
from .outliers import find_outliers
from .packing import pack
from .scales import codes_reference, expand_scales, max_scale, optimize_scales_reference
from .tensor import QuantizedTensor


def check_weight(w) -> np.ndarray:
    """Refuse anything but a finite, non-empty 2-D float matrix, with a clear message."""
    shape = getattr(w, "shape", None)
    if shape is None:
        raise TypeError(f"expected an array, got {type(w).__name__}")
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D weight matrix (out_features, in_features), got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"cannot quantize an empty matrix of shape {tuple(shape)}")
    weight_dtype(w.dtype)
    xp = _backend.array_module(w)
    if not bool(xp.isfinite(w.astype(np.float32) if w.dtype.itemsize == 2 else w).all()):
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    if w.dtype == np.float64:
        big = float(xp.abs(w).max())
        if big > FLOAT32_MAX:
            raise ValueError(f"float64 weight has values beyond float32's range (max |w| = {big:.3g}); "
                             "eqcore computes codes and scales in float32")
    return w


def encode_reference(x: np.ndarray, scales: np.ndarray, config: QuantConfig) -> np.ndarray:
    """Packed unsigned codes of float32 ``x`` for the given scales (NumPy reference)."""
    s = expand_scales(scales, x.shape[1], config.group_size)
    q = codes_reference(x, s, config.qmin, config.qmax)
    return pack((q - config.qmin).astype(np.uint8), config.bits)


def quantize(w, config: QuantConfig | None = None, *, backend: str = "auto", **options) -> QuantizedTensor:
    """Quantize a 2-D weight matrix (out_features, in_features) with EasyQuant.

    ``config`` or keyword options (``bits=4, sigma=3.0, group_size=None, steps=500, ...``,
    see :class:`QuantConfig`). Accepts NumPy, CuPy or any DLPack array; the result
    lives where the data does. ``backend``: "auto", "numpy" (reference), "numba", "cupy".
    """
    from .interop import as_array

    config = config or QuantConfig()
    if options:
        config = config.replace(**options)
    w = check_weight(as_array(w))
    be = _backend.select(backend, w)
    if be == "cupy":
        from . import gpu

        return gpu.quantize(w, config)
    outliers, mask = find_outliers(w, config.sigma, config.outlier_stats)
    x = w.astype(np.float32)
    x[mask] = 0.0
    smax = max_scale(w.dtype, config.qmax)
    if be == "numpy":
        scales = optimize_scales_reference(x, config, smax)
        qweight = encode_reference(x, scales, config)
    else:
        from . import cpu

        scales = cpu.optimize_scales(x, config, smax)
        qweight = cpu.encode(x, scales, config.bits, config.group_size)
    return QuantizedTensor(qweight, scales, outliers.rowptr, outliers.cols, outliers.vals,
                           shape=w.shape, dtype=dtype_name(w.dtype), bits=config.bits,
                           group_size=config.group_size, sigma=config.sigma)
