"""dequantize(..., out=): into a caller's array, bit for bit what a fresh one gets, with one-line
refusals of arrays it cannot fill."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import eqcore
from eqcore.dtypes import bfloat16

from helpers import nearest_bfloat16, weights

DTYPES = [np.dtype(np.float16), bfloat16, np.dtype(np.float32), np.dtype(np.float64)]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("opts", [dict(), dict(group_size=32, grid="codebook", scale_dtype="log8"),
                                  dict(bits=3, group_size=20, grid="asymmetric", col_scales=True)])
def test_out_gets_what_a_new_array_gets(backend, opts):
    qt = eqcore.quantize(weights(9, 70, seed=3, dtype=np.float16), **opts)
    for dt in DTYPES:
        out = np.full(qt.shape, 7, dt)  # junk everywhere: every element must be written
        got = eqcore.dequantize(qt, dt, backend=backend, out=out)
        assert got is out
        fresh = eqcore.dequantize(qt, dt, backend=backend)
        np.testing.assert_array_equal(out.view(np.uint8), fresh.view(np.uint8))


def test_out_defaults_to_the_weights_dtype():
    qt = eqcore.quantize(weights(4, 64, seed=4, dtype=np.float16))
    out = np.empty(qt.shape, np.float16)
    assert eqcore.dequantize(qt, out=out) is out
    with pytest.raises(ValueError, match=r"out must be float16 \(4, 64\), got float32"):
        eqcore.dequantize(qt, out=np.empty(qt.shape, np.float32))


@pytest.mark.parametrize("make, match", [
    (lambda s: np.empty((s[0], s[1] + 1), np.float32), r"out must be float32 \(4, 64\), got float32 \(4, 65\)"),
    (lambda s: np.empty(s, np.float16), "got float16"),
    (lambda s: np.empty((s[1], s[0]), np.float32).T, "C-contiguous"),
    (lambda s: np.broadcast_to(np.zeros(1, np.float32), s), "C-contiguous|read-only"),
    (lambda s: np.frombuffer(bytes(4 * s[0] * s[1]), np.float32).reshape(s), "read-only"),
    (lambda s: [[0.0] * s[1]] * s[0], "must be a NumPy array"),
])
def test_unusable_out_is_refused(make, match):
    qt = eqcore.quantize(weights(4, 64, seed=5))
    with pytest.raises(ValueError, match=match):
        eqcore.dequantize(qt, np.float32, out=make(qt.shape))


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_outlier_casts_are_the_float64_formula(src, dst):
    """saturate's shortcuts (itself; through float32 without a clamp; Numba's float16 conversion)
    give what clamping in float64 and casting gives, infinities and range edges included."""
    from eqcore.backends.numba import _outlier_values
    from eqcore.dtypes import finite_max, saturate

    rng = np.random.default_rng(6)
    a = rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 6, 4000)
    a[:4] = [finite_max(src), -finite_max(src), 6e-8, -1e-45]
    a = a.clip(-finite_max(src), finite_max(src)).astype(src)  # finite: the shortcuts apply
    top = finite_max(dst)
    want = a.astype(np.float64).clip(-top, top)
    want = nearest_bfloat16(want) if dst == bfloat16 else want.astype(dst)  # one rounding, any ml_dtypes
    for f in (saturate, _outlier_values):
        np.testing.assert_array_equal(f(a, dst).view(np.uint8), want.view(np.uint8))
    b = np.array([np.inf, -np.inf, 1.0]).astype(src)  # never in a valid tensor, but saturate clamps them
    np.testing.assert_array_equal(saturate(b, dst).view(np.uint8),
                                  b.astype(np.float64).clip(-top, top).astype(dst).view(np.uint8))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-3.38e38, 3.38e38, allow_nan=False, allow_infinity=False), min_size=1, max_size=40),
       st.integers(0, 2**16 - 1), st.integers(-2**28, 2**28))
def test_float64_to_bfloat16_rounds_once(vals, code, nudge):
    """float64 -> bfloat16 is one rounding to nearest even (ml_dtypes' own cast is two before 0.7):
    arbitrary doubles, and doubles a few float64 ulps off a bfloat16 value or off the midpoint
    of two (where rounding through float32 goes wrong)."""
    from eqcore.dtypes import float64_to_bfloat16

    b = np.array([code, min(code + 1, 0xFFFF)], np.uint16).view(bfloat16).astype(np.float64)  # neighbours
    extra = [b[0], (b[0] + b[1]) / 2] if np.all(np.isfinite(b)) else []
    extra = [np.frombuffer(np.float64(e).tobytes(), np.int64)[0] + nudge for e in extra]
    extra = [v for v in np.array(extra, np.int64).view(np.float64) if np.isfinite(v) and abs(v) <= 3.38e38]
    a = np.array(vals + extra, np.float64)
    np.testing.assert_array_equal(float64_to_bfloat16(a).view(np.uint16), nearest_bfloat16(a).view(np.uint16))


def test_every_finite_float16_outlier_casts_to_bfloat16_as_the_formula():
    """Numba's float16 -> bfloat16 outlier cast (exact to float32, one rounding) on all 63488
    finite float16 values, ties and subnormals included."""
    from eqcore.backends.numba import _outlier_values
    from eqcore.dtypes import bfloat16

    a = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    a = a[np.isfinite(a)]
    got = _outlier_values(a, bfloat16)
    assert got.dtype == bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), a.astype(np.float64).astype(bfloat16).view(np.uint16))


def test_check_false_skips_validation_and_the_default_keeps_it(monkeypatch):
    """``check=False`` (as in matmul) skips ``qt.validate()``: QuantizedLinear's dense path takes a
    tensor it validated once; the default still refuses a tensor changed in place."""
    from eqcore.tensor import FormatError, QuantizedTensor

    qt = eqcore.quantize(weights(8, 64, seed=1, dtype=np.float16))
    calls = []
    real = QuantizedTensor.validate
    monkeypatch.setattr(QuantizedTensor, "validate", lambda self: (calls.append(1), real(self))[1])
    want = eqcore.dequantize(qt, np.float32)
    assert calls == [1]
    assert np.array_equal(eqcore.dequantize(qt, np.float32, check=False), want) and calls == [1]
    qt.scales[0, 0] = np.nan
    with pytest.raises(FormatError, match="finite"):
        eqcore.dequantize(qt, np.float32)
