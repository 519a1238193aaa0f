"""The Numba backend's scale decoding: float32 scales from their stored form in a parallel kernel
(a leaf module: the dequantize and matmul kernels both take it)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..layout import LOG8
from .numba_bits import half_bits_to_f32

SMALL = 4096  # scales below which NumPy decodes them: a parallel launch costs more (6 us against 1 for 576)

@njit(parallel=True, cache=True)
def _widen_scales(sbits, rbits, kind, log8, out):
    """out = float32 scales from their stored bits: float16 (kind 0), bfloat16 (1), or log8 codes
    times the rows' float16 scales ``rbits`` (2), each product rounded once as the reference's."""
    for r in prange(sbits.shape[0]):
        rs = half_bits_to_f32(rbits[r]) if kind == 2 else np.float32(0)
        for j in range(sbits.shape[1]):
            v = sbits[r, j]
            if kind == 0:
                out[r, j] = half_bits_to_f32(np.uint16(v))
            elif kind == 1:
                out[r, j] = np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
            else:
                out[r, j] = rs * log8[v]


def float_scales(qt) -> np.ndarray:
    """``qt.float_scales()``, float16, bfloat16 and log8 scales decoded by a parallel kernel from
    :data:`SMALL` of them on (NumPy's float16 cast of 4096x43 scales took 0.3 ms; the log8 ``take``
    0.18 ms for 4096x32)."""
    s = qt.scales
    if s.dtype == np.float32:
        return np.ascontiguousarray(s)
    if s.size < SMALL:
        return np.ascontiguousarray(qt.float_scales())
    kind = 2 if qt.row_scales is not None else (0 if s.dtype == np.float16 else 1)
    bits = np.ascontiguousarray(s).view(np.uint8 if kind == 2 else np.uint16)
    rbits = np.ascontiguousarray(qt.row_scales).view(np.uint16) if kind == 2 else np.zeros(1, np.uint16)
    out = np.empty(s.shape, np.float32)
    _widen_scales(bits, rbits, kind, LOG8, out)
    return out
