"""Quantize with the default rules in one parallel pass (Numba, CPU).

For the per-row sigma outlier rule, the symmetric grid and the exact solver, each row is split
(:func:`eqcore.backends.numba.split_outliers`' row functions), solved group by group
(:data:`eqcore.solvers.exact_numba.group_exact`), its scales rounded to the stored dtype and
its codes packed, all while the row is in cache: one kernel launch instead of three, and no
float32 copy of the matrix. The result is bit for bit the three-step pipeline's
(``split_outliers``, ``optimize_scales``, :func:`eqcore.layout.round_scales`, ``encode``).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ..layout import group_layout, packed_cols, qrange
from ..solvers.exact_numba import BOUNDS, default_cap, group_exact, workspace
from .numba import _pack_row, _symmetric_codes, _weight_elements, split_csr, split_row, split_work
from .numba_bits import f32_to_bf16_bits, f32_to_f16_bits, half_bits_to_f32

SCALE_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}  # the scale dtypes this pass rounds to
_F16_TINY = np.float32(2.0 ** -24)  # float16's smallest subnormal
_F16_MAX = np.float32(65504.0)


@njit(inline="always")
def round_scale(s, kind):
    """float32 scale ``s`` rounded to nearest in the stored dtype (``SCALE_KINDS``), as a float32:
    :func:`eqcore.layout.round_scales` (float16 clipped to its finite positive range first)."""
    if kind == 1:
        return half_bits_to_f32(f32_to_f16_bits(min(max(s, _F16_TINY), _F16_MAX)))
    if kind == 2:
        return np.int32(np.int32(f32_to_bf16_bits(s)) << 16).view(np.float32)
    return s


@njit(parallel=True, cache=True)
def _quantize_kernel(w, kind, sigma, g, qmax, smax, scale_kind, bits, chunks, cap, bounds,
                     mean, thr, bnds, counts, scols, svals, scales, out):
    """Per row: the float32 cast with its outliers zeroed (mean, threshold, bounds and outliers as
    ``_split_kernel``), each group's exact scale rounded to the stored dtype into ``scales``, and
    the packed codes into ``out``; a row that is not finite only gets its NaN mean."""
    rows, cols = w.shape
    n_groups = scales.shape[1]
    g = min(g, cols)
    qmin = np.float32(-qmax - 1)
    per = (rows + chunks - 1) // chunks
    for k in prange(chunks):  # one workspace per chunk, reused by its rows
        x = np.empty(cols, np.float32)
        flags = np.empty(cols + 8, np.bool_)
        codes = np.empty(cols, np.uint8)
        wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk, wc, wA, wB, ks, kq = workspace(g, cap)
        for r in range(k * per, min(rows, k * per + per)):
            if not split_row(w, kind, sigma, r, x, flags, mean, thr, bnds, counts, scols, svals):
                continue
            for j in range(n_groups):
                c0 = j * g
                n = min(g, cols - c0)
                sc = round_scale(group_exact(x, c0, n, qmax, smax, wa, wtop, wcu, wcw, wd, wt, wk, wb, st, sk,
                                             wc, wA, wB, bounds, ks, kq), scale_kind)
                scales[r, j] = sc
                _symmetric_codes(x[c0:c0 + n], sc, qmin, qmax, codes[c0:c0 + n])
            _pack_row(codes, bits, out[r])


def quantize_rows(w: np.ndarray, sigma: float, bits: int, group_size: int | None, smax, scale_dtype: str,
                  out: np.ndarray | None = None, work: dict | None = None):
    """(packed codes, float32 scales on ``scale_dtype``'s grid, outliers' CSR) of a float16 /
    bfloat16 / float32 matrix by the per-row sigma rule, the symmetric ``bits`` grid and the
    exact solver (scales at most ``smax``), in one pass; None for other weight or scale dtypes.
    ``out``: the uint32 array (rows, packed_cols), rows C-contiguous, to pack into; ``work``: a
    dict for the scratch arrays, kept across row blocks. ValueError if w holds a NaN or an
    infinity."""
    wv, kind = _weight_elements(w)
    scale_kind = SCALE_KINDS.get(scale_dtype)
    if kind is None or scale_kind is None:
        return None
    rows, cols = w.shape
    g, n_groups = group_layout(cols, group_size)
    if out is None:
        out = np.empty((rows, packed_cols(cols, bits)), np.uint32)
    elif out.dtype != np.uint32 or out.shape != (rows, packed_cols(cols, bits)) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint32 array of shape {(rows, packed_cols(cols, bits))}")
    stats = split_work(wv, {} if work is None else work)
    scales = np.empty((rows, n_groups), np.float32)
    qmax = qrange(bits)[1]
    chunks = max(1, min(rows, 8 * numba.get_num_threads()))
    _quantize_kernel(wv, kind, float(sigma), g, np.float32(qmax), np.float32(smax), scale_kind, bits, chunks,
                     default_cap(g), BOUNDS, *stats, scales, out)
    return out, scales, split_csr(w, wv, kind, stats)
