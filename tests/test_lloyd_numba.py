"""The Numba Lloyd solver (eqcore.solvers.lloyd_numba) against the NumPy reference
(eqcore.solvers.lloyd): scales and zero-points bit for bit, on every grid, bit width, group
layout (per row, groups that do not divide the columns, groups of one), with outlier masks,
column scales, zero rows and single-value groups."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqcore import solvers
from eqcore.config import QuantConfig
from eqcore.grids import codebook_for
from eqcore.solvers import lloyd, lloyd_numba

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GRIDS = [("symmetric", "fit"), ("asymmetric", "fit"), ("codebook", "fit"), ("codebook", "nf")]


def bits_of(a):
    return None if a is None else np.asarray(a, np.float32).view(np.uint32)


def assert_same(x, config, col=None, keep=None):
    y = x if col is None else x / col
    cb = codebook_for(y, config)
    ref = lloyd.solve(x, config, codebook=cb, col=col, keep=keep)
    got = lloyd_numba.solve(x, config, codebook=cb, col=col, keep=keep)
    np.testing.assert_array_equal(bits_of(got[0]), bits_of(ref[0]))
    if ref[1] is None:
        assert got[1] is None
    else:
        np.testing.assert_array_equal(bits_of(got[1]), bits_of(ref[1]))


@st.composite
def cases(draw):
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 40))
    grid, codebook = draw(st.sampled_from(GRIDS))
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    group_size = draw(st.sampled_from([None, 1, 3, 8, 16, 128]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "t", "few", "positive"]))
    if kind == "normal":
        x = rng.standard_normal((rows, cols))
    elif kind == "t":
        x = rng.standard_t(2, (rows, cols))
    elif kind == "few":  # repeated values: single-value groups, ties on midpoints
        x = rng.choice(np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 3.0]), (rows, cols))
    else:
        x = rng.uniform(0.1, 1.0, (rows, cols))
    x = (x * 10.0 ** draw(st.integers(-3, 2))).astype(np.float32)
    if draw(st.booleans()):
        x[rng.integers(rows)] = 0.0  # a zero row
    keep = None
    if draw(st.booleans()):
        keep = rng.random((rows, cols)) > draw(st.sampled_from([0.1, 0.5, 0.95]))
        x[~keep] = 0.0  # outliers are zeroed before the solver sees them
    col = rng.uniform(0.25, 4.0, cols).astype(np.float32) if draw(st.booleans()) else None
    config = QuantConfig(bits=bits, grid=grid, codebook=codebook, group_size=group_size, solver="lloyd")
    return x, config, col, keep


@SETTINGS
@given(cases())
def test_bit_identical_to_reference(case):
    assert_same(*case)


@pytest.mark.parametrize("grid,codebook", GRIDS)
@pytest.mark.parametrize("cols,group_size", [(1100, None), (300, 100), (259, 128), (1000, 1)])
def test_long_rows_and_odd_groups(grid, codebook, cols, group_size):
    """Rows and groups longer than NumPy's 128-element pairwise block (the sums' halving), and
    a last group that is mostly padding; 4 bits, with a mask and column scales."""
    rng = np.random.default_rng(cols)
    x = (rng.standard_t(4, (3, cols)) * 0.02).astype(np.float32)
    keep = rng.random(x.shape) > 0.02
    x[~keep] = 0.0
    col = rng.uniform(0.5, 2.0, cols).astype(np.float32)
    for c, k in [(None, None), (col, keep)]:
        assert_same(x, QuantConfig(bits=4, grid=grid, codebook=codebook, group_size=group_size, solver="lloyd"), c, k)


@pytest.mark.parametrize("n", list(range(1, 40)) + [127, 128, 129, 136, 255, 256, 257, 1000, 4096, 4100, 11008])
def test_sum_is_numpys(n):
    """np_sum reproduces NumPy's row sums of a C-contiguous float64 array bit for bit."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal((3, n)) * np.exp(rng.uniform(-20, 20, (3, n)))
    expect = a.sum(axis=1)
    got = np.array([lloyd_numba.np_sum(np.ascontiguousarray(r), n) for r in a])
    np.testing.assert_array_equal(got.view(np.uint64), expect.view(np.uint64))


def test_smax_caps_scales():
    x = np.array([[1e30, -2e30, 3e30, 0.5]], np.float32)
    for grid in ("symmetric", "asymmetric", "codebook"):
        config = QuantConfig(bits=4, grid=grid, solver="lloyd")
        cb = codebook_for(x, config)
        ref = lloyd.solve(x, config, smax=1e20, codebook=cb)
        got = lloyd_numba.solve(x, config, smax=1e20, codebook=cb)
        assert got[0].max() <= np.float32(1e20)
        np.testing.assert_array_equal(bits_of(got[0]), bits_of(ref[0]))


def test_registered_for_numba():
    assert solvers.get("lloyd", "numba") is lloyd_numba.solve


@pytest.mark.parametrize("grid,codebook", GRIDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ties_few_values(grid, codebook, bits):
    """Groups of one to four values, many of which several candidates fit exactly (loss ties: the
    first one scored is kept), and single-value groups of either sign."""
    rng = np.random.default_rng(bits)
    for cols in (1, 2, 3, 4):
        x = rng.standard_normal((400, cols)).astype(np.float32)
        x[:50] = x[:50, :1]  # one value repeated
        x[50:60] = 0.0
        assert_same(x, QuantConfig(bits=bits, grid=grid, codebook=codebook, group_size=None, solver="lloyd"))


def test_vector_leaves_are_numpys():
    """The four-chain vector leaf sum (an LLVM intrinsic) equals NumPy's pairwise leaf bit for bit."""
    rng = np.random.default_rng(7)
    for m in range(1, 129):
        b = [rng.standard_normal(128) * np.exp(rng.uniform(-30, 30, 128)) for _ in range(4)]
        got = np.array(lloyd_numba._leaf4(*b, m))
        expect = np.array([r[:m].sum() for r in b])  # NumPy's 0.0 + pairwise sum
        np.testing.assert_array_equal((0.0 + got).view(np.uint64), expect.view(np.uint64))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(GRIDS), st.sampled_from([2, 4, 8]), st.integers(0, 2**32 - 1))
def test_a_taken_out_entry_counts_for_nothing(grid_codebook, bits, seed):
    """The scales do not depend on a taken-out entry's column scale, even one whose grid value
    overflows float32 there (the loss once had 0 * inf = NaN for its group, which then kept its
    first scale)."""
    grid, codebook = grid_codebook
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, (2, 16)) * 10.0).astype(np.float32)
    keep = np.ones(x.shape, bool)
    keep[:, 5] = False
    x[~keep] = 0.0
    col = rng.uniform(0.5, 2.0, 16).astype(np.float32)
    huge = col.copy()
    huge[5] = np.float32(3e38)
    config = QuantConfig(bits=bits, grid=grid, codebook=codebook, solver="lloyd")
    cb = codebook_for(x / col, config)
    for solve in (lloyd.solve, lloyd_numba.solve):
        with np.errstate(over="ignore"):  # the overflow itself is the case under test
            a = solve(x, config, codebook=cb, col=col, keep=keep)
            b = solve(x, config, codebook=cb, col=huge, keep=keep)
        np.testing.assert_array_equal(bits_of(a[0]), bits_of(b[0]))
        if a[1] is not None:
            np.testing.assert_array_equal(bits_of(a[1]), bits_of(b[1]))
