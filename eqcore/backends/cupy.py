"""The CuPy backend: the codec on the GPU, with the CUDA C kernels of ``raw_kernels/``.

Same operations and signatures as :mod:`eqcore.backends.numpy`, bit-identical results; every
array stays on the device. Kernels are compiled by :mod:`eqcore.backends.nvrtc` and launched
through the plans of :mod:`eqcore.backends.launch`. bfloat16 arrays are CuPy arrays of dtype
``ml_dtypes.bfloat16`` (supported natively by CuPy >= 14).

Outlier selection (shared code, :mod:`eqcore.outliers`) uses float64 mean/std computed by
CuPy; its summation order differs from NumPy's, so an entry lying within ~1e-16 (relative) of
the threshold may be classified differently from the CPU backends.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import weight_dtype
from ..layout import check_bits, packed_cols
from . import launch, nvrtc
from .numpy import check_codes, check_packed

name = "cupy"


def _cp():
    import cupy

    return cupy


def asarray(a):
    """``a`` as a C-contiguous CuPy array (NumPy input is copied to the device)."""
    cp = _cp()
    return cp.ascontiguousarray(cp.asarray(a))  # cupy.ascontiguousarray takes CuPy arrays only


def _f32(a):
    """``a`` (or None) as a C-contiguous float32 CuPy array: exact for float16 / bfloat16 values."""
    return None if a is None else _cp().ascontiguousarray(_cp().asarray(a).astype(np.float32))


def encode(x, scales, bits: int, group_size: int | None, zeros=None, codebook=None, col_scales=None):
    """Packed codes (rows, ceil(cols/32)*bits) uint32 of float32 ``x`` on the grid ``zeros`` /
    ``codebook`` select (of x / col_scales, if given)."""
    x = _cp().ascontiguousarray(asarray(x), dtype=np.float32)
    if col_scales is not None:
        y = _cp().empty_like(x)
        nvrtc.run(launch.divide_cols_launch(x, _f32(col_scales), y))
        x = y
    out = _cp().empty((x.shape[0], packed_cols(x.shape[1], check_bits(bits))), dtype=np.uint32)
    nvrtc.run(launch.encode_launch(x, _f32(scales), out, bits, group_size, _f32(zeros), _f32(codebook)))
    return out


def pack(codes, bits: int):
    """Unsigned codes (rows, cols) -> (rows, packed_cols) uint32."""
    cp = _cp()
    codes, bits = check_codes(asarray(codes), bits)
    codes = cp.ascontiguousarray(codes, dtype=cp.uint8)
    out = cp.empty((codes.shape[0], packed_cols(codes.shape[1], bits)), dtype=cp.uint32)
    nvrtc.run(launch.pack_launch(codes, out, bits))
    return out


def unpack(packed, bits: int, cols: int):
    """(rows, packed_cols) uint32 -> (rows, cols) uint8 codes."""
    packed, bits = check_packed(asarray(packed), bits, cols)
    out = _cp().empty((packed.shape[0], cols), dtype=np.uint8)
    nvrtc.run(launch.unpack_launch(packed, out, bits))
    return out


def _tensor(qt):
    """``qt``'s arrays as the kernels take them, on the device: (qweight, scales, rowptr, cols, vals)
    and the grid's zeros / codebook / col keywords (float32, or None)."""
    return ((asarray(qt.qweight), asarray(qt.float_scales()), asarray(qt.outlier_rowptr), asarray(qt.outlier_cols),
             asarray(qt.outlier_vals)), dict(zeros=_f32(qt.zeros), codebook=_f32(qt.codebook), col=_f32(qt.col_scales)))


def dequantize(qt, dtype=None, out=None):
    """Dense CuPy (rows, cols) matrix of ``qt`` in ``dtype`` (default: its own), one kernel launch;
    into ``out`` (C-contiguous, that shape and dtype) if given."""
    dtype = weight_dtype(dtype or qt.dtype)
    out = _cp().empty(qt.shape, dtype=dtype) if out is None else out
    arrays, grid = _tensor(qt)
    nvrtc.run(launch.dequant_launch(*arrays, out, qt.bits, qt.group_size, **grid))
    return out


def matmul(x, qt):
    """y = x @ W^T (float32), :func:`eqcore.backends.numpy.matmul`'s contract. Up to
    ``launch.GEMV_BATCHES[-1]`` rows of x: the GEMV kernel on the packed codes, outliers fused (one
    launch); more: the baseline, W dequantized by the fused kernel, then cuBLAS."""
    cp = _cp()
    x = cp.ascontiguousarray(asarray(x), dtype=np.float32)
    if not 1 <= x.shape[0] <= launch.GEMV_BATCHES[-1]:
        return cp.matmul(x, dequantize(qt, np.float32).T)
    out = cp.empty((x.shape[0], qt.shape[0]), dtype=np.float32)
    arrays, grid = _tensor(qt)
    nvrtc.run(launch.gemv_launch(x, *arrays, out, qt.bits, qt.group_size, **grid))
    return out
