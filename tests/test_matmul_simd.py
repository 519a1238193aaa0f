"""The explicit-SIMD batch-1 matmul (eqcore.backends.numba_simd): its vector dot against NumPy at
both widths, and the kernel against the dense product for every grid, width, group, scale storage
and outlier layout it takes."""
import numpy as np
import numba
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import eqcore
from eqcore.backends import numba_matmul as nb
from eqcore.backends import numba_simd

from helpers import assert_matmul_close as close
from helpers import weights

_FEATURES = __import__("llvmlite.binding", fromlist=["x"]).get_host_cpu_features()
_HOST = {16: bool(_FEATURES.get("avx512f")), 8: bool(_FEATURES.get("avx2") and _FEATURES.get("fma"))}
needs_simd = pytest.mark.skipif(not numba_simd.WIDTH, reason="no AVX2 or AVX-512 on this host")


def _caller(dot):
    @njit
    def call(q, xt, sg, og, lut, rel, first):
        return dot(q, xt, sg, og, lut, rel, first)

    return call


_KINDS = [(2, False), (4, False), (2, True), (4, True), (8, True)]  # (bits, offset)
_CALLERS = {(b, o, w): _caller(numba_simd.group_dot(b, o, w)) for w in (8, 16) for b, o in _KINDS}


@pytest.mark.parametrize("width", [8, 16])
@given(st.sampled_from(_KINDS), st.integers(0, 70),
       st.integers(1, 20), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=60, deadline=None)
def test_vector_dot_is_the_sum_of_levels_times_x(width, kind, nwu, gw, seed):
    """dot(q, xt, sg, og, lut, rel, first) = sum over slots and the full vectors' words of lev * xt,
    lev = lut[code] * sg[j] (lookup) or (code + og[j]) * sg[j] in groups j of ``gw`` words, each
    level rounded once in float32."""
    if not _HOST[width]:
        pytest.skip(f"no {width}-lane SIMD on this host")
    bits, offset = kind
    per = 32 // bits
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** 32, nwu, dtype=np.uint64).astype(np.uint32)
    xt = rng.normal(size=(per, nwu)).astype(np.float32)
    rel, first = nb._word_groups(nwu, gw, width)
    wg = np.arange(nwu) // gw
    groups = -(-nwu // gw) + width
    sg = rng.uniform(0.5, 2, groups).astype(np.float32)
    og = rng.integers(-9, 9, groups).astype(np.float32)
    lut = rng.normal(size=16).astype(np.float32) if bits <= 4 else np.arange(256, dtype=np.float32)
    got = _CALLERS[bits, offset, width](q, xt, sg, og, lut, rel, first)
    n = nwu - nwu % width
    codes = (q[None, :n] >> (bits * np.arange(per, dtype=np.uint32))[:, None]) & np.uint32((1 << bits) - 1)
    j = wg[:n]
    lev = (lut[codes] + og[j] if offset else lut[codes]) * sg[j]
    want = (lev.astype(np.float64) * xt[:, :n]).sum()
    assert abs(got - want) <= 1e-5 * (np.abs(lev).astype(np.float64) * np.abs(xt[:, :n])).sum() + 1e-30


@needs_simd
@given(st.sampled_from(["symmetric", "asymmetric", "codebook"]), st.sampled_from([2, 4, 8]),
       st.sampled_from([None, 32, 40, 96, 128]), st.booleans(),
       st.sampled_from(["float32", "float16", "bfloat16", "log8"]), st.integers(1, 9), st.integers(1, 700),
       st.sampled_from([None, 2.0, 3.3]), st.sampled_from([1, 2, 3, 6]), st.integers(0, 10))
@settings(max_examples=80, deadline=None)
def test_simd_kernels_match_the_dense_product(grid, bits, group, col, scale_dtype, rows, cols, sigma, batch, seed):
    """The SIMD GEMV (batches up to nb.SIMD_BATCH) and the block kernel with levels from SIMD
    lookups (larger batches), over full vectors of words and the scalar tail, outliers of every
    stored dtype and column scales, equal the NumPy reference within the matmul contract."""
    dtype = np.float16 if seed % 2 else np.float32
    w = weights(rows, cols, seed=seed, dtype=dtype)
    qt = eqcore.quantize(w, bits=bits, group_size=group, grid=grid, col_scales=col, scale_dtype=scale_dtype,
                         sigma=sigma, steps=3)
    x = np.random.default_rng(seed).normal(size=(batch, cols)).astype(np.float32)
    close(eqcore.matmul(x, qt), x, qt)


@needs_simd
@pytest.mark.parametrize("grid, kernel", [("symmetric", "_gemv_group_rows_kernel"), ("codebook", "_gemv_group_rows_kernel"),
                                          ("asymmetric", "_gemv_simd_kernel")])
@pytest.mark.parametrize("scale_dtype", ["float16", "log8"])
@pytest.mark.parametrize("batch", [1, 2])
def test_simd_gemv_takes_the_quality_layouts(grid, kernel, scale_dtype, batch):
    """The grouped and codebook layouts at batches 1-2 go through the row-lookup GEMV in groups
    (levels without offsets) or the SIMD GEMV (the asymmetric grid's offsets), not the block kernel
    that forms each row's levels first, with outliers, and give the dense product."""
    w = weights(24, 1000, seed=3, dtype=np.float16)
    qt = eqcore.quantize(w, bits=4, group_size=96, grid=grid, scale_dtype=scale_dtype, sigma=2.5, steps=3)
    assert qt.outlier_vals.size > 0 and nb._levels_table(qt, 4, nb.GRIDS.index(grid)) is not None
    x = np.random.default_rng(0).normal(size=(batch, 1000)).astype(np.float32)
    calls = []
    k = getattr(nb, kernel)
    try:
        setattr(nb, kernel, lambda *a: calls.append(k(*a)))
        y = eqcore.matmul(x, qt)
    finally:
        setattr(nb, kernel, k)
    assert len(calls) == 1
    close(y, x, qt)


def test_no_simd_where_numba_compiles_for_another_cpu(monkeypatch):
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    assert numba_simd.host_width() == 0


def test_converted_codes_take_offsets():
    with pytest.raises(ValueError, match="offsets"):
        numba_simd.group_dot(8, False)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("grid, group", [("symmetric", 64), ("asymmetric", 128), ("codebook", 96), ("symmetric", 40)])
def test_hosts_without_simd_take_the_portable_kernels(monkeypatch, grid, group, batch):
    """With no AVX2 (WIDTH 0), groups take the scaled slot dot (batch 1, groups of whole words)
    or the block kernel with levels formed one code at a time, and give the same product."""
    monkeypatch.setattr(nb, "WIDTH", 0)
    called = []
    monkeypatch.setattr(nb, "_gemv_simd_kernel", lambda *a: called.append(a))
    w = weights(9, 520, seed=4, dtype=np.float16)
    qt = eqcore.quantize(w, bits=4, group_size=group, grid=grid, sigma=2.5, steps=3)
    x = np.random.default_rng(1).normal(size=(batch, 520)).astype(np.float32)
    close(eqcore.matmul(x, qt), x, qt)
    assert not called


def test_whole_vectors_never_read_past_the_last_row():
    """The SIMD kernels read rows of W in whole vectors: a row before the last reads on into the
    next one (in bounds); the last row, when shorter, comes as a zero-padded copy."""
    qw = np.arange(15, dtype=np.uint32).reshape(3, 5)
    qpad = np.full(16, 7, np.uint32)
    np.testing.assert_array_equal(nb._whole_vectors(qw, 1, qpad), qw[1])
    last = nb._whole_vectors(qw, 2, np.zeros(16, np.uint32))
    assert last.shape == (16,) and np.array_equal(last[:5], qw[2]) and not last[5:].any()
    same = nb._whole_vectors(qw, 2, np.zeros(5, np.uint32))  # as long as the row: the row itself
    assert same.shape == (5,) and np.array_equal(same, qw[2])


def _rows_caller(dot, nrows, nx, grouped=False):
    """dot(qs, xs, luts[, sgs, rel, first]) from arrays: q (nrows, nwu), xt (nx, per, nwu), lut
    (nrows, 16), sg (nrows, groups)."""
    rows = "".join(f"q[{i}], " for i in range(nrows))
    xs = "".join(f"xt[{b}], " for b in range(nx))
    luts = "".join(f"lut[{i}], " for i in range(nrows))
    sgs = "".join(f"sg[{i}], " for i in range(nrows))
    ns = {"dot": dot}
    if grouped:
        exec(f"def call(q, xt, lut, sg, rel, first):\n    return dot(({rows}), ({xs}), ({luts}), ({sgs}), rel, first)", ns)  # noqa: S102
    else:
        exec(f"def call(q, xt, lut):\n    return dot(({rows}), ({xs}), ({luts}))", ns)  # noqa: S102
    return njit(ns["call"])


_ROWS_KINDS = {False: [(4, 1), (4, 2), (4, 4), (1, 1)],  # (rows of W, rows of x) the kernels call rows_dot with
               True: [(4, 1), (4, 2), (1, 1)]}  # grouped
_ROWS = {(g, b, n, nx, w): _rows_caller(numba_simd.rows_dot(b, n, nx, w, grouped=g), n, nx, grouped=g)
         for g in (False, True) for w in (8, 16) for b in (2, 4) for n, nx in _ROWS_KINDS[g]}


@pytest.mark.parametrize("width", [8, 16])
@pytest.mark.parametrize("grouped", [False, True])
@given(st.sampled_from([2, 4]), st.integers(0, 3), st.integers(0, 70), st.integers(1, 20), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=60, deadline=None)
def test_rows_dot_is_each_rows_levels_times_x(width, grouped, bits, kind, nwu, gw, seed):
    """rows_dot(qs, xs, luts)[i * nx + b] = sum over slots and the full vectors' words of
    luts[i][code] * xs[b], each row of W its own table, and with ``grouped`` times sgs[i][j], j the
    word's group of ``gw`` words; 2-bit tables repeated over 16 entries, as the kernels build them
    (the lookup reads 4 bits). A mutation that shifts by the wrong slot, pairs the wrong rows,
    takes another row's scales or the vector's first group for every word, fails."""
    if not _HOST[width]:
        pytest.skip(f"no {width}-lane SIMD on this host")
    nrows, nx = _ROWS_KINDS[grouped][kind % len(_ROWS_KINDS[grouped])]
    per = 32 // bits
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** 32, (nrows, nwu), dtype=np.uint64).astype(np.uint32)
    xt = rng.normal(size=(nx, per, nwu)).astype(np.float32)
    levels = rng.normal(size=(nrows, 1 << bits)).astype(np.float32)
    lut = np.ascontiguousarray(levels[:, np.arange(16) % (1 << bits)])
    n = nwu - nwu % width
    codes = (q[:, None, :n] >> (bits * np.arange(per, dtype=np.uint32))[None, :, None]) & np.uint32((1 << bits) - 1)
    lev = np.stack([levels[i][codes[i]] for i in range(nrows)]).astype(np.float64)  # (nrows, per, n)
    dot = _ROWS[grouped, bits, nrows, nx, width]
    if grouped:
        rel, first = nb._word_groups(nwu, gw, width)
        sg = rng.uniform(0.5, 2, (nrows, -(-nwu // gw) + width)).astype(np.float32)
        got = dot(q, xt, lut, sg, rel, first)
        lev *= sg[:, None, np.arange(n) // gw]
    else:
        got = dot(q, xt, lut)
    got = np.array(got, np.float64).reshape(nrows, nx)
    want = np.einsum("ikw,bkw->ib", lev, xt[:, :, :n].astype(np.float64))
    bound = 1e-5 * np.einsum("ikw,bkw->ib", np.abs(lev), np.abs(xt[:, :, :n]).astype(np.float64)) + 1e-30
    assert np.all(np.abs(got - want) <= bound)


_SIGNED = {(b, n, w): _rows_caller(numba_simd.rows_dot(b, n, 1, w, signed=True), n, 1)
           for w in (8, 16) for b in (2, 4) for n in (4, 1)}


@pytest.mark.parametrize("width", [8, 16])
@given(st.sampled_from([2, 4]), st.sampled_from([4, 1]), st.integers(0, 70), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=40, deadline=None)
def test_signed_rows_dot_is_the_symmetric_lookup(width, bits, nrows, nwu, seed):
    """rows_dot(signed=True) makes each code's level code + qmin by sign extension: the sum of
    levels times x within the float32 bound, and, where the host runs the lookup at this width,
    the lookup's result with the symmetric table bit for bit. A wrong flip, shift or sign fails."""
    per = 32 // bits
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** 32, (nrows, nwu), dtype=np.uint64).astype(np.uint32)
    xt = rng.normal(size=(1, per, nwu)).astype(np.float32)
    levels = np.arange(1 << bits, dtype=np.float32) - (1 << (bits - 1))
    lut = np.ascontiguousarray(np.tile(levels[np.arange(16) % (1 << bits)], (nrows, 1)))
    n = nwu - nwu % width
    codes = (q[:, None, :n] >> (bits * np.arange(per, dtype=np.uint32))[None, :, None]) & np.uint32((1 << bits) - 1)
    lev = levels[codes].astype(np.float64)
    got = np.array(_SIGNED[bits, nrows, width](q, xt, lut), np.float64).reshape(nrows, 1)
    want = np.einsum("ikw,bkw->ib", lev, xt[:, :, :n].astype(np.float64))
    bound = 1e-5 * np.einsum("ikw,bkw->ib", np.abs(lev), np.abs(xt[:, :, :n]).astype(np.float64)) + 1e-30
    assert np.all(np.abs(got - want) <= bound)
    if _HOST[width]:
        looked = np.array(_ROWS[False, bits, nrows, 1, width](q, xt, lut), np.float64).reshape(nrows, 1)
        assert np.array_equal(got, looked)


@needs_simd
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("rows", [4, 11])
def test_batch_1_signed_levels_give_the_lookups_product(monkeypatch, bits, rows):
    """Batch 1 on the symmetric grid through the row-lookup kernel: levels by sign extension (the
    default at 8 lanes) and by lookup give the same product bit for bit, outliers and the rows
    after the last block of 4 included."""
    w = weights(rows, 700, seed=bits, dtype=np.float16)
    qt = eqcore.quantize(w, bits=bits, sigma=2.5, steps=3)
    assert qt.outlier_vals.size > 0
    x = np.random.default_rng(rows).normal(size=(1, 700)).astype(np.float32)
    seen, kernel, ys = [], nb._gemv_rows_kernel, {}
    monkeypatch.setattr(nb, "_gemv_rows_kernel", lambda *a: seen.append(a[11]) or kernel(*a))
    for signed in (False, True):
        monkeypatch.setattr(nb, "SIGNED_LEVELS", signed)
        ys[signed] = eqcore.matmul(x, qt)
    assert seen == [False, True]
    assert np.array_equal(ys[True], ys[False])
    close(ys[True], x, qt)


def test_rows_dot_takes_2_and_4_bits():
    with pytest.raises(ValueError, match="2 or 4 bits"):
        numba_simd.rows_dot(8, 4)


@needs_simd
@pytest.mark.parametrize("grid", ["symmetric", "asymmetric", "codebook"])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("col", [False, True])
def test_one_scale_per_row_takes_the_lookup_gemv(grid, bits, batch, col):
    """Per-row layouts of 2 and 4 bits at batches up to nb.ROWS_BATCH (here 8) go through the
    row-lookup kernel (blocks of 4 rows and the rows after them; rows of x 4, 2 and 1 at a time), with
    outliers (each outlier's level taken out once for all rows of x) and column scales, and give
    the dense product."""
    w = weights(11, 700, seed=bits, dtype=np.float16)
    qt = eqcore.quantize(w, bits=bits, grid=grid, col_scales=col, sigma=2.5, steps=3)
    assert qt.outlier_vals.size > 0
    x = np.random.default_rng(batch).normal(size=(batch, 700)).astype(np.float32)
    calls = []
    kernel = nb._gemv_rows_kernel
    try:
        nb.ROWS_BATCH, rows_batch = 8, nb.ROWS_BATCH
        nb._gemv_rows_kernel = lambda *a: calls.append(kernel(*a))
        y = eqcore.matmul(x, qt)
    finally:
        nb.ROWS_BATCH = rows_batch
        nb._gemv_rows_kernel = kernel
    assert len(calls) == 1
    close(y, x, qt)
