"""GPU backend on CuPy: quantize, dequantize (fused outlier scatter), encode, pack, unpack.

Everything stays on the device: outlier statistics and the CSR with CuPy, scales with
the Numba-CUDA Adam of :mod:`eqcore.cuda_scales`, codes and dequantization with the
CUDA C kernels of ``raw_kernels/`` (see :mod:`eqcore.kernels`). Results are bit-identical
to the NumPy reference given the same outliers and scales. bfloat16 arrays are CuPy
arrays of dtype ``ml_dtypes.bfloat16`` (supported natively by CuPy >= 14).

Outlier selection uses float64 mean/std computed by CuPy; its summation order differs
from NumPy's, so an entry lying within ~1e-16 (relative) of the threshold may be
classified differently from the CPU backends.
"""
from __future__ import annotations

import numpy as np

from . import kernels
from .config import QuantConfig
from .dtypes import dtype_name, weight_dtype
from .outliers import find_outliers
from .packing import check_bits, check_codes, check_packed, packed_cols
from .scales import max_scale
from .tensor import QuantizedTensor


def _cp():
    import cupy

    return cupy


def _dev(a):
    """C-contiguous CuPy array (NumPy input is copied to the device)."""
    return _cp().ascontiguousarray(a)


def _run(launch: kernels.Launch) -> None:
    kernels.get_function(launch.name)(launch.grid, launch.block, launch.args)


def encode(x, scales, bits: int, group_size: int | None):
    """Packed codes (rows, ceil(cols/32)*bits) uint32 of float32 ``x`` for the given scales."""
    x, scales = _dev(x), _dev(scales)
    out = _cp().empty((x.shape[0], packed_cols(x.shape[1], check_bits(bits))), dtype=np.uint32)
    _run(kernels.encode_launch(x, scales, out, bits, group_size))
    return out


def quantize(w, config: QuantConfig) -> QuantizedTensor:
    """EasyQuant of a CuPy (rows, cols) weight; every array of the result is on the GPU."""
    from .cuda_scales import optimize_scales_cuda

    cp = _cp()
    w = _dev(w)
    outliers, mask = find_outliers(w, config.sigma, config.outlier_stats)
    x = w.astype(cp.float32)
    x[mask] = 0.0
    del mask
    scales = cp.ascontiguousarray(optimize_scales_cuda(x, config, max_scale(w.dtype, config.qmax)), dtype=cp.float32)
    qweight = encode(x, scales, config.bits, config.group_size)
    return QuantizedTensor(qweight, scales, *outliers, shape=w.shape, dtype=dtype_name(w.dtype),
                           bits=config.bits, group_size=config.group_size, sigma=config.sigma)


def dequantize(qt: QuantizedTensor, dtype=None):
    """Dense CuPy (rows, cols) matrix of ``qt`` in ``dtype`` (default: its own), one kernel launch."""
    dtype = weight_dtype(dtype or qt.dtype)
    out = _cp().empty(qt.shape, dtype=dtype)
    _run(kernels.dequant_launch(_dev(qt.qweight), _dev(qt.scales), _dev(qt.outlier_rowptr), _dev(qt.outlier_cols),
                                _dev(qt.outlier_vals), out, qt.bits, qt.group_size))
    return out


def scatter_outliers(out, rowptr, cols, vals):
    """Write CSR outliers into the C-contiguous CuPy matrix ``out`` in place; returns ``out``."""
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    _run(kernels.scatter_launch(_dev(rowptr), _dev(cols), _dev(vals), out))
    return out


def pack(codes, bits: int):
    """GPU :func:`eqcore.packing.pack`: unsigned codes (rows, cols) -> (rows, packed) uint32."""
    cp = _cp()
    codes, bits = check_codes(cp.asarray(codes), bits)
    codes = cp.ascontiguousarray(codes, dtype=cp.uint8)
    out = cp.empty((codes.shape[0], packed_cols(codes.shape[1], bits)), dtype=cp.uint32)
    _run(kernels.pack_launch(codes, out, bits))
    return out


def unpack(packed, bits: int, cols: int):
    """GPU :func:`eqcore.packing.unpack`: (rows, packed) uint32 -> (rows, cols) uint8 codes."""
    cp = _cp()
    packed, bits = check_packed(_dev(packed), bits, cols)
    out = cp.empty((packed.shape[0], cols), dtype=cp.uint8)
    _run(kernels.unpack_launch(packed, out, bits))
    return out
