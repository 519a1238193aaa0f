"""The default quantize in one pass on the CPU (eqcore.backends.numba_quantize): the split, the
exact scales, their rounding to the stored dtype and the packed codes of each row in one kernel,
bit for bit the three-step pipeline (split_outliers, optimize_scales, round_scales, encode)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

import eqcore
from eqcore import api
from eqcore.backends import numba as cpu
from eqcore.backends import numba_quantize as one
from eqcore.config import QuantConfig
from eqcore.dtypes import WEIGHT_DTYPES
from eqcore.layout import max_scale, round_scales
from eqcore.solvers import exact_numba

from helpers import rows_of


def three_steps(w, config):
    """The pipeline the one pass replaces, on the Numba backend."""
    x, outliers = cpu.split_outliers(w, config.sigma)
    smax = max_scale(w.dtype, config.qmax, config.scale_dtype)
    scales = round_scales(exact_numba.optimize_scales(x, config, smax), config.scale_dtype)
    return cpu.encode(x, scales.astype(np.float32), config.bits, config.group_size), scales, outliers


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 20), cols=st.integers(1, 300), src=st.sampled_from(["float16", "bfloat16", "float32"]),
       kind=st.sampled_from(["t", "ties", "levels", "offset", "wide", "edge"]), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([None, 16, 33, 128]), scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
       sigma=st.sampled_from([1.0, 3.0]), seed=st.integers(0, 2**32 - 1))
def test_one_pass_equals_the_three_steps(rows, cols, src, kind, bits, group, scale_dtype, sigma, seed):
    with np.errstate(over="ignore"):
        w = rows_of(kind, rows, cols, np.random.default_rng(seed)).astype(WEIGHT_DTYPES[src])
    w[~np.isfinite(w.astype(np.float32))] = 1
    config = QuantConfig(bits=bits, group_size=group, scale_dtype=scale_dtype, sigma=sigma)
    smax = max_scale(w.dtype, config.qmax, scale_dtype)
    qweight, scales, outliers = one.quantize_rows(w, sigma, bits, group, smax, scale_dtype)
    want_q, want_s, want_o = three_steps(w, config)
    np.testing.assert_array_equal(scales.view(np.uint32), want_s.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(qweight, want_q)
    for got, want in zip(outliers, want_o):
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_codes_follow_the_rounded_scales(bits, scale_dtype):
    """Wide rows, where coding with the solver's own scale instead of the stored one changes codes
    (tens to thousands of them at 16 x 4096): the codes are those of the rounded scales."""
    w = (np.random.default_rng(bits).standard_t(3, (16, 4096)) * 0.02).astype(np.float16)
    config = QuantConfig(bits=bits, scale_dtype=scale_dtype)
    qweight, scales, _ = one.quantize_rows(w, config.sigma, bits, None,
                                           max_scale(w.dtype, config.qmax, scale_dtype), scale_dtype)
    want_q, want_s, _ = three_steps(w, config)
    np.testing.assert_array_equal(scales, want_s.astype(np.float32))
    np.testing.assert_array_equal(qweight, want_q)


def test_quantize_takes_the_one_pass_where_it_applies(monkeypatch):
    """Default settings (any weight dtype the split takes, any float scale dtype) go through it, in
    row blocks too; log8 scales, Adam and the other grids do not."""
    calls = []
    real = one.quantize_rows
    monkeypatch.setattr(one, "quantize_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = (np.random.default_rng(0).standard_t(4, (40, 96)) * 0.02).astype(np.float16)
    for options, taken in (({}, True), ({"scale_dtype": "bfloat16"}, True), ({"scale_dtype": "float32"}, True),
                           ({"scale_dtype": "log8"}, False), ({"solver": "adam"}, False),
                           ({"grid": "asymmetric"}, False), ({"outlier_stats": "tensor"}, False)):
        calls.clear()
        qt = eqcore.quantize(w, **options)
        assert bool(calls) == taken, options
        ref = eqcore.quantize(w, backend="numpy", **options)
        for f, a in ref.arrays().items():
            np.testing.assert_array_equal(np.asarray(qt.arrays()[f]).view(np.uint8), a.view(np.uint8), err_msg=f)
    monkeypatch.setattr(api, "ROW_BLOCK_ELEMENTS", 96 * 7)  # blocks of 7 rows, the last one short
    calls.clear()
    blocked = eqcore.quantize(w)
    assert len(calls) == 6
    for f, a in eqcore.quantize(w, backend="numpy").arrays().items():
        np.testing.assert_array_equal(np.asarray(blocked.arrays()[f]).view(np.uint8), a.view(np.uint8), err_msg=f)


@njit
def _round_all(values, kind, out):
    for i in range(values.shape[0]):
        out[i] = one.round_scale(values[i], kind)


def boundaries(bits16, shift):
    """Every positive finite 16-bit float ``bits16`` (shifted into float32 bits), the float32 values
    halfway to the next one and one float32 step either side of that: the rounding's edges."""
    b = bits16.astype(np.uint32)
    mid = ((b << shift) + (np.uint32(1) << (shift - 1)) if shift else b)
    return np.concatenate([(b << shift), mid - 1, mid, mid + 1]).view(np.float32)


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_round_scale_is_round_scales(scale_dtype):
    """The kernel's rounding of a scale equals :func:`eqcore.layout.round_scales` on every rounding
    edge of float16 (via its exact float32 values and midpoints) and bfloat16, and beyond their
    ranges (float16: clipped to its smallest subnormal and its largest finite value)."""
    f16 = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # positive finite float16
    mids = ((f16[:-1].astype(np.float64) + f16[1:]) / 2).astype(np.float32)  # exact: 12 significant bits
    edges16 = np.concatenate([f16, mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    extra = np.array([0.0, 1e-45, 2.0**-26, 2.0**-25, 2.0**-24, 65504.0, 65519.0, 65520.0, 1e10, 3.4e38], np.float32)
    values = np.concatenate([edges16, boundaries(np.arange(1, 0x7F80, dtype=np.uint16), 16), extra])
    kind = one.SCALE_KINDS[scale_dtype]
    got = np.empty_like(values)
    _round_all(values, kind, got)
    want = round_scales(values, scale_dtype).astype(np.float32)
    bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
    assert not bad.size, f"{bad.size} differ, first {values[bad[0]]!r}: {got[bad[0]]!r} != {want[bad[0]]!r}"
