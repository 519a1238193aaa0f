"""Quantized matmul: y = x W^T from the packed form equals the dense product (NumPy reference)
up to float32 summation order, for every grid, width, group layout and batch size."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eqcore
from eqcore.backends import numba_matmul as nb
from eqcore.backends import numpy as ref

from helpers import assert_matmul_close as close
from helpers import weights


@given(st.sampled_from(["symmetric", "asymmetric", "codebook"]), st.sampled_from([2, 3, 4, 8]),
       st.sampled_from([None, 16, 40, 64]), st.booleans(), st.sampled_from(["float32", "float16", "bfloat16"]),
       st.one_of(st.sampled_from([1, 4, 5]), st.integers(1, 70)), st.integers(1, 23), st.integers(1, 70),
       st.sampled_from([None, 2.0]), st.integers(0, 10))
@settings(max_examples=80, deadline=None)
def test_fused_matmul_matches_the_dense_product(grid, bits, group, col, scale_dtype, batch, rows, cols, sigma, seed):
    w = weights(rows, cols, seed=seed, dtype=np.float16)
    qt = eqcore.quantize(w, bits=bits, group_size=group, grid=grid, col_scales=col, scale_dtype=scale_dtype,
                         sigma=sigma, steps=3)
    x = np.random.default_rng(seed).normal(size=(batch, cols)).astype(np.float32)
    y = eqcore.matmul(x, qt)
    assert y.dtype == np.float32 and y.shape == (batch, rows)
    close(y, x, qt)
    close(ref.matmul(x, qt), x, qt)


def test_outliers_are_part_of_the_product():
    w = weights(8, 64, seed=1)
    w[3, 5] = 40.0  # far outside the grid: only its exact value gives the right product
    qt = eqcore.quantize(w, bits=3)
    assert qt.outlier_vals.size > 0
    x = np.zeros((1, 64), np.float32)
    x[0, 5] = 1.0
    y = eqcore.matmul(x, qt)
    assert y[0, 3] == pytest.approx(40.0, rel=1e-6)
    close(y, x, qt)


def test_leading_dimensions_and_dtypes():
    qt = eqcore.quantize(weights(10, 32, dtype=np.float16), bits=4)
    x = np.random.default_rng(0).normal(size=(2, 3, 32)).astype(np.float16)
    y = eqcore.matmul(x, qt)
    assert y.shape == (2, 3, 10) and y.dtype == np.float32
    close(y, x.astype(np.float32), qt)


@pytest.mark.parametrize("x, match", [(np.zeros((2, 31), np.float32), "32 input features"),
                                      (np.zeros((2, 32), np.int32), "float"),
                                      (np.float32(1.0), "input features")])
def test_bad_inputs_are_refused(x, match):
    qt = eqcore.quantize(weights(10, 32), bits=4)
    with pytest.raises(ValueError, match=match):
        eqcore.matmul(x, qt)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        eqcore.matmul(np.zeros((1, 32), np.float32), "not a tensor")


@pytest.mark.parametrize("group", [None, 32])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 8, 9, 70])
def test_blocks_of_rows_and_of_x(rows, batch, group):
    """Rows of W in blocks of nb.RB and rows of x in fours (every remainder of either), and the slot
    dots of batches up to nb.GEMV_BATCH, outliers included."""
    qt = eqcore.quantize(weights(rows, 96, seed=rows), bits=4, group_size=group, grid="asymmetric", sigma=1.5)
    assert qt.outlier_vals.size > 0
    x = np.random.default_rng(batch).normal(size=(batch, 96)).astype(np.float32)
    close(eqcore.matmul(x, qt), x, qt)


def test_row_block_is_those_rows():
    qt = eqcore.quantize(weights(20, 40, seed=5), bits=3, group_size=16, grid="asymmetric", sigma=1.5)
    full = eqcore.dequantize(qt)
    for a, b in ((0, 20), (3, 11), (19, 20)):
        np.testing.assert_array_equal(eqcore.dequantize(qt.row_block(a, b)), full[a:b])


@given(st.sampled_from([2, 4, 8]), st.sampled_from(["symmetric", "asymmetric"]), st.booleans(),
       st.sampled_from(["float16", "float32", "bfloat16"]), st.integers(1, 2), st.integers(4, 23), st.integers(1, 70),
       st.integers(-40, 33), st.integers(0, 10), st.booleans())
@settings(max_examples=60, deadline=None)
def test_masked_slot_dots_match_the_dense_product(bits, grid, col, dtype, batch, rows, cols, exp, seed, simd):
    """Batch 1-2, one scale per row: the row-lookup GEMV (2 and 4 bits on an AVX2 or AVX-512 host),
    the masked slot dots of 4 rows (codes unpacked in place; 8 bits, or no SIMD) and the shifting
    slot dot they fall back to (partial sums that could overflow, or forced here) all meet the
    contract, for |x| from 1e-40 (subnormal) to 1e33 (past the guard), outliers stored as float16,
    float32 and bfloat16, with and without column scales."""
    from unittest import mock

    from eqcore.dtypes import bfloat16

    w = weights(rows, cols, seed=seed).astype(bfloat16 if dtype == "bfloat16" else dtype)
    qt = eqcore.quantize(w, bits=bits, grid=grid, col_scales=col, sigma=1.5, steps=3)
    x = (np.random.default_rng(seed).normal(size=(batch, cols)) * 10.0 ** exp).astype(np.float32)
    with mock.patch.object(nb, "WIDTH", nb.WIDTH if simd else 0):
        close(eqcore.matmul(x, qt), x, qt)
        with mock.patch.object(nb, "_masked_ok", lambda xt, level, bits: False):
            close(eqcore.matmul(x, qt), x, qt)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_masked_slot_dot_at_the_guard(bits):
    """Every code at its largest and sum |x| just under the guard's bound: the masked slot dots'
    partial sums (levels placed up to bit 32 - bits) stay finite and equal the shifting slot dot's."""
    per = 32 // bits
    nwu = 37
    q = np.full((4, nwu), 0xFFFFFFFF, np.uint32)
    q[1, ::3] = 0x12345678
    q[2] = np.random.default_rng(bits).integers(0, 2 ** 32, nwu, dtype=np.uint32)
    xt = np.random.default_rng(0).uniform(0.5, 1.0, (per, nwu)).astype(np.float32)
    level, off = float(1 << (bits - 1)), np.float32(-(1 << (bits - 1)))
    xt *= np.float32(nb.MASKED_LIMIT / (level * 2.0 ** (32 - 2 * bits)) * 0.99 / np.abs(xt).astype(np.float64).sum())
    assert nb._masked_ok(xt[None], level, bits)
    assert not nb._masked_ok(2 * xt[None], level, bits)
    masked = {2: nb._slot_masked2, 4: nb._slot_masked4, 8: nb._slot_masked8}[bits]
    dot = {2: nb._slot_dot2, 4: nb._slot_dot4, 8: nb._slot_dot8}[bits]
    got = np.array(masked(q[0], q[1], q[2], q[3], off, off, off, off, xt), np.float64)
    want = np.array([dot(q[i], xt, off) for i in range(4)], np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_masked_guard_refuses_inf_and_nan():
    xt = np.ones((1, 8, 4), np.float32)
    assert nb._masked_ok(xt, 8.0, 4)
    for bad in (np.inf, -np.inf, np.nan):
        xt[0, 3, 1] = bad
        assert not nb._masked_ok(xt, 8.0, 4)


@pytest.mark.parametrize("rows", [2, 8])  # the shifting slot dot, and the masked one (blocks of 4 rows)
@pytest.mark.parametrize("grid", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 2])
def test_rows_of_near_zero_levels_do_not_cancel(rows, grid, bits, batch):
    """Rows whose levels are almost all 0 (one nonzero weight): each level enters the dot whole.
    Summing codes times x and adding offset * sum(x) once per row cancelled two large terms, with
    errors far past the contract (found by hypothesis: 2 bits, 2 rows, 9 columns)."""
    cols = 4096
    w = np.zeros((rows, cols), np.float32)
    w[:, 7] = 0.02
    w[:, 100] = -0.01
    qt = eqcore.quantize(w, bits=bits, grid=grid, sigma=None)
    x = np.random.default_rng(bits).normal(size=(batch, cols)).astype(np.float32) * 100
    close(eqcore.matmul(x, qt), x, qt)


def test_what_matmul_keeps_with_a_tensor_is_renewed_by_validate():
    """matmul keeps what it derives from a tensor alone (row scales, level tables) with it
    (QuantizedTensor.derived); validate() drops it, so a tensor changed in place and validated
    again, as check=True does on every call, gives the new product; pickling leaves it out."""
    import pickle

    w = weights(9, 200, seed=7, dtype=np.float16)
    qt = eqcore.quantize(w, bits=4, sigma=2.0, steps=3)
    x = np.random.default_rng(0).normal(size=(1, 200)).astype(np.float32)
    close(eqcore.matmul(x, qt, check=False), x, qt)
    assert "_derived" in qt.__dict__ and "_derived" not in pickle.loads(pickle.dumps(qt)).__dict__
    calls = []
    assert qt.derived("k", lambda t: calls.append(1) or 5) == 5 == qt.derived("k", lambda t: calls.append(1) or 6)
    assert calls == [1]
    qt.scales[:] = (qt.scales.astype(np.float32) * 2).astype(qt.scales.dtype)  # in place
    y = eqcore.matmul(x, qt)  # check=True validates: the doubled scales are used
    close(y, x, qt)
    assert "k" not in qt.__dict__["_derived"]


@pytest.mark.parametrize("batch, dtype", [(1, np.float16), (2, np.float32), (5, np.float16)])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("grid", ["symmetric", "asymmetric", "codebook"])
def test_outliers_over_codes_that_are_not_zero(grid, group, batch, dtype):
    """The GEMV kernels add each outlier as its exact value less the level the dense dot gave its
    place. eqcore's quantize puts outliers on the symmetric grid's zero level, where that is the
    stored value itself (nothing kept); any other code under an outlier (the other grids, or a
    tensor built elsewhere) needs the difference, kept as float32."""
    w = weights(12, 256, seed=3, dtype=dtype)
    qt = eqcore.quantize(w, bits=4, group_size=group, grid=grid, sigma=2.0, steps=3)
    assert qt.outlier_vals.size > 0
    x = np.random.default_rng(batch).normal(size=(batch, 256)).astype(np.float32)
    close(eqcore.matmul(x, qt), x, qt)
    d = nb._static(qt).dvals
    assert np.shares_memory(d, qt.outlier_vals) == (grid == "symmetric")  # the zero level: the stored values serve
    assert (qt.derived_nbytes() >= 4 * qt.outlier_vals.size) == (grid != "symmetric")  # what matmul keeps, counted
    rng = np.random.default_rng(0)  # every code redrawn: outliers now sit over levels that are not 0
    codes = rng.integers(0, 16, size=qt.shape).astype(np.uint8)
    other = qt.map_arrays(np.copy)
    other.qweight[:] = ref.pack(codes, 4)
    other.validate()
    close(eqcore.matmul(x, other), x, other)
