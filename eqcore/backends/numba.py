"""The Numba backend: the reference codec compiled, parallel over rows.

Same operations and signatures as :mod:`eqcore.backends.numpy`, and bit-identical results:
codes, packing and dequantized values (fp16 / bf16 conversions are done on the bits, with the
reference's rounding). Compiled kernels are cached on disk outside the package (see
:mod:`eqcore.cache`).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .. import cache
from ..dtypes import all_finite, bfloat16, finite_max, saturate, weight_dtype
from ..layout import (BLOCK, GRID_ASYMMETRIC, GRID_CODEBOOK, GRID_SYMMETRIC, GRIDS, check_bits, col_index_dtype,
                      group_layout, narrow_rowptr, packed_cols, qrange)
from .numba_bits import code_at, f32_to_bf16_bits, f32_to_f16_bits, half_bits_to_f32, unpack_stream as _unpack_stream
from .numba_scales import float_scales
from .numpy import check_codes, check_packed

name = "numba"
cache.install_numba_locator()


def asarray(a):
    """``a`` as a NumPy array (this backend's arrays)."""
    return np.asarray(a)


@njit
def quant_code(x, s, qmin, qmax):
    """Branch-free :func:`eqcore.solvers.rowmath.quant_code` for float32 x, s, qmin, qmax.

    Returns the same integer value (as float32): the float32 quotient is rounded half
    to even by ``rint`` (IEEE default mode), then clamped; rint is monotone, so
    clamping after rounding equals the reference's clamping before it. Compiled
    without fast-math, so ``x / s`` stays an IEEE division even when inlined into
    a fast-math loop.
    """
    return min(max(np.rint(x / s), qmin), qmax)


_W_F32, _W_F16, _W_BF16 = 0, 1, 2  # how split_outliers reads a weight element


@njit(inline="always")
def _weight_f32(v, kind):
    """float32 value of a weight element: float32 itself, or float16 / bfloat16 bits."""
    if kind == _W_F16:
        return half_bits_to_f32(np.uint16(v))  # (typed for float32 weights too: never run there)
    if kind == _W_BF16:
        return np.int32(np.int32(v) << 16).view(np.float32)
    return np.float32(v)


# -- row kernels ------------------------------------------------------------------
@njit(inline="always")
def _pack_pow2(codes, bits, lg, out):
    """:func:`_pack_row` for widths dividing 32 (code c at bits (c % per) * bits of word c >> lg):
    whole words in a constant-width loop, then the ragged word and the padding."""
    per = 1 << lg
    cols = codes.shape[0]
    full = cols >> lg
    for wi in range(full):
        acc = np.uint32(0)
        for k in range(per):
            acc |= np.uint32(codes[wi * per + k]) << np.uint32(k * bits)
        out[wi] = acc
    for wi in range(full, out.shape[0]):
        acc = np.uint32(0)
        for k in range(per):
            if wi * per + k < cols:
                acc |= np.uint32(codes[wi * per + k]) << np.uint32(k * bits)
        out[wi] = acc


@njit
def _pack_stream(codes, bits, out):
    """Stream ``codes`` into ``out``, ``bits`` at a time (codes may straddle two words)."""
    cols = codes.shape[0]
    acc = np.uint64(0)
    nb = 0
    w = 0
    for c in range(out.shape[0] // bits * BLOCK):
        if c < cols:
            acc |= np.uint64(codes[c]) << np.uint64(nb)
        nb += bits
        if nb >= 32:
            out[w] = np.uint32(acc & np.uint64(0xFFFFFFFF))
            w += 1
            acc >>= np.uint64(32)
            nb -= 32


@njit(inline="always")
def _unpack_pow2(words, bits, lg, out):
    """Codes of width ``bits`` = 32 >> lg: code c at bits (c % per) * bits of word c >> lg, one
    branch-free loop (vectorised when bits and lg are constants)."""
    for c in range(out.shape[0]):
        out[c] = np.uint8(code_at(words, c, bits, lg))


def _by_width(whole_words, stream):
    """A row function that takes ``whole_words(a, bits, lg, out)`` for the widths dividing 32
    (bits = 32 >> lg, passed as constants so that LLVM specialises and vectorises each loop) and
    ``stream(a, bits, out)`` for the others (3 bits)."""

    @njit
    def row(a, bits, out):
        if bits == 4:
            whole_words(a, 4, 3, out)
        elif bits == 2:
            whole_words(a, 2, 4, out)
        elif bits == 8:
            whole_words(a, 8, 2, out)
        else:
            stream(a, bits, out)

    return row


_pack_row = _by_width(_pack_pow2, _pack_stream)  # codes (uint8) -> out (uint32 words), zero-padded to whole blocks
_unpack_row = _by_width(_unpack_pow2, _unpack_stream)  # one packed row -> out (uint8 codes, length cols)


@njit
def grid_code(t, grid, bits, qmin, qmax, z, mids):
    """Unsigned code of float32 quotient ``t`` on one grid (:func:`eqcore.backends.numpy.grid_codes`):
    symmetric clamp(rint(t)) - qmin, asymmetric clamp(rint(t + z), 0, 2^k - 1) with a float32 sum,
    codebook the number of midpoints strictly below t."""
    if grid == GRID_CODEBOOK:
        u = 0
        for m in mids:  # at most 255 midpoints, increasing
            if m < t:
                u += 1
        return np.uint8(u)
    if grid == GRID_ASYMMETRIC:
        return np.uint8(min(max(np.rint(np.float32(t + z)), np.float32(0)), np.float32((1 << bits) - 1)))
    return np.uint8(min(max(np.rint(t), qmin), qmax) - qmin)


@njit
def _symmetric_codes(x, s, qmin, qmax, codes):
    """codes[i] = clamp(rint(x[i] / s)) - qmin: the symmetric grid's codes of one group."""
    for i in range(x.shape[0]):
        codes[i] = np.uint8(np.int32(quant_code(x[i], s, qmin, qmax) - qmin))


@njit(parallel=True, cache=True)
def _encode_kernel(x, scales, g, bits, qmin, qmax, grid, zeros, mids, col, chunks, out):
    """Codes of each row into a workspace (one per chunk of rows), then packed into its row of out."""
    rows, cols = x.shape
    n_groups = scales.shape[1]
    has_col = col.shape[0] > 0
    per = (rows + chunks - 1) // chunks
    for k in prange(chunks):
        codes = np.empty(cols, np.uint8)
        for r in range(k * per, min(rows, k * per + per)):
            if grid == GRID_SYMMETRIC and not has_col:  # a vectorisable loop per group
                for j in range(n_groups):
                    c0, c1 = j * g, min(j * g + g, cols)
                    _symmetric_codes(x[r, c0:c1], scales[r, j], qmin, qmax, codes[c0:c1])
            else:
                for j in range(n_groups):
                    s = scales[r, j]
                    z = zeros[r, j] if grid == GRID_ASYMMETRIC else np.float32(0)
                    for c in range(j * g, min(j * g + g, cols)):
                        y = x[r, c] / col[c] if has_col else x[r, c]
                        codes[c] = grid_code(np.float32(y / s), grid, bits, qmin, qmax, z, mids)
            _pack_row(codes, bits, out[r])


@njit(parallel=True, cache=True)
def _pack_kernel(codes, bits, out):
    for r in prange(codes.shape[0]):
        _pack_row(codes[r], bits, out[r])


@njit(parallel=True, cache=True)
def _unpack_kernel(packed, bits, out):
    for r in prange(packed.shape[0]):
        _unpack_row(packed[r], bits, out[r])


_F32, _BF16, _F16 = 0, 1, 2  # how _dequant_kernel writes its float32 values


@njit
def _group_values(codes, grid, off, s, codebook, col, top, vals):
    """vals[i] = level(codes[i]) * s (times col[i] when ``col`` is not empty), float32, clamped
    to [-top, top]; the level is codes[i] + off (off = qmin, or -z: float32 u - z) or
    codebook[codes[i]]. Loops over whole views from 0, one per case, so LLVM vectorises them."""
    low = -top
    if grid == GRID_CODEBOOK:
        for i in range(codes.shape[0]):
            v = np.float32(codebook[codes[i]] * s)
            v = np.float32(v * col[i]) if col.shape[0] > 0 else v
            vals[i] = min(max(v, low), top)
    elif col.shape[0] > 0:
        for i in range(codes.shape[0]):
            vals[i] = min(max(np.float32(np.float32((np.float32(codes[i]) + off) * s) * col[i]), low), top)
    else:
        for i in range(codes.shape[0]):
            vals[i] = min(max(np.float32((np.float32(codes[i]) + off) * s), low), top)


@njit
def _store_row(vals, mode, orow):
    """orow = vals as float32 (or the output's wider float), bfloat16 or float16 bits."""
    if mode == _BF16:
        for c in range(orow.shape[0]):
            orow[c] = f32_to_bf16_bits(vals[c])
    elif mode == _F16:
        for c in range(orow.shape[0]):
            orow[c] = f32_to_f16_bits(vals[c])
    else:
        for c in range(orow.shape[0]):
            orow[c] = vals[c]


@njit
def _lookup(codes, table, orow):
    """orow[i] = table[codes[i]]."""
    for i in range(codes.shape[0]):
        orow[i] = table[codes[i]]


@njit
def _byte_pairs(t, pairs):
    """pairs[b] = t[b & 15] | t[b >> 4] << 16: the two 16-bit values of a byte of 4-bit codes."""
    for b in range(256):
        pairs[b] = np.uint32(t[b & 15]) | (np.uint32(t[b >> 4]) << np.uint32(16))


@njit
def _lookup_pairs(codes, pairs, o32):
    """o32[i] = pairs[codes[i]]: two output values per byte of 4-bit codes."""
    for i in range(codes.shape[0]):
        o32[i] = pairs[codes[i]]


@njit(parallel=True, cache=True)
def _dequant_kernel(qweight, scales, g, bits, qmin, grid, zeros, codebook, col, rowptr, ocols, ovals, mode, top,
                    chunks, out):
    """Without column scales a group takes only 2^bits values: when the group is at least twice
    that long they are computed once (the same float32 arithmetic and conversion, so the same
    bits) and the row is a table lookup, of the packed bytes themselves (two values each) for
    4-bit codes in 16-bit outputs of even widths; else value by value. (float16 took the value
    by value path, its conversion one instruction per 16 values, until alternating runs found
    the byte-pair lookup as fast at 4096x4096 and 12-28% faster at 11008x4096: 6.5-7.0 against
    7.9-9.0 ms into an existing array.)"""
    rows, cols = out.shape
    n_groups = scales.shape[1]
    has_col = col.shape[0] > 0
    levels = np.arange(1 << bits).astype(np.uint8)
    tabled = not has_col and g >= 2 * levels.shape[0]
    paired = tabled and bits == 4 and mode != _F32 and g % 2 == 0 and cols % 2 == 0
    per = (rows + chunks - 1) // chunks
    for k in prange(chunks):  # one workspace per chunk of rows
        codes = np.empty(cols, np.uint8)
        vals = np.empty(cols, np.float32)
        table = np.empty(levels.shape[0], out.dtype)
        pairs = np.empty(256, np.uint32)
        for r in range(k * per, min(rows, k * per + per)):
            orow = out[r]
            if paired:
                rbytes = qweight[r].view(np.uint8)  # little-endian: code 2i in the low nibble of byte i
                o32 = orow.view(np.uint32)
            else:
                _unpack_row(qweight[r], bits, codes)
            for j in range(n_groups):
                c0, c1 = j * g, min(j * g + g, cols)
                off = -zeros[r, j] if grid == GRID_ASYMMETRIC else qmin
                if tabled:
                    tv = vals[:levels.shape[0]]
                    _group_values(levels, grid, off, scales[r, j], codebook, col, top, tv)
                    _store_row(tv, mode, table)
                    if paired:
                        _byte_pairs(table, pairs)
                        _lookup_pairs(rbytes[c0 // 2:c1 // 2], pairs, o32[c0 // 2:c1 // 2])
                    else:
                        _lookup(codes[c0:c1], table, orow[c0:c1])
                else:
                    _group_values(codes[c0:c1], grid, off, scales[r, j], codebook, col[c0:c1] if has_col else col,
                                  top, vals[c0:c1])
            if not tabled:
                _store_row(vals, mode, orow)
            for p in range(rowptr[r], rowptr[r + 1]):
                orow[ocols[p]] = ovals[p]


# -- the backend's operations (signatures of eqcore.backends.numpy) ------------------
def _grid_args(grid: str, rows: int, n_groups: int, cols: int, zeros, codebook, col_scales):
    """(grid index, zeros, codebook, col scales) as the kernels take them: float32 C arrays, empty
    where the grid has none."""
    f32 = np.float32
    z = np.zeros((0, 0), f32) if zeros is None else np.ascontiguousarray(np.asarray(zeros).astype(f32))
    cb = np.zeros(0, f32) if codebook is None else np.ascontiguousarray(codebook, dtype=f32)
    c = np.zeros(0, f32) if col_scales is None else np.ascontiguousarray(np.asarray(col_scales).astype(f32))
    if zeros is not None and z.shape != (rows, n_groups):
        raise ValueError(f"zeros must have shape {(rows, n_groups)}, got {z.shape}")
    if col_scales is not None and c.shape != (cols,):
        raise ValueError(f"col_scales must have shape {(cols,)}, got {c.shape}")
    return GRIDS.index(grid), z, cb, c


def _grid_of(zeros, codebook) -> str:
    return "codebook" if codebook is not None else "asymmetric" if zeros is not None else "symmetric"


def encode(x: np.ndarray, scales: np.ndarray, bits: int, group_size: int | None, zeros=None, codebook=None,
           col_scales=None, out: np.ndarray | None = None) -> np.ndarray:
    """Packed codes of float32 ``x`` at ``scales`` on the grid ``zeros`` / ``codebook`` select
    (of x / col_scales, if given): codes and packing fused in one pass; into ``out`` (uint32,
    (rows, packed_cols), rows C-contiguous) when given."""
    bits = check_bits(bits)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    g, n_groups = group_layout(cols, group_size)
    scales = np.ascontiguousarray(np.asarray(scales).astype(np.float32))
    if scales.shape != (rows, n_groups):
        raise ValueError(f"scales must have shape {(rows, n_groups)}, got {scales.shape}")
    grid, z, cb, col = _grid_args(_grid_of(zeros, codebook), rows, n_groups, cols, zeros, codebook, col_scales)
    mids = ((cb[:-1] + cb[1:]) * np.float32(0.5)).astype(np.float32)
    if out is None:
        out = np.empty((rows, packed_cols(cols, bits)), dtype=np.uint32)
    elif out.dtype != np.uint32 or out.shape != (rows, packed_cols(cols, bits)) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint32 array of shape {(rows, packed_cols(cols, bits))}")
    qmin, qmax = qrange(bits)
    _encode_kernel(x, scales, g, bits, np.float32(qmin), np.float32(qmax), grid, z, mids, col, _chunks(rows), out)
    return out


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (rows, cols) -> (rows, packed_cols) uint32 (same checks and layout)."""
    codes, bits = check_codes(codes, bits)
    out = np.empty((codes.shape[0], packed_cols(codes.shape[1], bits)), dtype=np.uint32)
    _pack_kernel(np.ascontiguousarray(codes, dtype=np.uint8), bits, out)
    return out


def unpack(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """(rows, packed_cols) uint32 -> (rows, cols) uint8 codes."""
    packed, bits = check_packed(packed, bits, cols)
    out = np.empty((packed.shape[0], cols), dtype=np.uint8)
    _unpack_kernel(np.ascontiguousarray(packed), bits, out)
    return out


def _tensor_args(qt) -> tuple:
    """What the dequant and matmul kernels take of ``qt``, in their order: qweight, float32 scales,
    columns per group, bits, qmin, then :func:`_grid_args`' grid, zeros, codebook and column
    scales, then the int64 row pointers and column indices of the outliers."""
    rows, cols = qt.shape
    g, n_groups = group_layout(cols, qt.group_size)
    grid, z, cb, col = _grid_args(qt.grid, rows, n_groups, cols, qt.zeros, qt.codebook, qt.col_scales)
    return (np.ascontiguousarray(qt.qweight), np.ascontiguousarray(float_scales(qt)), g, int(qt.bits),
            np.float32(qrange(qt.bits)[0]), grid, z, cb, col, qt.outlier_rowptr.astype(np.int64),
            qt.outlier_cols.astype(np.int64))


@njit(parallel=True, cache=True)
def _half_to_f32(h, out):
    for i in prange(h.shape[0]):
        out[i] = half_bits_to_f32(h[i])


@njit(parallel=True, cache=True)
def _half_to_bf16(h, out):
    for i in prange(h.shape[0]):
        out[i] = f32_to_bf16_bits(half_bits_to_f32(h[i]))


def _outlier_values(vals, dtype):
    """``saturate(vals, dtype)``, the outliers as the reference casts them; finite float16 into a
    wider float or bfloat16 by Numba's conversion (exact, then one rounding; NumPy's cast took
    1.3 ms for 224k values, ml_dtypes' to bfloat16 0.43 ms for 197k, 15% of a 4096x4096
    dequantize)."""
    if vals.dtype == np.float16 and (dtype.itemsize >= 4 or dtype == bfloat16) and all_finite(vals):
        h = np.ascontiguousarray(vals).view(np.uint16)
        if dtype == bfloat16:
            b = np.empty(vals.shape[0], np.uint16)
            _half_to_bf16(h, b)
            return b.view(bfloat16)
        f32 = np.empty(vals.shape[0], np.float32)
        _half_to_f32(h, f32)
        return f32.astype(dtype, copy=False)
    return saturate(vals, dtype)


def dequantize(qt, dtype=None, out=None) -> np.ndarray:
    """Dense (rows, cols) in ``dtype``, outliers scattered per row, in one parallel pass; into
    ``out`` (C-contiguous, that shape and dtype) if given."""
    dtype = weight_dtype(dtype or qt.dtype)
    vals = _outlier_values(qt.outlier_vals, dtype)  # small; cast exactly like the reference
    out = np.empty(qt.shape, dtype=dtype) if out is None else out
    mode, buf = _F32, out
    if dtype.itemsize == 2:
        mode, buf, vals = (_BF16 if dtype == bfloat16 else _F16), out.view(np.uint16), vals.view(np.uint16)
    _dequant_kernel(*_tensor_args(qt), vals, mode, np.float32(finite_max(dtype)), _chunks(qt.shape[0]), buf)
    return out


@njit(fastmath={"reassoc"})
def _cast_sums(wr, kind, xr):
    """xr = float32 values of the weight row ``wr``; returns the sums of x, |x| and x^2 in float64
    (each x^2 exact), added in any order (one vectorised loop)."""
    s = 0.0
    a = 0.0
    s2 = 0.0
    for c in range(xr.shape[0]):
        v = _weight_f32(wr[c], kind)
        xr[c] = v
        d = np.float64(v)
        s += d
        a += abs(d)
        s2 += d * d
    return s, a, s2


def _squares(xr, m):
    """Sum of (float64(x) - m)^2 over float32 row xr (each term rounded on its own: no fused
    multiply-add)."""
    q = 0.0
    for c in range(xr.shape[0]):
        d = np.float64(xr[c]) - m
        q += d * d
    return q


_squares_any_order = njit(fastmath={"reassoc"})(_squares)  # in any order: vectorised
_squares_in_order = njit(_squares)  # left to right, as the reference


@njit
def _min_exponent(xr):
    """Smallest exponent field (at least 1) of the nonzero values of float32 row xr (255 if none)."""
    bits = xr.view(np.int32)
    e = np.int32(255)
    for c in range(bits.shape[0]):
        b = np.int32(bits[c] & np.int32(0x7FFFFFFF))
        e = min(e, np.int32(b >> 23) if b != 0 else np.int32(255))
    return max(e, np.int32(1))


@njit
def _sum_in_order(xr):
    s = 0.0
    for c in range(xr.shape[0]):
        s += np.float64(xr[c])
    return s


@njit
def _threshold(q, cols, sigma):
    std = np.sqrt(q / cols)
    return sigma * std if std > 0 else np.inf


@njit
def _decided_bounds(m, q_lo, q_hi, cols, sigma):
    """The float32 bounds of every sum of squares q in [q_lo, q_hi] when they are all the same (t
    is monotone in q and the bounds in t), else (NaN, NaN)."""
    nan = np.float32(np.nan)
    if not (q_lo > 0 and np.sqrt(q_lo / cols) > 0):
        return nan, nan
    lo1, hi1 = _split_bounds(m, _threshold(q_lo, cols, sigma))
    lo2, hi2 = _split_bounds(m, _threshold(q_hi, cols, sigma))
    if lo1 == lo2 and hi1 == hi2:  # NaN (no bounds) compares unequal
        return lo1, hi1
    return nan, nan


@njit
def _split_stats(xr, s, a, s2, kind, sigma):
    """(mean, threshold t, lo, hi) of float32 row xr as the reference's row loop computes them
    (float64 sums left to right; t = sigma * std, inf when std is 0), with the float32 bounds of
    :func:`_split_bounds` (NaN when the float64 test must be used; t is NaN when the bounds were
    decided without it); mean NaN when the row is not finite. ``s, a, s2``: the sums of x, |x|
    and x^2 in any order (:func:`_cast_sums`).

    The outliers are decided without the row's own loops where provably the same: the plain sum
    is exact when every partial sum is (all values are multiples of the smallest one's unit in
    the last place u, and sum |x| < 2^52 u); the row's in-order sum of squares q about m lies
    within a proven distance of s2 - m * s (rounding of s2, of m and of each term, and of the
    in-order sum); t is monotone in q, so when both ends of that range give the same float32
    bounds, q gives them too. Failing that (large mean, ties at the threshold), the same with the
    sum of squares about m taken in any order (within (cols + 4) * 2^-51 of q), then the row's
    own loops."""
    cols = xr.shape[0]
    if not (np.isfinite(s) and np.isfinite(a) and np.isfinite(s2)):  # NaN or Inf (finite sums cannot overflow)
        return np.nan, np.nan, np.float32(np.nan), np.float32(np.nan)
    if kind == _W_F16:
        ulp = 2.0 ** -24  # every float16 is a multiple of its smallest subnormal
    else:
        ulp = 2.0 ** (np.int64(_min_exponent(xr)) - (134 if kind == _W_BF16 else 150))
    exact = a < 2.0 ** 52 * ulp
    if not exact:
        s = _sum_in_order(xr)
    m = s / cols
    eps = 2.0 ** -52  # twice float64's unit roundoff: every bound below has a factor 2 to spare
    if exact:  # q = s2 - 2 m s + cols m^2 + rounding, no pass over the row
        ms = m * s
        r = s2 - ms
        e = eps * ((cols + 4) * s2 + 2 * abs(ms) + abs(r))
        g = (cols + 8) * eps
        lo, hi = _decided_bounds(m, (r - e) * (1 - g), (r + e) * (1 + g), cols, sigma)
        if lo == lo:
            return m, np.nan, lo, hi
    q = _squares_any_order(xr, m)
    if q > 0:
        g = (cols + 4) * 2 * eps
        lo, hi = _decided_bounds(m, q * (1 - g), q * (1 + g), cols, sigma)
        if lo == lo:
            return m, np.nan, lo, hi
        q = _squares_in_order(xr, m)
    t = _threshold(q, cols, sigma)  # q == 0: every term was 0, in any order
    lo, hi = _split_bounds(m, t)
    return m, t, lo, hi


_F32_MAX = np.float32(np.finfo(np.float32).max)
_BOUND_STEPS = 16  # float32 steps a bound may move from its rounded first guess (else the float64 test)


@njit
def _split_bounds(m, t):
    """(lo, hi): float32 bounds with |float64(v) - m| >= t  <=>  v <= lo or v >= hi for every finite
    float32 v (the difference rounds monotonically in v, so each side is a ray); (NaN, NaN) when
    the rounded guesses m -+ t are further than _BOUND_STEPS steps off. lo is hi's mirror: v <= lo
    exactly where -v >= the upper bound about -m (negation is exact and rounding symmetric)."""
    nan = np.float32(np.nan)
    hi = _upper_bound(m, t)
    if hi != hi:
        return nan, nan
    lo = -_upper_bound(-m, t)
    if lo != lo:
        return nan, nan
    return lo, hi


@njit
def _upper_bound(m, t):
    """The smallest float32 hi with float64(v) - m >= t for every float32 v >= hi (inf: none;
    NaN: the rounded guess m + t is further than _BOUND_STEPS steps off)."""
    inf32 = np.float32(np.inf)
    if not t < np.inf:
        return inf32
    if m + t > _F32_MAX:
        hi = inf32 if np.float64(_F32_MAX) - m < t else _F32_MAX
    else:
        hi = np.float32(m + t)
    if hi < inf32:
        k = 0
        while np.float64(hi) - m < t:  # up to the first float32 that passes
            hi = np.nextafter(hi, inf32)
            k += 1
            if hi == inf32 or k > _BOUND_STEPS:
                break
        while hi < inf32 and k <= _BOUND_STEPS:  # down while the one below passes too
            d = np.nextafter(hi, -inf32)
            if np.float64(d) - m < t:
                break
            hi = d
            k += 1
        if k > _BOUND_STEPS:
            return np.float32(np.nan)
    return hi


def _byte_tables():
    """For each byte m of 8 flags: the positions of its set bits, lowest first (0-padded to 8), and
    how many there are."""
    pos = np.zeros((256, 8), np.uint8)
    for m in range(256):
        on = [b for b in range(8) if m >> b & 1]
        pos[m, :len(on)] = on
    return pos, np.array([bin(m).count("1") for m in range(256)], np.int64)


_FLAG_POS, _FLAG_COUNT = _byte_tables()
_GATHER_FLAGS = np.uint64(0x0102040810204080)  # (8 bytes of 0/1) * this >> 56: byte i -> bit i
SPLIT_SLACK = 8  # scratch slots after the kept ones: a word of flags is written whole


@njit
def _split_zero(xr, wr, m, t, lo, hi, flags, scol, sval):
    """Zero the outliers of xr (v <= lo or v >= hi; without bounds (lo NaN), |float64(v) - m| >= t)
    and flag them in ``flags``; their columns and raw values wr[c] go to scol / sval while they
    fit (the last SPLIT_SLACK slots are scratch). Returns their number."""
    cols = xr.shape[0]
    if lo == lo:  # two float32 comparisons per value, vectorised
        for c in range(cols):
            v = xr[c]
            f = (v <= lo) | (v >= hi)
            flags[c] = f
            xr[c] = np.float32(0.0) if f else v
    else:
        for c in range(cols):
            v = xr[c]
            f = abs(np.float64(v) - m) >= t
            flags[c] = f
            xr[c] = np.float32(0.0) if f else v
    cap = scol.shape[0] - SPLIT_SLACK
    words = flags[:cols // 8 * 8].view(np.uint64)
    n = 0
    kept = 0
    for i in range(words.shape[0]):  # outliers are rare: whole words of 8 flags at a time
        if words[i] != 0:  # its flags as a byte, then all 8 slots written from a table, no branches
            b = (words[i] * _GATHER_FLAGS) >> np.uint64(56)
            for k in range(8):
                c = 8 * i + np.int64(_FLAG_POS[b, k])
                scol[kept + k] = c
                sval[kept + k] = wr[c]
            n += _FLAG_COUNT[b]
            kept = min(n, cap)
    for c in range(words.shape[0] * 8, cols):
        scol[kept] = c
        sval[kept] = wr[c]
        n += np.int64(flags[c])
        kept = min(n, cap)
    return n


@njit(parallel=True, cache=True)
def _split_kernel(w, kind, sigma, chunks, x, mean, thr, bounds, counts, scols, svals):
    """x = float32(w) with each row's outliers zeroed (|w - mean| >= sigma * std, float64 sums
    left to right, as :func:`eqcore.outliers.outlier_mask` with row statistics), a row at a time
    while it is in cache; per row :func:`_split_stats`' mean, threshold and bounds, its number of
    outliers and the first scols.shape[1] - SPLIT_SLACK of them (column, raw value)."""
    rows, cols = w.shape
    per = (rows + chunks - 1) // chunks
    for k in prange(chunks):
        flags = np.empty(cols + 8, np.bool_)
        for r in range(k * per, min(rows, k * per + per)):
            split_row(w, kind, sigma, r, x[r], flags, mean, thr, bounds, counts, scols, svals)


@njit
def split_row(w, kind, sigma, r, xr, flags, mean, thr, bounds, counts, scols, svals):
    """Row r of :func:`_split_kernel` into xr (float32, outliers zeroed) and the per-row arrays;
    False when the row is not finite (its mean NaN, no outliers counted)."""
    s, a, s2 = _cast_sums(w[r], kind, xr)
    m, t, lo, hi = _split_stats(xr, s, a, s2, kind, sigma)
    mean[r], thr[r], bounds[r, 0], bounds[r, 1] = m, t, lo, hi
    if m != m:
        counts[r] = 0
        return False
    counts[r] = _split_zero(xr, w[r], m, t, lo, hi, flags, scols[r], svals[r])
    return True


@njit(cache=True)
def _split_fill(w, kind, mean, thr, bounds, counts, scols, svals):
    """(False, ...) if a row was not finite (its mean NaN), else (True, int64 row pointers, columns,
    raw values): the CSR of the outliers :func:`_split_kernel` counted, from a row's kept slots or,
    for a row with more outliers than slots, its columns and raw values found again. One thread
    and one call: it copies only the outliers (a parallel launch, or NumPy steps each touching
    cold code after the kernel, would cost more than it saves)."""
    rows, cols = w.shape
    cap = scols.shape[1] - SPLIT_SLACK
    rowptr = np.empty(rows + 1, np.int64)
    rowptr[0] = 0
    ok = True
    for r in range(rows):
        ok &= mean[r] == mean[r]
        rowptr[r + 1] = rowptr[r] + counts[r]
    ocols = np.empty(rowptr[rows] if ok else 0, scols.dtype)
    ovals = np.empty(rowptr[rows] if ok else 0, svals.dtype)
    if not ok:
        return False, rowptr, ocols, ovals
    for r in range(rows):
        p, n = rowptr[r], rowptr[r + 1] - rowptr[r]
        if n <= cap:
            for i in range(n):
                ocols[p + i] = scols[r, i]
                ovals[p + i] = svals[r, i]
            continue
        m, t, lo, hi = mean[r], thr[r], bounds[r, 0], bounds[r, 1]
        for c in range(cols):
            v = _weight_f32(w[r, c], kind)
            if ((v <= lo) | (v >= hi)) if lo == lo else abs(np.float64(v) - m) >= t:
                ocols[p] = c
                ovals[p] = w[r, c]
                p += 1
    return True, rowptr, ocols, ovals


def split_slots(cols: int) -> int:
    """Outliers per row :func:`split_outliers` keeps while zeroing (a row with more is scanned again)."""
    return min(cols, 16 + cols // 16)


SPLIT_KINDS = {np.dtype(np.float32): _W_F32, np.dtype(np.float16): _W_F16, bfloat16: _W_BF16}
SPLIT_DTYPES = tuple(SPLIT_KINDS)  # what split_outliers takes


def _weight_elements(w):
    """(contiguous view of ``w`` as the kernels read it: float32 itself, 16-bit floats as uint16
    bits; its ``_weight_f32`` kind), or (None, None) for other dtypes."""
    kind = SPLIT_KINDS.get(np.dtype(w.dtype))
    if kind is None:
        return None, None
    wv = np.ascontiguousarray(w)
    return (wv if kind == _W_F32 else wv.view(np.uint16)), kind


def split_outliers(w: np.ndarray, sigma: float, out: np.ndarray | None = None, work: dict | None = None):
    """(float32 x with the outliers zeroed, their CSR) of a float16 / bfloat16 / float32 matrix by
    the per-row sigma rule: :func:`eqcore.outliers.outlier_mask` (row statistics), ``to_csr`` and
    the float32 cast with the outliers zeroed, bit for bit, in one parallel pass (three sweeps of
    each row while it is in cache) and a pass over the outliers; None for other dtypes (float64:
    its statistics need its own values). ``out``: a C-contiguous float32 array of w's shape to
    write x into, and ``work``: a dict for its scratch arrays, both kept across row blocks (no
    fresh pages). ValueError if w holds a NaN or an infinity (found by the same pass)."""
    wv, kind = _weight_elements(w)
    if kind is None:
        return None
    rows, cols = w.shape
    if out is None:
        out = np.empty((rows, cols), np.float32)
    elif out.dtype != np.float32 or out.shape != (rows, cols) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {(rows, cols)}")
    stats = split_work(wv, {} if work is None else work)
    _split_kernel(wv, kind, float(sigma), _chunks(rows), out, *stats)
    return out, split_csr(w, wv, kind, stats)


def split_work(wv, work: dict):
    """The split's per-row arrays for weight elements ``wv`` (:func:`_weight_elements`): mean,
    threshold, bounds, outlier counts and the kept slots (columns, raw values), held in ``work``
    and reused by the next block of as many rows or fewer."""
    rows, cols = wv.shape
    cap = split_slots(cols)
    key = (cols, wv.dtype)
    if key not in work or work[key][0].shape[0] < rows:
        work[key] = (np.empty(rows), np.empty(rows), np.empty((rows, 2), np.float32), np.empty(rows, np.int64),
                     np.empty((rows, cap + SPLIT_SLACK), col_index_dtype(cols)),
                     np.empty((rows, cap + SPLIT_SLACK), wv.dtype))
    return tuple(a[:rows] for a in work[key])


def split_csr(w, wv, kind, stats):
    """The outliers' CSR (:class:`eqcore.outliers.Outliers`, raw values in w's dtype) once a split
    kernel has filled ``stats`` (:func:`split_work`); ValueError if a row was not finite."""
    from ..dtypes import NONFINITE
    from ..outliers import Outliers

    ok, rowptr, ocols, ovals = _split_fill(wv, kind, *stats)
    if not ok:
        raise ValueError(NONFINITE)
    return Outliers(narrow_rowptr(rowptr), ocols, ovals.view(np.dtype(w.dtype)))


def _chunks(rows: int) -> int:
    """How many chunks of rows a parallel kernel splits ``rows`` into: four per thread."""
    return max(1, min(rows, 4 * numba.get_num_threads()))


def matmul(x, qt) -> np.ndarray:
    """y = x @ W^T (float32) for (batch, cols) ``x``, from the packed form: the kernels live in
    :mod:`eqcore.backends.numba_matmul` (imported on first use)."""
    if not _FUSED:
        from .numba_matmul import matmul as fused
        _FUSED.append(fused)
    return _FUSED[0](x, qt)


_FUSED = []  # numba_matmul.matmul, once imported


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _error_sums_kernel(w_hat, w, kind, step, out):
    rows, cols = w.shape
    for c in prange(out.shape[0]):  # a chunk's sums on one thread: the same figures on any thread count
        e = 0.0
        r2 = 0.0
        for r in range(c * step, min(rows, (c + 1) * step)):
            a = w_hat[r]
            b = w[r]
            for j in range(cols):
                x = np.float64(_weight_f32(b[j], kind))
                d = np.float64(a[j]) - x
                e += d * d
                r2 += x * x
        out[c, 0] = e
        out[c, 1] = r2


def error_sums(w_hat: np.ndarray, w: np.ndarray, step: int):
    """(sum of squared errors, sum of squares of w) in float64 over each block of ``step`` rows
    (see :func:`eqcore.io.compute.error_sums`, its reference; equal up to float summation order),
    for float32 ``w_hat`` and a float16 / bfloat16 / float32 ``w``; None for other dtypes."""
    wv, kind = _weight_elements(w)
    if kind is None or w.ndim != 2:
        return None
    rows = w.shape[0]
    out = np.empty((max(0, -(-rows // step)), 2), np.float64)
    _error_sums_kernel(np.ascontiguousarray(w_hat, dtype=np.float32), wv, kind, step, out)
    return [(float(e), float(r)) for e, r in out]
