"""The numerical contract's constants and shapes, defined once.

Every backend, solver, data type and CUDA kernel takes these from here (CUDA through the
``-D`` defines of :func:`cuda_defines`): code widths, the signed code range, the packing
block, the group layout of scales, the outlier column-index dtype and the scale cap.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from .dtypes import INF_BITS, bfloat16, finite_max
from .interop import array_module

SUPPORTED_BITS = (2, 3, 4, 8)
BLOCK = 32  # codes per packing block; a block of k-bit codes is exactly k uint32 words
INDEX_DTYPES = ("uint16", "int32")  # outlier column indices (up to 65536 columns) and row pointers (up to 65535 outliers)
GRIDS = ("symmetric", "asymmetric", "codebook")  # how a code becomes a level; the index is the kernels' grid id
GRID_SYMMETRIC, GRID_ASYMMETRIC, GRID_CODEBOOK = range(3)
SCALE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": bfloat16,
                "log8": np.dtype(np.uint8)}
# "log8": a group's scale is a uint8 code q under a float16 scale per row: s = row_scale * LOG8[q],
# LOG8[q] = 2^(-q / LOG8_STEP) in float32 (a 1.1% step; 256 codes span a factor of 250)
LOG8_STEP = 32
LOG8 = np.exp2(-np.arange(256) / LOG8_STEP).astype(np.float32)


def check_bits(bits) -> int:
    """``bits`` as an int if it is a supported code width; ValueError otherwise."""
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the symmetric signed k-bit grid: [-2^(k-1), 2^(k-1) - 1]."""
    half = 1 << (check_bits(bits) - 1)
    return -half, half - 1


def packed_cols(cols: int, bits: int) -> int:
    """Number of uint32 words per packed row."""
    return -(-cols // BLOCK) * bits


def group_layout(cols: int, group_size: int | None) -> tuple[int, int]:
    """(g, n_groups): columns per scale (``cols`` when group_size is None, and never more
    than ``cols``) and the number of groups per row; the last group may be shorter."""
    if cols < 1:
        raise ValueError(f"a matrix needs at least one column, got {cols}")
    g = cols if group_size is None else min(int(group_size), cols)
    return g, -(-cols // g)


def col_index_dtype(n_cols: int) -> np.dtype:
    """Narrowest column-index dtype for a matrix with ``n_cols`` columns."""
    return np.dtype(np.uint16) if n_cols <= 65536 else np.dtype(np.int32)


def rowptr_dtype(nnz: int) -> np.dtype:
    """Narrowest outlier row-pointer dtype for a tensor with ``nnz`` outliers: uint16 up to
    65535 (the pointers run from 0 to nnz), int32 beyond (:func:`eqcore.outliers.check_csr`
    accepts int32 at any count, as files written before format 3 hold it)."""
    return np.dtype(np.uint16) if nnz <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def narrow_rowptr(rowptr):
    """Row pointers (any integer dtype, NumPy or CuPy) in :func:`rowptr_dtype` of their last entry;
    ValueError past int32."""
    nnz = int(rowptr[-1])
    if nnz > np.iinfo(np.int32).max:
        raise ValueError(f"too many outliers ({nnz}) for int32 row pointers")
    return rowptr.astype(rowptr_dtype(nnz), copy=False)


def float_dtype(scale_dtype) -> np.dtype:
    """The float dtype of ``scale_dtype``'s floats: itself, or float16 for "log8" (its row scales,
    and the zero-points and column scales stored beside it)."""
    sd = SCALE_DTYPES[scale_dtype] if isinstance(scale_dtype, str) else np.dtype(scale_dtype)
    return np.dtype(np.float16) if sd == np.uint8 else sd


def max_scale(dtype, qmax: int, scale_dtype="float32") -> np.float32:
    """Largest float32 scale s, representable in ``scale_dtype``, with qmax * s <= the finite
    maximum of ``dtype`` (exact test)."""
    sd = scale_dtype if isinstance(scale_dtype, str) else np.dtype(scale_dtype)
    return _max_scale(np.dtype(dtype), int(qmax), sd)  # cached: a quantize call asks once per row block


@functools.lru_cache(maxsize=None)
def _max_scale(dtype, qmax, scale_dtype):
    top = finite_max(dtype)
    sd = float_dtype(scale_dtype)
    s = np.float32(min(top / qmax, float(np.finfo(np.float16).max) if sd == np.float16 else top))
    s = np.float32(s.astype(sd))
    while float(s) * qmax > top:
        s = np.float32(np.nextafter(s.astype(sd), np.zeros((), sd)))
    return s


def round_scales(scales, scale_dtype: str):
    """float32 ``scales`` rounded to nearest in ``scale_dtype`` (NumPy or CuPy) and stored that way;
    float16 scales never round to 0 (the smallest positive float16 is the floor). For "log8" the
    float32 values on its grid (:func:`split_log8` stores them): each row's largest scale rounded
    to float16 is the row scale (rounded down where float16's subnormals would put the largest
    scale a code below it; exact for rows whose largest scale is at least float16's smallest
    subnormal), and every scale goes to the nearest code in log scale (clipped: scales below 1/250
    of their row's largest take the smallest step)."""
    sd = SCALE_DTYPES[scale_dtype]
    if sd == np.float32:
        return scales
    if sd == np.uint8:
        xp = array_module(scales)
        top = scales.max(axis=1, keepdims=True)
        rs = round_scales(top, "float16")
        # float16's subnormals are coarser than a code step: rounded up there, the row's largest scale
        # would take code 1 and the row scale (which split_log8 reads back as the largest) would not be
        # stored exactly; such a row scale is rounded down instead (found by hypothesis at 1e-6)
        up = xp.rint(-LOG8_STEP * xp.log2(top.astype(np.float64) / rs.astype(np.float64))) > 0
        tiny = np.float16(np.finfo(np.float16).smallest_subnormal)
        rs = xp.where(up, xp.maximum(xp.nextafter(rs, xp.zeros((), np.float16)), tiny), rs).astype(np.float32)
        q = xp.clip(xp.rint(-LOG8_STEP * xp.log2(scales.astype(np.float64) / rs)), 0, 255).astype(np.uint8)
        return rs * xp.asarray(LOG8).take(q)
    if sd == np.float16:
        scales = scales.clip(np.float32(np.finfo(np.float16).smallest_subnormal), np.float32(np.finfo(np.float16).max))
    return scales.astype(sd)


def stored_scales(scales, scale_dtype: str):
    """(scales, row_scales) as a QuantizedTensor stores :func:`round_scales`' result: itself and
    None, or for "log8" its :func:`split_log8`."""
    return split_log8(scales) if scale_dtype == "log8" else (scales, None)


def split_log8(scales):
    """(uint8 codes (rows, n_groups), float16 row scales (rows,)) of float32 scales on the "log8"
    grid (from :func:`round_scales`); :func:`float_scales` gives them back exactly."""
    xp = array_module(scales)
    rs = scales.max(axis=1)
    q = xp.rint(-LOG8_STEP * xp.log2(scales.astype(np.float64) / rs[:, None])).astype(np.uint8)
    return q, rs.astype(np.float16)


def float_scales(scales, row_scales=None):
    """The float32 scales (rows, n_groups) that the kernels take, from stored ``scales`` (NumPy or
    CuPy): a float dtype converted, or "log8" codes with their ``row_scales`` decoded."""
    if row_scales is None:
        return scales.astype(np.float32)
    return row_scales.astype(np.float32)[:, None] * array_module(scales).asarray(LOG8).take(scales)


def scale_bounds(scales, row_scales=None) -> tuple[bool, float]:
    """(whether every scale :func:`float_scales` gives is finite and positive, the largest of them),
    from the stored form without decoding it (NumPy or CuPy, a non-empty ``scales``). A float's
    bits, read as an unsigned integer, are in (0, +inf) exactly when it is finite and positive, and
    order such floats as their values do. A log8 row's scales are its row scale times LOG8[q]: finite
    and positive when the row scale is (LOG8[255] times float16's smallest value is a normal
    float32), the largest at the row's smallest code (LOG8 falls and rounding keeps the order)."""
    xp = array_module(scales)
    if row_scales is not None:
        r = row_scales.astype(np.float32)
        ok = bool(xp.all(xp.isfinite(r) & (r > 0)))
        return ok, float((r * xp.asarray(LOG8).take(scales.min(axis=1))).max()) if ok else math.nan
    uint, inf = INF_BITS[scales.dtype]
    bits = scales.view(uint)
    if not bool(xp.all((bits > 0) & (bits < inf))):
        return False, math.nan
    top = bits.max()
    return True, float((np.asarray(top) if xp is np else top.get()).view(scales.dtype))


def round_zeros(zeros, scale_dtype: str):
    """float32 zero-points rounded to nearest in ``scale_dtype`` (NumPy or CuPy), clipped to its
    finite range."""
    sd = float_dtype(scale_dtype)
    if sd == np.float32:
        return zeros
    top = np.float32(finite_max(sd))
    return zeros.clip(-top, top).astype(sd)


def stored_bytes(shape, bits: int, group_size: int | None = None, *, nnz: int = 0, weight_itemsize: int = 2,
                 grid: str = "symmetric", scale_dtype: str = "float32", col_scales: bool = False) -> int:
    """Bytes a QuantizedTensor of this layout stores (``QuantizedTensor.nbytes``): packed codes,
    scales (and zero-points), the codebook, column scales, and the outlier CSR (row pointers in
    :func:`rowptr_dtype`, column indices, values in the weight's dtype)."""
    rows, cols = shape
    scale, side = SCALE_DTYPES[scale_dtype].itemsize, float_dtype(scale_dtype).itemsize
    n_groups = group_layout(cols, group_size)[1]
    size = rows * packed_cols(cols, bits) * 4 + rows * n_groups * (scale + (side if grid == "asymmetric" else 0))
    size += rows * side if scale_dtype == "log8" else 0
    size += (4 << bits) if grid == "codebook" else 0
    size += cols * side if col_scales else 0
    return size + (rows + 1) * rowptr_dtype(nnz).itemsize + nnz * (col_index_dtype(cols).itemsize + weight_itemsize)


def cuda_defines() -> list[str]:
    """The contract as ``-D`` options for raw_kernels/*.cu (NVRTC and the host shim)."""
    return [f"-DEQ_BLOCK={BLOCK}"]
