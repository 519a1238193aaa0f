"""The NumPy backend: the reference codec, written to be read.

Packing layout, per row: the signed code q in [-2^(k-1), 2^(k-1) - 1] is stored as the
unsigned code u = q + 2^(k-1). A row of ``cols`` codes is padded with u = 0 to a multiple of
32 codes; every block of 32 codes fills exactly k uint32 words, code j of the row taking bits
[j*k, (j+1)*k) of the row's little-endian bit stream (bit b lives in word b // 32 at bit
b % 32). For k = 2, 4, 8 no code straddles a word; for k = 3 some do. Packed shape:
(rows, ceil(cols / 32) * k), dtype uint32.

Every backend (:mod:`eqcore.backends`) has these operations with these signatures:
``asarray``, ``encode``, ``pack``, ``unpack``, ``dequantize``; the fast ones are held to these.
"""
from __future__ import annotations

import numpy as np

from ..dtypes import finite_max, saturate, weight_dtype
from ..interop import array_module, is_cupy
from ..layout import BLOCK, check_bits, group_layout, packed_cols, qrange
from ..outliers import csr_rows

name = "numpy"


def asarray(a):
    """``a`` as a NumPy array (this backend's arrays)."""
    return np.asarray(a)


def codes(x: np.ndarray, s: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Signed codes clamp(rint(x / s)) as float32: x and s float32 (s broadcastable), so x / s is
    the IEEE float32 quotient, and rint rounds half to even."""
    return np.clip(np.rint(x / s), qmin, qmax)


def expand_scales(scales: np.ndarray, cols: int, group_size: int | None) -> np.ndarray:
    """Per-element scales (rows, cols) from per-group scales (rows, n_groups)."""
    g, _ = group_layout(cols, group_size)
    return np.repeat(scales, g, axis=1)[:, :cols]


def check_codes(codes, bits: int):
    """Validated (codes, bits) for packing: 2-D integers in [0, 2**bits) (NumPy or CuPy)."""
    bits = check_bits(bits)
    codes = codes if is_cupy(codes) else np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    return codes, bits


def check_packed(packed, bits: int, cols: int):
    """Validated (packed, bits) for unpacking ``cols`` codes per row (NumPy or CuPy)."""
    bits = check_bits(bits)
    packed = packed if is_cupy(packed) else np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint32:
        raise ValueError(f"packed must be a 2-D uint32 array, got {packed.dtype} {packed.shape}")
    if packed.shape[1] != packed_cols(cols, bits):
        raise ValueError(f"packed has {packed.shape[1]} words per row; {cols} {bits}-bit codes need {packed_cols(cols, bits)}")
    return packed, bits


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (rows, cols), each < 2**bits, into (rows, packed_cols) uint32."""
    codes, bits = check_codes(codes, bits)
    rows, cols = codes.shape
    nblk = -(-cols // BLOCK)
    padded = np.zeros((rows, nblk * BLOCK), dtype=np.uint64)
    padded[:, :cols] = codes
    # bit stream: code j -> bits [j*k, (j+1)*k); expand to single bits, regroup by 32
    shifts = np.arange(bits, dtype=np.uint64)
    bitplane = ((padded[:, :, None] >> shifts) & 1).reshape(rows, nblk * BLOCK * bits)
    words = bitplane.reshape(rows, -1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return words.sum(axis=2, dtype=np.uint64).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack`: (rows, packed_cols) uint32 -> (rows, cols) uint8 codes."""
    packed, bits = check_packed(packed, bits, cols)
    rows = packed.shape[0]
    bitstream = (packed[:, :, None].astype(np.uint64) >> np.arange(32, dtype=np.uint64)) & 1
    per_code = bitstream.reshape(rows, -1, bits) << np.arange(bits, dtype=np.uint64)
    return per_code.sum(axis=2, dtype=np.uint64)[:, :cols].astype(np.uint8)


def grid_codes(y, s, bits: int, zeros=None, codebook=None):
    """Unsigned codes u (uint8) of float32 ``y`` at float32 scales ``s`` (broadcastable) on one
    grid, NumPy or CuPy:

    symmetric   u = clamp(rint(y / s), qmin, qmax) - qmin
    asymmetric  u = clamp(rint(y / s + z), 0, 2^k - 1)        (z like s, float32 sum)
    codebook    u = #{j : mid_j < y / s}, mid_j = (cb[j] + cb[j+1]) / 2 in float32 (the nearest
                level; a quotient exactly at a midpoint takes the lower level)

    every quotient the IEEE float32 one, rint half to even."""
    xp = array_module(y)
    t = y / s
    if codebook is not None:
        mids = (codebook[:-1] + codebook[1:]) * np.float32(0.5)
        return xp.searchsorted(mids, t, side="left").astype(np.uint8)
    if zeros is not None:
        return xp.clip(xp.rint(t + zeros), 0, (1 << bits) - 1).astype(np.uint8)
    qmin, qmax = qrange(bits)
    return (xp.clip(xp.rint(t), qmin, qmax) - qmin).astype(np.uint8)


def grid_levels(u, bits: int, zeros=None, codebook=None):
    """The float32 level of each code: u + qmin, u - z (float32) or codebook[u]."""
    if codebook is not None:
        return codebook[u]
    if zeros is not None:
        return u.astype(np.float32) - zeros
    return u.astype(np.float32) + np.float32(qrange(bits)[0])


def _per_element(a, cols: int, group_size: int | None):
    return None if a is None else expand_scales(np.asarray(a).astype(np.float32), cols, group_size)


def encode(x: np.ndarray, scales: np.ndarray, bits: int, group_size: int | None, zeros=None, codebook=None,
           col_scales=None) -> np.ndarray:
    """Packed unsigned codes of float32 ``x`` (rows, cols) for ``scales`` (rows, n_groups) on the
    grid that ``zeros`` / ``codebook`` select; with ``col_scales`` (cols,), of x / col_scales."""
    x = np.asarray(x, np.float32)
    if col_scales is not None:
        x = x / np.asarray(col_scales).astype(np.float32)
    s = _per_element(scales, x.shape[1], group_size)
    cb = None if codebook is None else np.asarray(codebook, np.float32)
    return pack(grid_codes(x, s, bits, _per_element(zeros, x.shape[1], group_size), cb), bits)


def dequantize(qt, dtype=None, out=None) -> np.ndarray:
    """level(u) * scale (times the column's scale, if any), in float32, clamped to ``dtype``'s
    finite range, cast (round to nearest even) to ``dtype`` (default: the weight's), then the
    outlier values (clamped and cast the same way) written at their positions; copied into
    ``out`` if given."""
    dtype = weight_dtype(dtype or qt.dtype)
    cols = qt.shape[1]
    u = unpack(qt.qweight, qt.bits, cols)
    level = grid_levels(u, qt.bits, _per_element(qt.zeros, cols, qt.group_size), qt.codebook)
    top = np.float32(finite_max(dtype))
    with np.errstate(over="ignore"):  # a float32 product past the range is clamped next
        v = level * _per_element(qt.float_scales(), cols, qt.group_size)
        if qt.col_scales is not None:
            v = v * qt.col_scales.astype(np.float32)
        w = np.clip(v, -top, top).astype(dtype)
    w[csr_rows(qt.outlier_rowptr), qt.outlier_cols.astype(np.int64)] = saturate(qt.outlier_vals, dtype)
    if out is None:
        return w
    out[...] = w
    return out


def matmul(x, qt):
    """y = x @ W^T for (batch, cols) float32 ``x`` and W = ``dequantize(qt, float32)``: the
    specification of the fused kernels (which differ from it only in float summation order)."""
    return np.asarray(x, dtype=np.float32) @ dequantize(qt, np.float32).T
