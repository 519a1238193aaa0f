"""y = x @ W^T on the CPU from the packed form (Numba kernels, parallel over output rows).

:func:`matmul` is the Numba backend's matmul (:func:`eqcore.backends.numba.matmul` calls it): equal
to the NumPy reference (:func:`eqcore.backends.numpy.matmul`, x @ dequantize(W)^T) up to float32
summation order.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..layout import GRID_ASYMMETRIC, GRID_CODEBOOK
from .numba import _chunks, _tensor_args, _unpack_row, dequantize, grid_level


@njit(parallel=True, fastmath=True, cache=True)
def _matmul_kernel(x, xc, qweight, scales, g, bits, qmin, grid, zeros, codebook, col, rowptr, ocols, ovals, chunks,
                   out):
    """out[:, r] = x @ W[r] for every row r, W never formed: the row's codes are unpacked once and
    each group's sum of level * xc (xc = x * col, x when there are no column scales) is taken
    times its scale; levels are u + qmin or u - z (vectorised), or codebook[u]; then
    the row's outliers replace their dense value. Rows go in ``chunks`` (one workspace each)."""
    batch, cols = x.shape
    rows = qweight.shape[0]
    n_groups = scales.shape[1]
    has_col = col.shape[0] > 0
    per = (rows + chunks - 1) // chunks
    for k in prange(chunks):
        codes = np.empty(cols, np.uint8)
        acc = np.empty(batch, np.float32)
        for r in range(k * per, min(rows, k * per + per)):
            _unpack_row(qweight[r], bits, codes)
            acc[:] = 0
            for j in range(n_groups):
                s = scales[r, j]
                c0 = j * g
                c1 = min(c0 + g, cols)
                if grid == GRID_CODEBOOK:
                    for b in range(batch):
                        t = np.float32(0)
                        for c in range(c0, c1):
                            t += codebook[codes[c]] * xc[b, c]
                        acc[b] += t * s
                else:
                    off = -zeros[r, j] if grid == GRID_ASYMMETRIC else np.float32(qmin)
                    for b in range(batch):
                        t = np.float32(0)
                        for c in range(c0, c1):
                            t += (np.float32(codes[c]) + off) * xc[b, c]
                        acc[b] += t * s
            for p in range(rowptr[r], rowptr[r + 1]):
                c = ocols[p]
                j = c // g
                z = zeros[r, j] if grid == GRID_ASYMMETRIC else np.float32(0)
                v = np.float32(grid_level(codes[c], grid, qmin, z, codebook) * scales[r, j])
                if has_col:
                    v = np.float32(v * col[c])
                for b in range(batch):
                    acc[b] += (ovals[p] - v) * x[b, c]
            for b in range(batch):
                out[b, r] = acc[b]


def _slot_kernels(bits: int):
    """(slot_dot, slot_levels) for codes of ``bits`` = 2, 4 or 8: the width is a compile-time
    constant, so the loop over code slots unrolls and every shift is a constant (a runtime width
    made the vectorised loops 3x slower).

    slot_dot(q, xt, off): the sum over slots k and words w of (code k of q[w] + off) * xt[k, w],
    a constant-shift unpack fused with a multiply-add. slot_levels(q, sw, offw, lev):
    lev[k, w] = (code k of q[w] + offw[w]) * sw[w], a row's scaled levels in slot-major order.
    Loops start at 0 over views (a runtime start offset kept LLVM from vectorising them)."""
    per, m = 32 // bits, np.uint32((1 << bits) - 1)

    @njit(fastmath=True)
    def slot_dot(q, xt, off):
        t = np.float32(0)
        for k in range(per):
            sh = np.uint32(k * bits)
            xk = xt[k]
            for w in range(xk.shape[0]):
                t += (np.float32((q[w] >> sh) & m) + off) * xk[w]
        return t

    @njit(fastmath=True)
    def slot_levels(q, sw, offw, lev):
        for k in range(per):
            sh = np.uint32(k * bits)
            lk = lev[k]
            for w in range(lk.shape[0]):
                lk[w] = (np.float32((q[w] >> sh) & m) + offw[w]) * sw[w]

    return slot_dot, slot_levels


(_slot_dot2, _slot_levels2), (_slot_dot4, _slot_levels4), (_slot_dot8, _slot_levels8) = map(_slot_kernels, (2, 4, 8))


@njit(fastmath=True)
def _flat_dot(a, b):
    t = np.float32(0)
    for i in range(a.shape[0]):
        t += a[i] * b[i]
    return t


@njit
def _outlier_terms(q, r, p0, p1, ocols, ovals, x, scales, zeros, col, asym, qmin, bits, lg, gcols, acc):
    """acc[b] += (outlier - dense value) * x[b, c] over row r's outliers p0..p1 (codes of 2/4/8 bits,
    ``1 << lg`` per word, groups of ``gcols`` columns). Its own function, without fastmath: inlined
    into the matmul kernel's loop nest, or vectorised with gathers, this loop ran 2-4x slower.
    ``col`` is empty without column scales; ``zeros`` is read only when ``asym``."""
    m = np.uint32((1 << bits) - 1)
    low = (1 << lg) - 1
    n_groups = scales.shape[1]
    batch = x.shape[0]
    a0 = np.float32(0)
    for p in range(p0, p1):
        c = np.int64(ocols[p])
        j = 0 if n_groups == 1 else c // gcols
        off = -zeros[r, j] if asym else qmin
        v = np.float32((np.float32((q[c >> lg] >> np.uint32((c & low) * bits)) & m) + off) * scales[r, j])
        if col.shape[0] > 0:
            v = np.float32(v * col[c])
        d = ovals[p] - v
        if batch == 1:
            a0 += d * x[0, c]
        else:
            for b in range(batch):
                acc[b] += d * x[b, c]
    acc[0] += a0


@njit(parallel=True, fastmath=True, cache=True)
def _word_matmul_kernel(xt, x, qweight, scales, gw, bits, qmin, grid, zeros, col, rowptr, ocols, ovals, chunks,
                        out):
    """:func:`_matmul_kernel` for 2/4/8-bit codes on the symmetric or asymmetric grid with groups of
    whole words (``gw`` words each): ``xt[b, k, w]`` is (column-scaled) x at column w * per + k (0
    past the last column; w only over the words the groups cover), so code slot k of every word
    meets a contiguous run of x. One scale per row at batch 1: a slot dot (:func:`_slot_kernels`);
    otherwise the row's scaled levels are formed once (slot levels), then one contiguous dot per
    row of x; then the row's outlier terms."""
    batch, per, nwu = xt.shape
    rows = qweight.shape[0]
    n_groups = scales.shape[1]
    asym = grid == GRID_ASYMMETRIC
    lg = 3 if bits == 4 else (4 if bits == 2 else 2)  # per = 32 // bits = 1 << lg
    gcols = gw * per
    rows_per = (rows + chunks - 1) // chunks
    for ch in prange(chunks):
        lev = np.empty((per, nwu), np.float32)
        levf = lev.reshape(per * nwu)
        sw = np.empty(nwu, np.float32)
        offw = np.empty(nwu, np.float32)
        acc = np.empty(batch, np.float32)
        x0 = xt[0]
        for r in range(ch * rows_per, min(rows, ch * rows_per + rows_per)):
            q = qweight[r]
            if batch == 1 and n_groups == 1:
                off = -zeros[r, 0] if asym else qmin
                if bits == 4:
                    t = _slot_dot4(q, x0, off)
                elif bits == 2:
                    t = _slot_dot2(q, x0, off)
                else:
                    t = _slot_dot8(q, x0, off)
                acc[0] = t * scales[r, 0]
            else:
                for j in range(n_groups):
                    w1 = min(nwu, j * gw + gw)
                    sw[j * gw:w1] = scales[r, j]
                    offw[j * gw:w1] = -zeros[r, j] if asym else qmin
                if bits == 4:
                    _slot_levels4(q, sw, offw, lev)
                elif bits == 2:
                    _slot_levels2(q, sw, offw, lev)
                else:
                    _slot_levels8(q, sw, offw, lev)
                for b in range(batch):
                    acc[b] = _flat_dot(levf, xt[b].reshape(per * nwu))
            if rowptr[r + 1] > rowptr[r]:
                _outlier_terms(q, r, rowptr[r], rowptr[r + 1], ocols, ovals, x, scales, zeros, col, asym, qmin, bits,
                               lg, gcols, acc)
            for b in range(batch):
                out[b, r] = acc[b]



FUSED_BATCH = 16  # up to this many rows of x: the fused kernel; beyond, dequantized tiles and BLAS
TILE_ELEMENTS = 1 << 24  # weights per dequantized tile (64 MiB of float32): few tiles, because switching
# between Numba's OpenMP threads and BLAS's costs about a millisecond each way on a loaded core


def matmul(x, qt) -> np.ndarray:
    """y = x @ W^T (float32) for (batch, cols) ``x``, from the packed form (see
    :func:`eqcore.backends.numpy.matmul`; equal up to float summation order). Small batches run
    the fused kernel; larger ones dequantize TILE_ELEMENTS weights (whole rows) of W at a time for
    a BLAS product."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] > FUSED_BATCH:
        rows, cols = qt.shape
        step = max(1, TILE_ELEMENTS // cols)
        out_t = np.empty((rows, x.shape[0]), dtype=np.float32)  # W x^T: each tile fills whole rows
        for r in range(0, rows, step):
            block = qt.row_block(r, min(r + step, rows))
            np.matmul(dequantize(block, np.float32), x.T, out=out_t[r:r + block.shape[0]])
        return np.ascontiguousarray(out_t.T)
    xc = x if qt.col_scales is None else np.ascontiguousarray(x * np.asarray(qt.col_scales).astype(np.float32))
    out = np.empty((x.shape[0], qt.shape[0]), dtype=np.float32)
    chunks = _chunks(qt.shape[0])
    args = _tensor_args(qt)
    per = 32 // qt.bits
    g = args[2]
    if qt.bits != 3 and qt.grid != "codebook" and (g % per == 0 or g == qt.shape[1]):
        nwu = min(qt.qweight.shape[1], -(-qt.shape[1] // g) * -(-g // per))  # words the groups cover
        xt = np.zeros((x.shape[0], nwu * per), np.float32)
        xt[:, :x.shape[1]] = xc
        xt = np.ascontiguousarray(xt.reshape(x.shape[0], nwu, per).transpose(0, 2, 1))
        qw, scales, _, bits, qmin, grid, zeros, _, col, _, _ = args
        _word_matmul_kernel(xt, x, qw, scales, -(-g // per), bits, qmin, grid, zeros, col, qt.outlier_rowptr,
                            qt.outlier_cols, qt.outlier_vals.astype(np.float32), chunks, out)
        return out
    _matmul_kernel(x, xc, *args, qt.outlier_vals.astype(np.float32), chunks, out)
    return out


