"""y = x @ W^T on the CPU from the packed form (Numba kernels, parallel over output rows).

:func:`matmul` is the Numba backend's matmul (:func:`eqcore.backends.numba.matmul`): equal to the
NumPy reference (:func:`eqcore.backends.numpy.matmul`, x @ dequantize(W, float32)^T) up to float32
summation order, |y - y_dense| <= 1e-5 * (|x| @ |W|^T) + 1e-30 (tests/test_matmul.py).

W is never formed whole. The kernels, by layout and batch:

- one scale per row, 2/4-bit codes, any grid, batches up to :data:`ROWS_BATCH`, on hosts with
  AVX2 or AVX-512: the row-lookup GEMV (:func:`_gemv_rows_kernel`): 4 rows of W at a time, each
  code's level one register lookup (:func:`eqcore.backends.numba_simd.rows_dot`; at batch 1 on the
  symmetric grid with AVX2, a sign extension instead, :data:`SIGNED_LEVELS`), each load of x
  serving the 4 rows; without SIMD (and for 8 bits) up to :data:`GEMV_BATCH` rows of x take slot
  dots (:func:`_slot_kernels`), codes unpacked in registers;
- groups of whole words, batches up to :data:`SIMD_BATCH`: the same lookup with each word's slot
  sum times its group's scale (no offsets), or an explicit-SIMD dot per row of x (asymmetric
  groups, 8 bits); each row's float32 group scales from :mod:`eqcore.backends.numba_scales`;
  without SIMD, batch 1 takes a scaled slot dot;
- everything else (any batch, 3 bits, groups that split a word): rows in blocks of :data:`RB`;
  each block's scaled levels are formed once (by the same register lookups where the SIMD dot
  would run; each outlier's exact value in its slot), then multiplied into x :data:`RB` rows of
  W by 4 rows of x at a time (16 accumulators: each level and x value loaded feeds 4 products).

The GEMV kernels take the dense dot over every code, outliers' places included, and then add
each outlier's exact value less the level that place got (:func:`_outlier_deltas`, formed once
per tensor) times x: one gather of x per outlier. Under eqcore's own symmetric tensors that
level is 0 and the stored values serve as they are; otherwise the float32 differences are kept
with the tensor (4 bytes an outlier, :meth:`eqcore.QuantizedTensor.derived`).

Codes of 2/4/8 bits in groups of whole words run in slot-major order: slot k of every word meets a
contiguous run of x, ``xt[b, k * nwu + w]`` = x[b, w * per + k], so unpacking is a constant shift
and mask over contiguous words. The general order (3 bits, groups that split a word) unpacks codes
one at a time. This module imports only the contract (:mod:`eqcore.layout`) and the shared bit and
SIMD primitives (:mod:`eqcore.backends.numba_bits`, :mod:`eqcore.backends.numba_simd`), not the
codec backend.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ..dtypes import bfloat16
from ..layout import GRID_ASYMMETRIC, GRID_CODEBOOK, GRID_SYMMETRIC, GRIDS, group_layout, qrange
from .numba_bits import code_at, half_bits_to_f32, unpack_stream
from .numba_scales import float_scales
from .numba_simd import TABLE, WIDTH, group_dot, group_levels, rows_dot

RB = 4  # rows of W per block: their levels are formed once, then meet x four rows of x at a time
KB = 1024  # columns per slice of a block's levels (4 rows x 4 KiB, L1-resident while every row of x meets it;
# 256 / 512 / 4096 measured no faster)
GEMV_BATCH = 2  # up to this many rows of x, one scale per row: slot dots, codes unpacked in registers (batch 2:
# 2.8 vs 3.6 ms through the block kernel, 4096x4096 on one thread; equal at 3; a slot dot of one row with four rows of
# x at a time was slower than the block kernel at 4-8)
CHUNKS_PER_THREAD = 16  # chunks of rows per thread, handed out one at a time (dynamic scheduling)


def _chunks(rows: int, threads: int | None = None) -> int:
    """How many chunks of rows a parallel kernel splits ``rows`` into (``threads``: Numba's, asked
    for if not given; asking costs 3 us)."""
    return max(1, min(rows, CHUNKS_PER_THREAD * (threads or numba.get_num_threads())))


def _dynamic(kernel, *args):
    """``kernel(*args)`` with its prange chunks handed out one at a time rather than split evenly in
    advance: on a shared machine a thread that loses its core no longer holds up the others."""
    old = numba.set_parallel_chunksize(1)
    try:
        kernel(*args)
    finally:
        numba.set_parallel_chunksize(old)


DYNAMIC_WEIGHTS = 1 << 20  # weights from which matmul hands out chunks one at a time (below, setting and
# restoring the chunk size cost 4 us of a 576x576 call's 35 us kernel)


def _call(kernel, *args):
    kernel(*args)


_V_F32, _V_F16, _V_BF16 = 0, 1, 2  # outlier values as stored: float32 (as uint32 bits), float16 or bfloat16 bits


@njit(inline="always")
def _oval(v, kind):
    """float32 value of a stored outlier value (or scale): float32, float16 or bfloat16 bits
    (converting in the kernel: NumPy's float16 -> float32 cast of 224k values took 0.3 ms a call).
    Every conversion is done and one kept, by selects rather than branches, so a loop over values
    stays vectorised (with branches, the SIMD GEMV's outlier loop took 0.80 against 0.50 ms for the
    224k outliers of a 4096x4096 weight on one thread)."""
    f16 = half_bits_to_f32(np.uint16(v))
    bf16 = np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    f32 = np.uint32(v).view(np.float32)
    return f16 if kind == _V_F16 else (bf16 if kind == _V_BF16 else f32)


def _float_bits(vals) -> tuple:
    """(raw bits of float values (outliers, scales), their kind for :func:`_oval`): no conversion pass."""
    vals = np.ascontiguousarray(vals)
    if vals.dtype == np.float16:
        return vals.view(np.uint16), _V_F16
    if vals.dtype == bfloat16:
        return vals.view(np.uint16), _V_BF16
    return vals.astype(np.float32, copy=False).view(np.uint32), _V_F32


def _masked4_source(bits: int):
    """slot_dot_masked4 of :func:`_slot_kernels` for ``bits``, written out slot by slot so that every
    shift, mask and scale is a literal (as a loop over the slots, LLVM left it rolled and unpacked
    in 64-bit lanes: 2.4x slower)."""
    per, m = 32 // bits, (1 << bits) - 1
    top = 32 - 2 * bits  # the top slot, shifted down by ``bits``, sits at this bit (below 2**31)
    lines = ["def slot_dot_masked4(q0, q1, q2, q3, o0, o1, o2, o3, xt):", "    t0 = t1 = t2 = t3 = np.float32(0)"]
    for k in range(per):
        sh, at = (0, k * bits) if k < per - 1 else (bits, top)
        lines += [f"    xk = xt[{k}]", "    s0 = s1 = s2 = s3 = np.float32(0)"]
        lines += [f"    p{i} = o{i} * np.float32({2.0 ** at!r})" for i in range(4)]  # the offset, scaled alike
        lines += ["    for w in range(xk.shape[0]):", "        v = xk[w]"]
        for i in range(4):
            word = f"q{i}[w]" if sh == 0 else f"(q{i}[w] >> np.uint32({sh}))"
            lines.append(f"        s{i} += (np.float32({word} & np.uint32({m << at})) + p{i}) * v")
        lines += [f"    t{i} += s{i} * np.float32({2.0 ** -at!r})" for i in range(4)]
    lines.append("    return t0, t1, t2, t3")
    ns = {"np": np}
    exec("\n".join(lines), ns)  # noqa: S102 (generated from integers only)
    return njit(fastmath=True)(ns["slot_dot_masked4"])


def _slot_kernels(bits: int):
    """(slot_dot, slot_dot_scaled, slot_levels, slot_table, slot_dot_masked4) for codes of ``bits`` = 2, 4 or 8: the
    width is a
    compile-time constant, so the loop over code slots unrolls and every shift is a constant (a
    runtime width made the vectorised loops 3x slower).

    slot_dot(q, xt, off): the sum over slots k and words w of (code k of q[w] + off) * xt[k, w], a
    constant-shift unpack fused with a multiply-add (each level whole: adding off * sum of x once
    per row instead cancelled catastrophically when most levels are near 0); slot_dot_scaled(q, xt, sw, bw): the same with a scale and a scaled offset
    per word (groups): the sum of (code k of q[w] * sw[w] + bw[w]) * xt[k, w]. slot_levels(q, sw, offw, lev):
    lev[k, w] = (code k of q[w] + offw[w]) * sw[w], a row's scaled levels in slot-major order;
    slot_table(q, sw, table, lev): lev[k, w] = table[code k of q[w]] * sw[w] (codebook grid).
    slot_dot_masked4(q0, q1, q2, q3, o0, o1, o2, o3, xt): the slot dots of 4 rows (offsets o0..o3),
    each xt value loaded serving all four, with codes unpacked in place: (q & (m << k * bits)) as
    float is code * 2**(k * bits) exactly (the top slot shifted down by ``bits`` so the word stays
    below 2**31 and converts signed), the offset is added scaled alike (so each level is rounded as
    code + off would be), and slot k's sum is scaled back by 2**-(k * bits) once per row (exact: a
    power of two, the only rounding a result below float32's normal range). One shift less per 16 codes than
    slot_dot and one load of x per 4 rows: 0.70 vs 0.88 ms for 4096x4096 4-bit on one thread
    (2 rows: 0.80, 8 rows: 1.85, spilled; one row masked: 1.03, slower than shifting; all slots
    in one pass over the words, 8 streams of x: 1.4). The unpacked values reach 2**(32 - bits), so
    the caller takes this path only when its partial sums stay finite (:func:`_masked_ok`).
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
    def slot_dot_scaled(q, xt, sw, bw):
        t = np.float32(0)
        for k in range(per):
            sh = np.uint32(k * bits)
            xk = xt[k]
            for w in range(xk.shape[0]):
                t += (np.float32((q[w] >> sh) & m) * sw[w] + bw[w]) * xk[w]
        return t

    @njit(fastmath=True)
    def slot_levels(q, sw, offw, lev):
        for k in range(per):
            sh = np.uint32(k * bits)
            lk = lev[k]
            for w in range(lk.shape[0]):
                lk[w] = (np.float32((q[w] >> sh) & m) + offw[w]) * sw[w]

    @njit(fastmath=True)
    def slot_table(q, sw, table, lev):
        for k in range(per):
            sh = np.uint32(k * bits)
            lk = lev[k]
            for w in range(lk.shape[0]):
                lk[w] = table[(q[w] >> sh) & m] * sw[w]

    slot_dot_masked4 = _masked4_source(bits)
    return slot_dot, slot_dot_scaled, slot_levels, slot_table, slot_dot_masked4


(_slot_dot2, _slot_scaled2, _slot_levels2, _slot_table2, _slot_masked2), \
    (_slot_dot4, _slot_scaled4, _slot_levels4, _slot_table4, _slot_masked4), \
    (_slot_dot8, _slot_scaled8, _slot_levels8, _slot_table8, _slot_masked8) = map(_slot_kernels, (2, 4, 8))

MASKED_LIMIT = 2.0 ** 126  # bound on every partial sum of a masked slot dot (float32's largest value is below 2**128)


def _masked_ok(xt, level: float, bits: int) -> bool:
    """Whether the masked slot dots (:func:`_slot_kernels`) may take every row of ``xt``: each
    unpacked level (code + off, scaled by at most 2**(32 - 2 * bits)) is at most ``level`` *
    2**(32 - 2 * bits) in magnitude, so every partial sum is below that times sum |x|, which must stay
    under MASKED_LIMIT; inf or nan in x also gives False (the shifting slot dot then returns what
    the dense product would)."""
    s = np.abs(xt).sum(axis=tuple(range(1, xt.ndim)), dtype=np.float64).max()
    return bool(s * level * 2.0 ** (32 - 2 * bits) < MASKED_LIMIT)


@njit(fastmath=True)
def _dot4x4(l0, l1, l2, l3, x0, x1, x2, x3):
    """The 16 dots of 4 level rows with 4 rows of x (all of one length): each value loaded
    feeds four multiply-adds."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0)
    for k in range(l0.shape[0]):
        v0, v1, v2, v3 = l0[k], l1[k], l2[k], l3[k]
        y0, y1, y2, y3 = x0[k], x1[k], x2[k], x3[k]
        a00 += v0 * y0
        a01 += v0 * y1
        a02 += v0 * y2
        a03 += v0 * y3
        a10 += v1 * y0
        a11 += v1 * y1
        a12 += v1 * y2
        a13 += v1 * y3
        a20 += v2 * y0
        a21 += v2 * y1
        a22 += v2 * y2
        a23 += v2 * y3
        a30 += v3 * y0
        a31 += v3 * y1
        a32 += v3 * y2
        a33 += v3 * y3
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@njit(fastmath=True)
def _dot4x1(l0, l1, l2, l3, x0):
    """The 4 dots of 4 level rows with one row of x."""
    a0 = a1 = a2 = a3 = np.float32(0)
    for k in range(l0.shape[0]):
        y = x0[k]
        a0 += l0[k] * y
        a1 += l1[k] * y
        a2 += l2[k] * y
        a3 += l3[k] * y
    return a0, a1, a2, a3


@njit(fastmath=True)
def _natural_levels(codes, r, g, grid, qmin, scales, zeros, codebook, lev):
    """lev[c] = level of code c times its group's scale, in column order."""
    cols = codes.shape[0]
    for j in range(scales.shape[1]):
        c0 = j * g
        c1 = min(c0 + g, cols)
        s = scales[r, j]
        if grid == GRID_CODEBOOK:
            for c in range(c0, c1):
                lev[c] = codebook[codes[c]] * s
        else:
            off = -zeros[r, j] if grid == GRID_ASYMMETRIC else qmin
            for c in range(c0, c1):
                lev[c] = (np.float32(codes[c]) + off) * s


@njit
def _row_levels(q, r, bits, g, gw, grid, qmin, scales, zeros, codebook, slot, codes, sw, offw, lev):
    """Row r's scaled levels into ``lev`` (length K): slot-major when ``slot`` (2/4/8 bits, groups
    of ``gw`` whole words; ``sw``, ``offw`` are per-word scratch), else in column order."""
    if slot:
        per = 32 // bits
        nwu = sw.shape[0]
        lv = lev.reshape(per, nwu)
        for j in range(scales.shape[1]):
            w1 = min(nwu, j * gw + gw)
            sw[j * gw:w1] = scales[r, j]
            offw[j * gw:w1] = -zeros[r, j] if grid == GRID_ASYMMETRIC else qmin
        if grid == GRID_CODEBOOK:
            if bits == 4:
                _slot_table4(q, sw, codebook, lv)
            elif bits == 2:
                _slot_table2(q, sw, codebook, lv)
            else:
                _slot_table8(q, sw, codebook, lv)
        elif bits == 4:
            _slot_levels4(q, sw, offw, lv)
        elif bits == 2:
            _slot_levels2(q, sw, offw, lv)
        else:
            _slot_levels8(q, sw, offw, lv)
    else:
        unpack_stream(q, bits, codes)
        _natural_levels(codes, r, g, grid, qmin, scales, zeros, codebook, lev)


@njit(inline="always")
def _whole_vectors(qweight, r, qpad):
    """Row r of the C-contiguous ``qweight`` for a SIMD kernel that reads ``qpad.shape[0]`` words (whole
    vectors) from it: itself, reading on into the next row (those words meet zeros of x), except for
    the last row when it is shorter, copied into ``qpad`` (zeros after it)."""
    n = qweight.shape[1]
    if r < qweight.shape[0] - 1 or n >= qpad.shape[0]:
        return qweight[r]
    qpad[:n] = qweight[r]
    return qpad


@njit
def _simd_row_levels(q, r, bits, scales, zeros, sg, og, lut, rel, first, offset, lev):
    """Row r's scaled levels into ``lev`` (per, nwu), slot-major, by
    :func:`eqcore.backends.numba_simd.group_levels` (``q`` whole vectors of words, :func:`_whole_vectors`)."""
    n_groups = scales.shape[1]
    for j in range(n_groups):
        sg[j] = scales[r, j]
    if zeros.shape[0] > 0:
        for j in range(n_groups):
            og[j] = -zeros[r, j]
    if offset and bits == 4:
        _lev4_off(q, sg, og, lut, rel, first, lev)
    elif offset and bits == 2:
        _lev2_off(q, sg, og, lut, rel, first, lev)
    elif offset:
        _lev8_off(q, sg, og, lut, rel, first, lev)
    elif bits == 4:
        _lev4(q, sg, og, lut, rel, first, lev)
    else:
        _lev2(q, sg, og, lut, rel, first, lev)


@njit(parallel=True, cache=True)
def _block_kernel(xt, x, qweight, scales, zeros, codebook, col, g, gw, bits, qmin, grid, slot, rowptr, ocols, ovals,
                  kind, simd, offset, lut, rel, first, chunks, out):
    """out[:, r] = x @ W[r] for every row r: rows in blocks of RB, each block's scaled levels formed
    once in xt's column order (slot-major when ``slot``), each outlier's exact value in its slot;
    then, a KB-column slice of the levels at a time, 4 x 4 (rows of W x rows of x) dots and a 4 x 1
    dot for the last rows of x. ``xt`` is x (column-scaled, in the levels' order), ``x`` the plain
    input. With column scales (``col`` not empty) the outlier slots hold 0 and the outliers' terms
    ovals * x are added apart (ovals / col times x * col could overflow). With ``simd`` (slot-major,
    words a multiple of WIDTH, and ``offset``, ``lut``, ``rel``, ``first`` as
    :func:`_gemv_simd_kernel` takes them) the
    levels are formed by :func:`eqcore.backends.numba_simd.group_levels` (a register lookup per
    vector of codes, not a gather per code)."""
    batch, K = xt.shape
    rows = qweight.shape[0]
    cols = x.shape[1]
    per = 32 // bits
    nwu = K // per
    low = per - 1
    lg = 4 if bits == 2 else (3 if bits == 4 else 2)
    has_col = col.shape[0] > 0
    nblocks = (rows + RB - 1) // RB
    bper = (nblocks + chunks - 1) // chunks
    for ch in prange(chunks):
        lev = np.zeros((RB, K), np.float32)
        codes = np.empty(cols, np.uint8)
        sw = np.empty(nwu, np.float32)
        offw = np.empty(nwu, np.float32)
        acc = np.empty((RB, batch), np.float32)
        n_groups = scales.shape[1]
        sg = np.zeros(n_groups + WIDTH, np.float32)
        og = np.full(n_groups + WIDTH, qmin if offset else 0, np.float32)
        qpad = np.zeros(nwu, np.uint32)
        for blk in range(ch * bper, min(nblocks, ch * bper + bper)):
            r0 = blk * RB
            nr = min(RB, rows - r0)
            for i in range(nr):
                r = r0 + i
                if simd:
                    _simd_row_levels(_whole_vectors(qweight, r, qpad), r, bits, scales, zeros, sg, og, lut, rel, first,
                                     offset, lev[i].reshape(per, nwu))
                else:
                    _row_levels(qweight[r], r, bits, g, gw, grid, qmin, scales, zeros, codebook, slot, codes, sw, offw,
                                lev[i])
                for p in range(rowptr[r], rowptr[r + 1]):  # the outlier's exact value replaces the level
                    c = np.int64(ocols[p])
                    lev[i, (c & low) * nwu + (c >> lg) if slot else c] = 0 if has_col else _oval(ovals[p], kind)
            for i in range(nr, RB):
                lev[i, :] = 0
            acc[:, :] = 0
            for k0 in range(0, K, KB):  # a slice of the levels stays in L1 while every row of x meets it
                k1 = min(K, k0 + KB)
                l0, l1, l2, l3 = lev[0, k0:k1], lev[1, k0:k1], lev[2, k0:k1], lev[3, k0:k1]
                b = 0
                while b + 4 <= batch:
                    t = _dot4x4(l0, l1, l2, l3, xt[b, k0:k1], xt[b + 1, k0:k1], xt[b + 2, k0:k1], xt[b + 3, k0:k1])
                    for i in range(RB):
                        for j in range(4):
                            acc[i, b + j] += t[4 * i + j]
                    b += 4
                while b < batch:
                    a0, a1, a2, a3 = _dot4x1(l0, l1, l2, l3, xt[b, k0:k1])
                    acc[0, b] += a0
                    acc[1, b] += a1
                    acc[2, b] += a2
                    acc[3, b] += a3
                    b += 1
            for i in range(nr):
                r = r0 + i
                if has_col:  # xt is column-scaled: the outliers' terms are taken with x apart
                    for bb in range(batch):
                        t = np.float32(0)
                        for p in range(rowptr[r], rowptr[r + 1]):
                            t += _oval(ovals[p], kind) * x[bb, np.int64(ocols[p])]
                        acc[i, bb] += t
                for bb in range(batch):
                    out[bb, r] = acc[i, bb]


@njit(fastmath=True)
def _oval_f32(v):
    return np.uint32(v).view(np.float32)


@njit(fastmath=True)
def _oval_f16(v):
    return half_bits_to_f32(np.uint16(v))


@njit(fastmath=True)
def _oval_bf16(v):
    return np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)


@njit(fastmath=True)
def _outlier_dot(d, kind, oc, x0):
    """The sum over a row's outliers of d[p] * x0[oc[p]]: ``d`` their exact values less the levels
    the dense dot gave their places (:func:`_outlier_deltas`), as ``kind`` bits; a loop per kind,
    none with a branch inside (LLVM vectorises each with one gather of x)."""
    t = np.float32(0)
    if kind == _V_F16:
        for p in range(oc.shape[0]):
            t += _oval_f16(d[p]) * x0[np.int64(oc[p])]
    elif kind == _V_BF16:
        for p in range(oc.shape[0]):
            t += _oval_bf16(d[p]) * x0[np.int64(oc[p])]
    else:
        for p in range(oc.shape[0]):
            t += _oval_f32(d[p]) * x0[np.int64(oc[p])]
    return t


@njit(parallel=True, cache=True)
def _delta_kernel(qweight, rowptr, ocols, ovals, kind, scales, g, bits, grid, qmin, zeros, codebook, col, chunks, d):
    """d[p] = outlier p's exact value less the grid's value at its place (its level times its
    group's scale, times its column's scale if any), for codes of 2, 4 or 8 bits (whole words)."""
    lg = 4 if bits == 2 else (3 if bits == 4 else 2)
    rows = qweight.shape[0]
    per = (rows + chunks - 1) // chunks
    for ch in prange(chunks):
        for r in range(ch * per, min(rows, ch * per + per)):
            q = qweight[r]
            for p in range(rowptr[r], rowptr[r + 1]):
                c = np.int64(ocols[p])
                j = c // g
                code = np.int64(code_at(q, c, bits, lg))
                if grid == GRID_CODEBOOK:
                    lev = codebook[code]
                elif grid == GRID_ASYMMETRIC:
                    lev = np.float32(code) - zeros[r, j]
                else:
                    lev = np.float32(code) + qmin
                w = lev * scales[r, j]
                if col.shape[0] > 0:
                    w *= col[c]
                d[p] = _oval(ovals[p], kind) - w


def _outlier_deltas(qt, qweight, rowptr, ocols, scales, g, grid, qmin, zeros, codebook, col) -> tuple:
    """(each outlier's exact value less the grid's value at its place, as :func:`_outlier_dot`
    takes it: bits and kind). Where every such value is 0 (the symmetric grid's zero level, where
    eqcore's quantize puts every outlier) that is the stored values themselves, and nothing is kept;
    otherwise float32 deltas, 4 bytes an outlier kept with the tensor (:func:`_static`). Taking
    them from the memo rather than reading each outlier's code per call: 0.60-0.67 -> 0.46-0.53 ms
    for a 4096x4096 default weight at batch 1, weights from memory. The other arguments are
    :class:`_Static`'s, and ``scales`` every group's float32 scale."""
    ovals, kind = _float_bits(qt.outlier_vals)
    if ovals.shape[0] == 0 or qt.bits == 3:  # 3-bit codes take the block kernel, which needs none
        return ovals[:0], kind
    d = np.empty(ovals.shape[0], np.float32)
    _delta_kernel(qweight, rowptr, ocols, ovals, kind, scales, g, int(qt.bits), grid, qmin, zeros, codebook, col,
                  _chunks(qt.shape[0]), d)
    exact = ovals.view(np.float32) if kind == _V_F32 else qt.outlier_vals.astype(np.float32)
    return (ovals, kind) if np.array_equal(d, exact) else (d.view(np.uint32), _V_F32)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_groups_kernel(xt, x0, qweight, scales, gw, bits, qmin, grid, zeros, rowptr, ocols, dvals, dkind, chunks,
                        out):
    """Batch 1 with groups of ``gw`` whole words (2/4/8-bit codes, symmetric or asymmetric grid):
    each row's scale and scaled offset spread over its words once, then its scaled slot dot
    (:func:`_slot_kernels`) and its outliers (:func:`_outlier_dot`)."""
    per, nwu = xt.shape
    rows = qweight.shape[0]
    n_groups = scales.shape[1]
    asym = grid == GRID_ASYMMETRIC
    rows_per = (rows + chunks - 1) // chunks
    for ch in prange(chunks):
        sw = np.empty(nwu, np.float32)
        bw = np.empty(nwu, np.float32)
        for r in range(ch * rows_per, min(rows, ch * rows_per + rows_per)):
            q = qweight[r]
            for j in range(n_groups):
                w0 = j * gw
                w1 = min(nwu, w0 + gw)
                s = scales[r, j]
                sw[w0:w1] = s
                bw[w0:w1] = (-zeros[r, j] if asym else qmin) * s
            if bits == 4:
                t = _slot_scaled4(q, xt, sw, bw)
            elif bits == 2:
                t = _slot_scaled2(q, xt, sw, bw)
            else:
                t = _slot_scaled8(q, xt, sw, bw)
            p0 = rowptr[r]
            p1 = rowptr[r + 1]
            if p1 > p0:
                t += _outlier_dot(dvals[p0:p1], dkind, ocols[p0:p1], x0)
            out[0, r] = t


_dot2, _dot4, _dot2_off, _dot4_off, _dot8_off = (group_dot(b, o, WIDTH or 8) for b, o in
                                                 ((2, False), (4, False), (2, True), (4, True), (8, True)))
_lev2, _lev4, _lev2_off, _lev4_off, _lev8_off = (group_levels(b, o, WIDTH or 8) for b, o in
                                                 ((2, False), (4, False), (2, True), (4, True), (8, True)))
_rows4_2, _rows4_4, _rows4x2_2, _rows4x2_4, _rows4x4_2, _rows4x4_4, _rows1_2, _rows1_4 = (
    rows_dot(b, n, nx, WIDTH or 8) for n, nx in ((4, 1), (4, 2), (4, 4), (1, 1)) for b in (2, 4))
_srows4_2, _srows4_4, _srows1_2, _srows1_4 = (
    rows_dot(b, n, 1, WIDTH or 8, signed=True) for n in (4, 1) for b in (2, 4))
SIGNED_LEVELS = WIDTH == 8  # batch 1 on the symmetric grid: levels by sign extension, not lookup, where a
# lookup takes two vpermps and a blend (AVX2: 4096x4096 4-bit, 2 threads, Zen 3, 2026-12-02: see README)
_grows4_2, _grows4_4, _grows4x2_2, _grows4x2_4, _grows1_2, _grows1_4 = (
    rows_dot(b, n, nx, WIDTH or 8, grouped=True) for n, nx in ((4, 1), (4, 2), (1, 1)) for b in (2, 4))
ROWS_BATCH = 4  # rows of x up to which one scale per row, 2 and 4 bits, take the row-lookup GEMV (batch 4: 1.5-2.1
# vs 1.7-2.4 ms through the block kernel, 4096x4096; batch 8 2.9-3.7 vs 2.8-3.3, after 2.0 vs 2.4 in an earlier run)
SIMD_BATCH = 2  # rows of x up to which groups take the row-lookup GEMV in groups (4096x4096 4-bit pick: batch 1
# 0.71-0.75 vs 0.77-1.1 ms for the SIMD GEMV, batch 2 1.1-1.3 vs 1.6-2.2; batch 4 2.2-2.7 vs 1.6-1.7 for the block
# kernel), or, with offsets or 8 bits, the SIMD GEMV, one row of x at a time


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_simd_kernel(xt, x, qweight, scales, rel, first, bits, offset, lut, qmin, zeros, rowptr, ocols, dvals, dkind,
                      chunks, out):
    """Rows of x one at a time (``xt``: (batch, per, nwu), nwu a multiple of WIDTH, zeros past the
    last column), codes of 2/4/8 bits in groups of ``gw`` whole words (``rel``, ``first``: as
    :func:`eqcore.backends.numba_simd.group_dot` takes them): each row's float32 group scales
    (:func:`eqcore.backends.numba_scales.float_scales`) and offsets, then its explicit-SIMD dot (:mod:`eqcore.backends.numba_simd`). Each level is lut[code]
    (codebooks, and the symmetric grid below 8 bits as lut = code + qmin; a register lookup) or, with
    ``offset``, (lut[code] + offset) * scale, lut[code] = code and the offset -zero (asymmetric grid)
    or ``qmin`` (8 bits). The dot reads whole vectors of words (:func:`_whole_vectors`); then the
    row's outliers (:func:`_outlier_dot`)."""
    per, nwu = xt.shape[1:]
    rows = qweight.shape[0]
    n_groups = scales.shape[1]
    asym = zeros.shape[0] > 0
    rows_per = (rows + chunks - 1) // chunks
    for ch in prange(chunks):
        sg = np.zeros(n_groups + WIDTH, np.float32)  # WIDTH past the last group: a vector load from any group
        og = np.full(n_groups + WIDTH, qmin if offset else 0, np.float32)
        qpad = np.zeros(nwu, np.uint32)
        for r in range(ch * rows_per, min(rows, ch * rows_per + rows_per)):
            sg[:n_groups] = scales[r]
            if asym:
                for j in range(n_groups):
                    og[j] = -zeros[r, j]
            p0 = rowptr[r]
            p1 = rowptr[r + 1]
            q = _whole_vectors(qweight, r, qpad)
            for b in range(xt.shape[0]):  # the row's words stay in L1 for every row of x
                xb = xt[b]
                if offset and bits == 4:
                    t = _dot4_off(q, xb, sg, og, lut, rel, first)
                elif offset and bits == 2:
                    t = _dot2_off(q, xb, sg, og, lut, rel, first)
                elif offset:
                    t = _dot8_off(q, xb, sg, og, lut, rel, first)
                elif bits == 4:
                    t = _dot4(q, xb, sg, og, lut, rel, first)
                else:
                    t = _dot2(q, xb, sg, og, lut, rel, first)
                if p1 > p0:
                    t += _outlier_dot(dvals[p0:p1], dkind, ocols[p0:p1], x[b])
                out[b, r] = t


@njit(inline="always")
def _rows_block(qs, xt, ls, b0, nb, bits, acc):
    """acc[i, b0 + b] for the 4 rows ``qs`` (levels ``ls``) and rows b0..b0 + nb - 1 of x (nb <= 4):
    :func:`eqcore.backends.numba_simd.rows_dot` with 4, 2 and 1 rows of x at a time."""
    if nb == 4:
        xs = (xt[b0], xt[b0 + 1], xt[b0 + 2], xt[b0 + 3])
        t = _rows4x4_4(qs, xs, ls) if bits == 4 else _rows4x4_2(qs, xs, ls)
        for i in range(4):
            for b in range(4):
                acc[i, b0 + b] = t[i * 4 + b]
        return
    if nb >= 2:
        xs2 = (xt[b0], xt[b0 + 1])
        t2 = _rows4x2_4(qs, xs2, ls) if bits == 4 else _rows4x2_2(qs, xs2, ls)
        for i in range(4):
            for b in range(2):
                acc[i, b0 + b] = t2[i * 2 + b]
        b0 += 2
    if nb != 2:
        xs1 = (xt[b0],)
        t1 = _rows4_4(qs, xs1, ls) if bits == 4 else _rows4_2(qs, xs1, ls)
        for i in range(4):
            acc[i, b0] = t1[i]


@njit(inline="always")
def _block_rows(qweight, r0, qpad):
    """Rows r0..r0 + 3 of ``qweight`` as the row-lookup dots read them (:func:`_whole_vectors`)."""
    return (_whole_vectors(qweight, r0, qpad), _whole_vectors(qweight, r0 + 1, qpad),
            _whole_vectors(qweight, r0 + 2, qpad), _whole_vectors(qweight, r0 + 3, qpad))


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_group_rows_kernel(xt, x, qweight, lut, scales, rel, first, bits, rowptr, ocols, dvals, dkind, chunks, out):
    """:func:`_gemv_rows_kernel` for groups of ``gw`` whole words, levels lut[code] (the symmetric
    grid's code + qmin, or a codebook) times the group's float32 scale ``scales[r, j]``: blocks of 4
    rows, rows of x 2 and 1 at a time (``rows_dot(grouped=True)``: each word's slot sum times its
    group's scale), then the rows' outliers (:func:`_outlier_dot`)."""
    nwu = xt.shape[2]
    rows = qweight.shape[0]
    batch = xt.shape[0]
    n_groups = scales.shape[1]
    nblk = (rows + 3) // 4
    blk_per = (nblk + chunks - 1) // chunks
    for ch in prange(chunks):
        qpad = np.zeros(nwu, np.uint32)
        sg = np.zeros((4, n_groups + WIDTH), np.float32)  # WIDTH past the last group: a vector load from any group
        acc = np.empty((4, batch), np.float32)
        for blk in range(ch * blk_per, min(nblk, ch * blk_per + blk_per)):
            r0 = blk * 4
            nr = min(4, rows - r0)
            for i in range(nr):
                sg[i, :n_groups] = scales[r0 + i]
            if nr == 4:
                qs = _block_rows(qweight, r0, qpad)
                ls = (lut, lut, lut, lut)
                ss = (sg[0], sg[1], sg[2], sg[3])
                for b0 in range(0, batch - 1, 2):
                    xs2 = (xt[b0], xt[b0 + 1])
                    t2 = (_grows4x2_4(qs, xs2, ls, ss, rel, first) if bits == 4 else
                          _grows4x2_2(qs, xs2, ls, ss, rel, first))
                    for i in range(4):
                        acc[i, b0] = t2[2 * i]
                        acc[i, b0 + 1] = t2[2 * i + 1]
                if batch % 2:
                    xs1 = (xt[batch - 1],)
                    t1 = _grows4_4(qs, xs1, ls, ss, rel, first) if bits == 4 else _grows4_2(qs, xs1, ls, ss, rel, first)
                    for i in range(4):
                        acc[i, batch - 1] = t1[i]
            else:
                for i in range(nr):
                    q1, l1, s1 = (_whole_vectors(qweight, r0 + i, qpad),), (lut,), (sg[i],)
                    for b in range(batch):
                        xs1 = (xt[b],)
                        acc[i, b] = (_grows1_4(q1, xs1, l1, s1, rel, first) if bits == 4 else
                                     _grows1_2(q1, xs1, l1, s1, rel, first))[0]
            for i in range(nr):
                _gemv_row(acc[i], r0 + i, np.float32(1), rowptr, ocols, dvals, dkind, x, out)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_rows_kernel(xt, x, qweight, luts, step, scales, bits, rowptr, ocols, dvals, dkind, signed, chunks, out):
    """Batches up to ROWS_BATCH, one scale per row, codes of 2 or 4 bits: rows in blocks of 4, each
    block's lookup dots with the rows of x, up to 4 at a time (:func:`_rows_block`; row r's levels
    by code ``luts[r * step]``, 16 entries: code + qmin, code - zero or a codebook), then its scale
    and outliers (:func:`_gemv_row`). ``xt`` as :func:`_gemv_simd_kernel` takes it. ``signed``
    (the symmetric grid's code + qmin tables, batch 1): the levels by sign extension instead
    (``rows_dot(signed=True)``, the same values)."""
    nwu = xt.shape[2]
    rows = qweight.shape[0]
    batch = xt.shape[0]
    nblk = (rows + 3) // 4
    blk_per = (nblk + chunks - 1) // chunks
    for ch in prange(chunks):
        qpad = np.zeros(nwu, np.uint32)
        acc = np.empty((4, batch), np.float32)
        for blk in range(ch * blk_per, min(nblk, ch * blk_per + blk_per)):
            r0 = blk * 4
            nr = min(4, rows - r0)
            if nr == 4:
                qs = _block_rows(qweight, r0, qpad)
                ls = (luts[r0 * step], luts[(r0 + 1) * step], luts[(r0 + 2) * step], luts[(r0 + 3) * step])
                if signed:
                    xs1 = (xt[0],)
                    t1 = _srows4_4(qs, xs1, ls) if bits == 4 else _srows4_2(qs, xs1, ls)
                    for i in range(4):
                        acc[i, 0] = t1[i]
                else:
                    for b0 in range(0, batch, 4):
                        _rows_block(qs, xt, ls, b0, min(4, batch - b0), bits, acc)
            else:
                for i in range(nr):
                    q1 = (_whole_vectors(qweight, r0 + i, qpad),)
                    l1 = (luts[(r0 + i) * step],)
                    for b in range(batch):
                        xs1 = (xt[b],)
                        if signed:
                            acc[i, b] = (_srows1_4(q1, xs1, l1) if bits == 4 else _srows1_2(q1, xs1, l1))[0]
                        else:
                            acc[i, b] = (_rows1_4(q1, xs1, l1) if bits == 4 else _rows1_2(q1, xs1, l1))[0]
            for i in range(nr):
                _gemv_row(acc[i], r0 + i, scales[r0 + i, 0], rowptr, ocols, dvals, dkind, x, out)


def _word_groups(nwu: int, gw: int, width: int = WIDTH) -> tuple:
    """(each word's group less its vector's first group, each full vector's first group) for
    groups of ``gw`` words, as :func:`eqcore.backends.numba_simd.group_dot` takes them (int32)."""
    wg = np.arange(nwu, dtype=np.int32) // np.int32(gw)
    nfull = nwu - nwu % width
    first = np.ascontiguousarray(wg[:nfull:width])
    rel = np.zeros(nwu, np.int32)
    rel[:nfull] = wg[:nfull] - np.repeat(first, width)
    return rel, first


def _levels_table(qt, bits: int, grid: int):
    """(whether levels take an offset, the levels by code) for the SIMD kernels: codes of 2 and 4
    bits are looked up (the codebook, or code + qmin on the symmetric grid), and the asymmetric
    grid adds -zero per group; 8-bit codes are converted and take qmin or -zero. None for a
    codebook of 8 bits (256 entries do not fit a register)."""
    if grid == GRID_CODEBOOK and bits > 4:
        return None
    offset = grid == GRID_ASYMMETRIC or bits > 4
    levels = _f32(qt.codebook) if grid == GRID_CODEBOOK else np.arange(1 << bits, dtype=np.float32)
    if grid == GRID_SYMMETRIC and not offset:
        levels += qrange(bits)[0]
    lut = np.zeros(max(TABLE, levels.size), np.float32)
    lut[:levels.size] = levels
    return offset, lut


def _row_luts(qt, bits: int, table) -> tuple:
    """(levels by code, 16 a row: (1, 16), or (rows, 16) for the asymmetric grid's code - zero; the
    step between rows' tables, 0 or 1) for :func:`_gemv_rows_kernel`, from :func:`_levels_table`'s
    ``table``; 2-bit levels repeated over the 16 entries (the lookup reads 4 bits, two codes)."""
    offset, lut = table
    if offset:
        lut = np.arange(1 << bits, dtype=np.float32)[None, :] + -_f32(qt.zeros, 2)[:, :1]
    else:
        lut = lut[None, :1 << bits]
    return np.ascontiguousarray(lut[:, np.arange(TABLE) % (1 << bits)]), int(offset)


@njit(fastmath=True, inline="always")  # a call, with its arrays' reference counts, cost 100 ns a row
def _gemv_row(acc, r, s, rowptr, ocols, dvals, dkind, x, out):
    """out[b, r] from row r's dots ``acc[b]`` (one per row of x, before its scale ``s``): times s,
    plus its outliers' exact values less their levels dotted with x (:func:`_outlier_dot`)."""
    p0 = rowptr[r]
    p1 = rowptr[r + 1]
    for b in range(x.shape[0]):
        t = acc[b] * s
        if p1 > p0:
            t += _outlier_dot(dvals[p0:p1], dkind, ocols[p0:p1], x[b])
        out[b, r] = t


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_kernel(xt, x, qweight, scales, bits, qmin, grid, zeros, rowptr, ocols, dvals, dkind, masked, chunks, out):
    """Batches up to GEMV_BATCH, one scale per row, 2/4/8-bit codes on the symmetric or asymmetric
    grid: rows in blocks of 4, each block's masked slot dots (:func:`_slot_kernels`) with each row
    of x when ``masked`` (see :func:`_masked_ok`; else, and for the last rows, each row's shifting
    slot dot), then :func:`_gemv_row`. ``xt`` is (batch, per, nwu): x (column-scaled)
    in slot-major order; ``x`` in column order."""
    batch = xt.shape[0]
    rows = qweight.shape[0]
    asym = grid == GRID_ASYMMETRIC
    nblk = (rows + 3) // 4
    blk_per = (nblk + chunks - 1) // chunks
    for ch in prange(chunks):
        acc = np.empty((4, batch), np.float32)
        for blk in range(ch * blk_per, min(nblk, ch * blk_per + blk_per)):
            r0 = blk * 4
            nr = min(4, rows - r0)
            if masked and nr == 4:
                q0, q1, q2, q3 = qweight[r0], qweight[r0 + 1], qweight[r0 + 2], qweight[r0 + 3]
                if asym:
                    o0, o1, o2, o3 = -zeros[r0, 0], -zeros[r0 + 1, 0], -zeros[r0 + 2, 0], -zeros[r0 + 3, 0]
                else:
                    o0 = o1 = o2 = o3 = qmin
                for b in range(batch):
                    if bits == 4:
                        a0, a1, a2, a3 = _slot_masked4(q0, q1, q2, q3, o0, o1, o2, o3, xt[b])
                    elif bits == 2:
                        a0, a1, a2, a3 = _slot_masked2(q0, q1, q2, q3, o0, o1, o2, o3, xt[b])
                    else:
                        a0, a1, a2, a3 = _slot_masked8(q0, q1, q2, q3, o0, o1, o2, o3, xt[b])
                    acc[0, b] = a0
                    acc[1, b] = a1
                    acc[2, b] = a2
                    acc[3, b] = a3
            else:
                for i in range(nr):
                    q = qweight[r0 + i]
                    off = -zeros[r0 + i, 0] if asym else qmin
                    for b in range(batch):
                        if bits == 4:
                            acc[i, b] = _slot_dot4(q, xt[b], off)
                        elif bits == 2:
                            acc[i, b] = _slot_dot2(q, xt[b], off)
                        else:
                            acc[i, b] = _slot_dot8(q, xt[b], off)
            for i in range(nr):
                _gemv_row(acc[i], r0 + i, scales[r0 + i, 0], rowptr, ocols, dvals, dkind, x, out)


def _largest_level(qt, bits: int) -> float:
    """The largest |code + off| of a symmetric or asymmetric tensor's rows (off = qmin or -zero)."""
    if qt.zeros is None:
        return float(1 << (bits - 1))
    z = np.abs(np.asarray(qt.zeros, dtype=np.float64))
    return float(np.maximum(z, np.abs((1 << bits) - 1 - z)).max()) if z.size else 0.0


def _f32(a, shape=None):
    """``a`` as a C-contiguous float32 array; an empty one of ``shape`` dimensions for None."""
    if a is None:
        return np.zeros((0,) * (shape or 1), np.float32)
    return np.ascontiguousarray(np.asarray(a).astype(np.float32))


class _Static(NamedTuple):
    """What :func:`matmul` derives from a tensor alone, kept with it until it is validated again
    (a layer's calls share it: at SmolLM2's 576x576, forming it took 10 of a call's 100 us)."""

    g: int  # columns per group
    n_groups: int
    grid: int  # index in GRIDS
    qmin: np.float32
    qweight: np.ndarray  # C-contiguous
    zeros: np.ndarray  # float32, empty without
    codebook: np.ndarray
    col: np.ndarray
    table: tuple | None  # the SIMD levels table (:func:`_levels_table`)
    luts: tuple | None  # row luts and their step (:func:`_row_luts`)
    row_scales: np.ndarray | None  # float32, when one scale per row
    rowptr: np.ndarray  # int64
    ocols: np.ndarray  # C-contiguous
    dvals: np.ndarray  # the outliers' differences, as :func:`_outlier_dot` takes them
    dkind: int


def _static(qt) -> _Static:
    bits = int(qt.bits)
    grid = GRIDS.index(qt.grid)
    g, n_groups = group_layout(qt.shape[1], qt.group_size)
    table = _levels_table(qt, bits, grid) if WIDTH and bits != 3 else None
    one = n_groups == 1
    luts = _row_luts(qt, bits, table) if table is not None and bits <= 4 and (one or not table[0]) else None
    qmin, qweight = np.float32(qrange(bits)[0]), np.ascontiguousarray(qt.qweight)
    zeros, codebook, col = _f32(qt.zeros, 2), _f32(qt.codebook), _f32(qt.col_scales)
    rowptr, ocols = qt.outlier_rowptr.astype(np.int64), np.ascontiguousarray(qt.outlier_cols)
    scales = float_scales(qt)  # decoded once: kept only with one scale per row (as many as the rows)
    deltas = _outlier_deltas(qt, qweight, rowptr, ocols, scales, g, grid, qmin, zeros, codebook, col)
    return _Static(g, n_groups, grid, qmin, qweight, zeros, codebook, col, table, luts, scales if one else None, rowptr,
                   ocols, *deltas)


def matmul(x, qt) -> np.ndarray:
    """y = x @ W^T (float32) for (batch, cols) ``x``, from the packed form (see
    :func:`eqcore.backends.numpy.matmul`; equal up to float summation order)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    batch = x.shape[0]
    rows, cols = qt.shape
    bits = int(qt.bits)
    st = qt.derived("numba.matmul", _static)
    g, n_groups, grid, qmin, qw, zeros, codebook, col = st[:8]
    simd_table, luts, row_scales, rowptr, ocols, dvals, dkind = st[8:]
    launch = _dynamic if rows * cols >= DYNAMIC_WEIGHTS else _call
    xc = x if qt.col_scales is None else np.ascontiguousarray(x * col)
    out = np.empty((batch, rows), dtype=np.float32)
    if batch == 0 or rows == 0:
        return out
    threads = numba.get_num_threads()
    chunks = _chunks(rows, threads)
    per = 32 // bits
    slot = bits != 3 and (g % per == 0 or n_groups == 1)
    if slot:  # x in slot-major order: xt[b, k, w] = x[b, w * per + k], 0 past the last column
        nwu = min(qw.shape[1], n_groups * -(-g // per))  # words the groups cover
        gw = -(-g // per)
        lookup = bool(WIDTH) and batch <= ROWS_BATCH and n_groups == 1 and bits <= 4
        masked = not lookup and batch <= GEMV_BATCH and n_groups == 1 and grid != GRID_CODEBOOK
        table = None if masked else simd_table
        if table is not None:  # the SIMD kernels read whole vectors: x padded with zeros to a multiple of WIDTH words
            nwu = -(-nwu // WIDTH) * WIDTH
        xt = np.zeros((batch, nwu * per), np.float32)
        xt[:, :cols] = xc
        xt = np.ascontiguousarray(xt.reshape(batch, nwu, per).transpose(0, 2, 1))
        if masked:
            launch(_gemv_kernel, xt, x, qw, row_scales, bits, qmin, grid, zeros, rowptr, ocols, dvals, dkind,
                   _masked_ok(xt, _largest_level(qt, bits), bits), _chunks(-(-rows // 4), threads), out)
            return out
        if lookup:
            signed = SIGNED_LEVELS and batch == 1 and grid == GRID_SYMMETRIC  # its tables: code + qmin
            launch(_gemv_rows_kernel, xt, x, qw, *luts, row_scales, bits, rowptr, ocols, dvals, dkind, signed,
                   _chunks(-(-rows // 4), threads), out)
            return out
        if table is not None:
            offset, lut = table
            rel, first = _word_groups(nwu, gw)
            if not offset and batch <= SIMD_BATCH:  # groups without offsets: the row-lookup GEMV in groups
                launch(_gemv_group_rows_kernel, xt, x, qw, luts[0][0], float_scales(qt), rel, first, bits, rowptr, ocols,
                       dvals, dkind, _chunks(-(-rows // 4), threads), out)
                return out
            if batch <= SIMD_BATCH:  # any whole-word groups, one row of x at a time
                launch(_gemv_simd_kernel, xt, x, qw, float_scales(qt), rel, first, bits, offset, lut, qmin, zeros,
                       rowptr, ocols, dvals, dkind, chunks, out)
                return out
        scales = float_scales(qt) if row_scales is None else row_scales  # decoded here, not by the kernel above
        if table is None and batch == 1 and grid != GRID_CODEBOOK:
            launch(_gemv_groups_kernel, xt[0], x[0], qw, scales, gw, bits, qmin, grid, zeros, rowptr, ocols, dvals, dkind,
                   chunks, out)
            return out
        xt = xt.reshape(batch, nwu * per)
    else:
        xt, nwu, gw, scales, table = xc, 0, 0, float_scales(qt) if row_scales is None else row_scales, None
    if table is None:
        offset, lut, rel = False, np.zeros(TABLE, np.float32), np.zeros(0, np.int32)
        first = rel
    ovals, kind = _float_bits(qt.outlier_vals)
    launch(_block_kernel, xt, x, qw, scales, zeros, codebook, col, g, gw, bits, qmin, grid, slot, rowptr, ocols,
           ovals, kind, table is not None, offset, lut, rel, first, chunks, out)
    return out
