"""Packing of k-bit codes into uint32 words (NumPy reference).

Layout, per row: the signed code q in [-2^(k-1), 2^(k-1) - 1] is stored as the
unsigned code u = q + 2^(k-1). A row of ``cols`` codes is padded with u = 0 to a
multiple of 32 codes; every block of 32 codes fills exactly k uint32 words, code j
of the row taking bits [j*k, (j+1)*k) of the row's little-endian bit stream (bit b
lives in word b // 32 at bit b % 32). For k = 2, 4, 8 no code straddles a word;
for k = 3 some do. Packed shape: (rows, ceil(cols / 32) * k), dtype uint32.
"""
from __future__ import annotations

import numpy as np

from .backend import is_cupy
from .config import SUPPORTED_BITS

BLOCK = 32  # codes per packing block; a block is exactly `bits` words


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def packed_cols(cols: int, bits: int) -> int:
    """Number of uint32 words per packed row."""
    return -(-cols // BLOCK) * bits


def check_codes(codes, bits: int) -> tuple[np.ndarray, int]:
    """Validated (codes, bits) for packing: 2-D integers in [0, 2**bits) (NumPy or CuPy)."""
    bits = check_bits(bits)
    codes = codes if is_cupy(codes) else np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    return codes, bits


def check_packed(packed, bits: int, cols: int) -> tuple[np.ndarray, int]:
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
