"""The fused per-row outlier split of the Numba backend (statistics, float32 cast, zeroing, CSR and
the NaN / Inf check in one pass) and the row-blocked default quantize that uses it, against the
NumPy reference, bit for bit."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eqcore
from eqcore import api
from eqcore.backends import numba as cpu
from eqcore.dtypes import NONFINITE, WEIGHT_DTYPES

from helpers import assert_reference_split, rows_of, weights

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
SPLIT = ("float16", "bfloat16", "float32")


@SETTINGS
@given(rows=st.integers(1, 12), cols=st.integers(1, 700), src=st.sampled_from(SPLIT),
       kind=st.sampled_from(["t", "ties", "levels", "offset", "wide", "edge"]),
       sigma=st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 4.5]), seed=st.integers(0, 2**32 - 1))
def test_split_equals_the_reference(rows, cols, src, kind, sigma, seed):
    dt = WEIGHT_DTYPES[src]
    with np.errstate(over="ignore"):
        w = rows_of(kind, rows, cols, np.random.default_rng(seed)).astype(dt)
    if not np.isfinite(w.astype(np.float32)).all():  # float16 / bfloat16 overflow of the "edge" rows
        w[~np.isfinite(w.astype(np.float32))] = 1
    if rows > 1:
        w[-1] = w[-1, 0]  # a constant row: std 0, no outliers
    assert_reference_split(w, sigma)


@pytest.mark.parametrize("src", SPLIT)
def test_rows_with_no_outliers_all_outliers_and_more_than_the_slots(src):
    """All-outlier rows (every entry at the threshold), rows with more outliers than the slots the
    first pass keeps (found again row by row), zero and constant rows (none)."""
    dt = WEIGHT_DTYPES[src]
    cols = 333
    w = np.zeros((6, cols))
    w[0] = np.where(np.arange(cols) % 2, -1.0, 1.0)  # mean 0 (or 1/333), std 1: all outliers at sigma <= 1
    w[1] = np.where(np.arange(cols) % 3, 0.5, -0.25)
    w[2] = 0.0  # all zero
    w[3] = 7.0  # constant
    w[4] = weights(1, cols, 3)[0]
    w[5, ::2] = 1.0  # half the row apart from the other half
    w = w.astype(dt)
    o = assert_reference_split(w, 0.5)
    counts = np.diff(o.rowptr)
    assert counts[0] == cols and counts[0] > cpu.split_slots(cols) and counts[2] == counts[3] == 0
    assert_reference_split(w, 1.0)
    assert_reference_split(w, 3.0)
    assert_reference_split(w, 1e-300)  # the threshold underflows to 0: every entry of a varying row


@pytest.mark.parametrize("src", SPLIT)
def test_split_into_a_reused_buffer(src):
    """``out=`` (the row blocks' shared workspace, dirty from an earlier block) changes nothing."""
    w = weights(9, 101, 5, dtype=WEIGHT_DTYPES[src])
    buf = np.full((9, 101), np.nan, np.float32)
    x, _ = cpu.split_outliers(w, 3.0, out=buf)
    assert x is buf
    assert_reference_split(w, 3.0, out=np.full((9, 101), -1.0, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        cpu.split_outliers(w, 3.0, out=np.empty((9, 100), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        cpu.split_outliers(w, 3.0, out=np.empty((101, 9), np.float32).T)


@pytest.mark.parametrize("src", SPLIT)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_split_refuses_nan_and_inf(src, bad):
    for at in ((0, 0), (3, 17), (6, 40)):
        w = weights(7, 41, 1, dtype=WEIGHT_DTYPES[src])
        w[at] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            cpu.split_outliers(w, 3.0)


@pytest.mark.parametrize("src", sorted(WEIGHT_DTYPES))
@pytest.mark.parametrize("blocks", [False, True])
def test_quantize_refuses_nan_and_inf_on_every_path(monkeypatch, src, blocks):
    """The fused path finds NaN / Inf itself (no separate check): the same refusal as the reference
    path, whichever row block holds it."""
    if blocks:
        monkeypatch.setattr(api, "ROW_BLOCK_ELEMENTS", 50 * 4)  # blocks of 4 rows
    for bad in (np.nan, np.inf):
        w = weights(13, 50, 2, dtype=WEIGHT_DTYPES[src])
        w[11, 49] = bad
        for backend in ("numba", "numpy"):
            with pytest.raises(ValueError, match="NaN or Inf") as e:
                eqcore.quantize(w, backend=backend)
            assert str(e.value) == NONFINITE


@pytest.mark.parametrize("src", SPLIT)
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (37, 96), (61, 333), (130, 1)])
def test_blocked_default_quantize_equals_the_reference(monkeypatch, src, shape):
    """The row-blocked fused path (shared workspace, codes encoded into the result, one tensor built
    at the end) stores exactly what one unblocked pass and the reference do, odd shapes and block
    sizes included. (With one column the Numba and NumPy exact solvers may pick different scales
    of equal loss, as before this path: there only the outliers are compared with the reference.)"""
    w = weights(*shape, 7, dtype=WEIGHT_DTYPES[src])

    def same(a, b, fields=None):
        for f, arr in b.arrays().items():
            if fields is None or f in fields:
                np.testing.assert_array_equal(np.asarray(getattr(a, f)).view(np.uint8), np.asarray(arr).view(np.uint8))

    csr = ("outlier_rowptr", "outlier_cols", "outlier_vals")
    for opts in ({}, {"group_size": 32, "bits": 3}, {"scale_dtype": "float32", "bits": 2}):
        ref = eqcore.quantize(w, backend="numpy", **opts)
        monkeypatch.setattr(api, "ROW_BLOCK_ELEMENTS", 1 << 30)
        whole = eqcore.quantize(w, backend="numba", **opts)
        same(whole, ref, None if shape[1] > 1 else csr)
        for block_rows in (1, 4, 7):
            monkeypatch.setattr(api, "ROW_BLOCK_ELEMENTS", shape[1] * block_rows)
            blocked = eqcore.quantize(w, backend="numba", **opts)
            same(blocked, whole)
            same(blocked, ref, None if shape[1] > 1 else csr)


def test_encode_into_a_slice_of_the_result():
    x = weights(10, 70, 4)
    s = (np.abs(x).max(axis=1, keepdims=True) / 7).astype(np.float32)
    res = np.zeros((12, 9), np.uint32)
    got = cpu.encode(x, s, 3, None, out=res[1:11])
    assert got.base is res or got is res[1:11] or np.shares_memory(got, res)
    np.testing.assert_array_equal(res[1:11], cpu.encode(x, s, 3, None))
    assert not res[0].any() and not res[11].any()
    with pytest.raises(ValueError, match="out must be"):
        cpu.encode(x, s, 3, None, out=np.empty((10, 8), np.uint32))


@SETTINGS
@given(m=st.floats(-1e6, 1e6), t=st.floats(0, 1e6), scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e30]))
def test_split_bounds_are_the_float64_rule(m, t, scale):
    """v <= lo or v >= hi exactly where |float64(v) - m| >= t, at the bounds and their neighbours."""
    m, t = m * scale, t * scale
    lo, hi = cpu._split_bounds(m, t)
    if lo != lo:
        return  # no bounds: the kernel uses the float64 test
    rule = lambda v: abs(np.float64(v) - m) >= t  # noqa: E731
    for b in (lo, hi):
        for v in (b, np.nextafter(b, np.float32(np.inf)), np.nextafter(b, np.float32(-np.inf))):
            v = np.float32(v)
            if np.isfinite(v):
                assert rule(v) == bool(v <= lo or v >= hi), (m, t, lo, hi, v)


def test_float64_test_path_equals_the_bounds_path():
    """Without float32 bounds (lo NaN) the zeroing pass tests |float64(x) - m| >= t itself."""
    w = weights(1, 257, 9)[0]
    m = float(np.cumsum(w.astype(np.float64))[-1] / w.size)
    t = 2.0 * float(np.sqrt(np.cumsum((w.astype(np.float64) - m) ** 2)[-1] / w.size))
    lo, hi = cpu._split_bounds(m, t)
    got = []
    for bounds in ((lo, hi), (np.float32(np.nan), np.float32(np.nan))):
        x = w.copy()
        flags = np.empty(w.size + 8, np.bool_)
        slots = cpu.split_slots(w.size) + cpu.SPLIT_SLACK
        scol, sval = np.empty(slots, np.uint16), np.empty(slots, np.float32)
        n = cpu._split_zero(x, w, m, t, *bounds, flags, scol, sval)
        got.append((x, scol[:n].copy(), sval[:n].copy()))
    mask = np.abs(w.astype(np.float64) - m) >= t
    assert mask.any()
    for x, c, v in got:
        np.testing.assert_array_equal(x, np.where(mask, 0, w))
        np.testing.assert_array_equal(c, np.nonzero(mask)[0])
        np.testing.assert_array_equal(v, w[mask])


@pytest.mark.parametrize("src", SPLIT)
def test_exact_ties_take_the_rows_own_sums(src):
    """Where a value sits exactly on the threshold (balanced +-1 at sigma 1: mean 0, t = 1), the
    any-order sum of squares cannot decide it and the row's own in-order loop does; a float32 row
    of tiny and huge values takes the in-order plain sum."""
    x = np.tile(np.float32([1, -1]), 150)
    s, a, s2 = (float(v.astype(np.float64).sum()) for v in (x, np.abs(x), x.astype(np.float64) ** 2))
    m, t, lo, hi = cpu._split_stats(x, s, a, s2, 0, 1.0)
    assert m == 0 and t == 1 and (lo, hi) == (-1, 1)  # t known: the in-order path
    w = np.stack([x, -x, np.roll(x, 1) * 0.5]).astype(WEIGHT_DTYPES[src])
    o = assert_reference_split(w, 1.0)
    assert o.nnz == w.size
    wide = np.float32([1e-30, 3e20, -2e20, 5e-25, 7.0] * 20)
    assert not np.abs(wide).astype(np.float64).sum() < 2.0 ** 52 * 2.0 ** (int(cpu._min_exponent(wide)) - 150)
    assert_reference_split(np.stack([wide, wide[::-1]]), 0.5)


def test_typical_rows_are_decided_without_the_rows_own_loops():
    """LLM-like rows take the fast path (t NaN: the bounds were decided from the any-order sums);
    a row whose mean dwarfs its spread falls back, and still equals the reference."""
    for src in SPLIT:
        x = weights(1, 4096, 11, dtype=WEIGHT_DTYPES[src])[0].astype(np.float32)
        sums = (float(v.astype(np.float64).sum()) for v in (x, np.abs(x), x.astype(np.float64) ** 2))
        assert np.isnan(cpu._split_stats(x, *sums, cpu.SPLIT_KINDS[np.dtype(WEIGHT_DTYPES[src])], 3.0)[1])
    w = (1000.0 + weights(3, 500, 2)).astype(np.float32)
    assert_reference_split(w, 2.0)


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 40), cols=st.integers(1, 150), bits=st.sampled_from([2, 3, 4, 8]),
       grid=st.sampled_from([("asymmetric", "fit"), ("codebook", "fit"), ("codebook", "nf")]),
       group=st.sampled_from([None, 16, 33]), dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
       seed=st.integers(0, 2**32 - 1))
def test_other_grids_take_the_fused_split_and_match_the_reference(rows, cols, bits, grid, group, dtype, seed):
    """The per-row sigma rule goes through the fused split on every grid (the mask of kept
    entries rebuilt from its CSR), with the reference's result to the bit."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (rows, cols)) * 0.02).astype(WEIGHT_DTYPES[dtype])
    calls = []
    split = cpu.split_outliers

    def counted(*a, **k):
        calls.append(1)
        return split(*a, **k)

    cpu.split_outliers = counted
    try:
        kw = dict(bits=bits, grid=grid[0], codebook=grid[1], group_size=group)
        got = eqcore.quantize(w, backend="numba", **kw)
    finally:
        cpu.split_outliers = split
    assert calls, "the fused split was not used"
    want = eqcore.quantize(w, backend="numpy", **kw)
    for f, a in want.arrays().items():
        np.testing.assert_array_equal(np.asarray(got.arrays()[f]).view(np.uint8), a.view(np.uint8), err_msg=f)
