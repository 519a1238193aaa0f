"""layout.scale_bounds: validation's view of the scales without decoding them equals the decoded
scales' own (every one finite and positive; the largest)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from eqcore.dtypes import bfloat16
from eqcore.layout import float_scales, scale_bounds

SPECIAL = [0.0, -0.0, -1.0, np.inf, -np.inf, np.nan, 6e-8, 1e-45, 65504.0, 3e38]


def _values(rng, n, special):
    v = np.exp(rng.normal(0, 4, n))
    at = rng.random(n) < special
    v[at] = rng.choice(SPECIAL, at.sum())
    return v


def _expected(scales, row_scales=None):
    s = float_scales(scales, row_scales)
    ok = bool(np.all(np.isfinite(s) & (s > 0)))
    return ok, (float(s.max()) if ok else None)


@given(st.sampled_from([np.float32, np.float16, bfloat16]), st.integers(1, 6), st.integers(1, 9),
       st.sampled_from([0.0, 0.05, 0.5]), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=150, deadline=None)
def test_float_scales_bounds(dtype, rows, groups, special, seed):
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        scales = _values(rng, rows * groups, special).astype(dtype).reshape(rows, groups)
    ok, top = scale_bounds(scales)
    want_ok, want_top = _expected(scales)
    assert ok == want_ok and (not ok or top == want_top)


@given(st.integers(1, 6), st.integers(1, 9), st.sampled_from([0.0, 0.1, 0.5]), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=150, deadline=None)
def test_log8_scales_bounds(rows, groups, special, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, groups)).astype(np.uint8)
    with np.errstate(over="ignore"):
        row = _values(rng, rows, special).astype(np.float16)
    ok, top = scale_bounds(codes, row)
    want_ok, want_top = _expected(codes, row)
    assert ok == want_ok and (not ok or top == want_top)


@given(st.sampled_from([np.float32, np.float16, bfloat16, "log8"]), st.integers(1, 6), st.integers(1, 9),
       st.sampled_from([0.0, 0.05, 0.5]), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=100, deadline=None)
def test_numba_decodes_scales_bit_for_bit(dtype, rows, groups, special, seed):
    """The Numba backend's parallel scale decoding (float16, bfloat16, log8 under float16 row
    scales) gives layout.float_scales' float32 bits exactly, specials and subnormals included."""
    from types import SimpleNamespace

    from unittest import mock

    from eqcore.backends import numba_scales

    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        if dtype == "log8":
            scales = rng.integers(0, 256, (rows, groups)).astype(np.uint8)
            row = _values(rng, rows, special).astype(np.float16)
        else:
            scales, row = _values(rng, rows * groups, special).astype(dtype).reshape(rows, groups), None
    with mock.patch.object(numba_scales, "SMALL", 0):  # the parallel kernel, not NumPy, at these sizes
        got = numba_scales.float_scales(SimpleNamespace(scales=scales, row_scales=row))
    want = float_scales(scales, row)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
