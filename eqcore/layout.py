"""The numerical contract's constants and shapes, defined once.

Every backend, solver, data type and CUDA kernel takes these from here (CUDA through the
``-D`` defines of :func:`cuda_defines`): code widths, the signed code range, the packing
block, the group layout of scales, the outlier column-index dtype and the scale cap.
"""
from __future__ import annotations

import numbers

import numpy as np

from .dtypes import finite_max

SUPPORTED_BITS = (2, 3, 4, 8)
BLOCK = 32  # codes per packing block; a block of k-bit codes is exactly k uint32 words
INDEX_DTYPES = ("uint16", "int32")  # outlier column indices: uint16 up to 65536 columns


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


def max_scale(dtype, qmax: int) -> np.float32:
    """Largest float32 scale s with qmax * s <= the finite maximum of ``dtype`` (exact test)."""
    top = finite_max(dtype)
    s = np.float32(top / qmax)
    while float(s) * qmax > top:
        s = np.nextafter(s, np.float32(0))
    return s


def cuda_defines() -> list[str]:
    """The contract as ``-D`` options for raw_kernels/*.cu (NVRTC and the host shim)."""
    return [f"-DEQ_BLOCK={BLOCK}"]
