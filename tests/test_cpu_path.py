"""The Numba CPU path (eqcore.backends.numba, eqcore.solvers.adam_numba) against the NumPy reference:
scales, codes, packing, dequant."""
import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import njit

import eqcore
from eqcore.backends import numba as cpu
from eqcore.backends import numpy as ref
from eqcore.solvers import adam_numba, rowmath
from eqcore.config import QuantConfig
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.dtypes import WEIGHT_DTYPES
from eqcore.backends.numpy import encode as encode_reference
from eqcore.solvers.adam import optimize_scales as optimize_scales_reference

from helpers import assert_reference_split, weights

BITS = (2, 3, 4, 8)
SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def group_size_for(kind, cols):
    return {"none": None, "divisor": max(1, cols // 4) if cols % 4 == 0 else 1, "odd": 7,
            "big": cols + 5}[kind]


# -- scalar helpers --------------------------------------------------------------
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
pos_f32 = st.floats(width=32, min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False)


quant_code_ref = njit(rowmath.quant_code)


@njit
def _codes_both(x, s, qmin, qmax, out_ref, out_fast):
    for i in range(x.shape[0]):
        out_ref[i] = quant_code_ref(x[i], s[i], qmin, qmax)
        out_fast[i] = cpu.quant_code(x[i], s[i], qmin, qmax)


@SETTINGS
@given(x=f32, s=pos_f32, bits=st.sampled_from(BITS))
def test_quant_code_equals_rowmath(x, s, bits):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    with np.errstate(over="ignore"):
        want = rowmath.quant_code(np.float32(x), np.float32(s), qmin, qmax)
    got = cpu.quant_code(np.float32(x), np.float32(s), np.float32(qmin), np.float32(qmax))
    assert got == want


@pytest.mark.parametrize("bits", BITS)
def test_quant_code_bulk_with_ties(bits):
    """Millions of quotients, a third of them exact .5 ties, both signs, beyond the clamp."""
    rng = np.random.default_rng(bits)
    n = 1 << 20
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = np.ldexp(1.0, rng.integers(-140, 100, n)).astype(np.float32)  # powers of two: ties exact
    k = rng.integers(2 * qmin - 3, 2 * qmax + 4, n) + 0.5
    x = np.concatenate([(k * s).astype(np.float32), rng.standard_normal(n).astype(np.float32) * 0.05,
                        rng.standard_normal(n).astype(np.float32)])
    s = np.concatenate([s, np.abs(rng.standard_normal(2 * n)).astype(np.float32) * 0.01 + np.float32(1e-6)])
    ref, fast = np.empty(3 * n), np.empty(3 * n)
    _codes_both(x, s, np.float32(qmin), np.float32(qmax), ref, fast)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(ref, np.clip(np.rint(x / s), qmin, qmax))


@njit
def _bits16(x, out_f16, out_bf16):
    for i in range(x.shape[0]):
        out_f16[i] = cpu.f32_to_f16_bits(x[i])
        out_bf16[i] = cpu.f32_to_bf16_bits(x[i])


def _special_floats():
    """float32 around every float16 / bfloat16 rounding boundary, subnormals, overflow, random bits."""
    rng = np.random.default_rng(0)
    lows = np.array([0, 1, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    parts = [rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32)]
    for e in range(90, 146):  # half subnormals (below 2**-14 = exponent 113) up to overflow (143)
        m = np.concatenate([rng.integers(0, 1 << 23, 2048, dtype=np.uint32),
                            (rng.integers(0, 1 << 10, 256, dtype=np.uint32)[:, None] << 13 | lows).ravel(),
                            (np.uint32(1) << np.arange(23, dtype=np.uint32))])
        for shift in range(1, 24):  # exact halfway points for every subnormal shift, odd and even
            m = np.concatenate([m, (rng.integers(0, 1 << 23, 64, dtype=np.uint32) >> shift << shift)
                                | (np.uint32(1) << np.uint32(shift - 1))])
        parts.append((np.uint32(e) << 23) | (m & 0x7FFFFF))
    parts.append(np.array([0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FE000, 0x7F7FFFFF, 0x7F7F8000,
                           0x7F7F7FFF, 0x7F800000, 0, 1, 0x007FFFFF, 0x00800000, 0x33000000, 0x33000001,
                           0x32FFFFFF, 0x33800000, 0x387FE000, 0x387FF000, 0x38800000], np.uint32))
    b = np.concatenate(parts)
    b = np.concatenate([b, b | np.uint32(0x80000000)])
    x = b.view(np.float32)
    return x[~np.isnan(x)]


def test_f16_bf16_bits_match_numpy():
    x = _special_floats()
    f16, bf16 = np.empty(x.shape, np.uint16), np.empty(x.shape, np.uint16)
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16).view(np.uint16)
    _bits16(x, f16, bf16)
    bad = np.flatnonzero(f16 != want16)
    assert bad.size == 0, [(hex(int(v)), hex(int(f16[i])), hex(int(want16[i]))) for i, v in zip(bad[:5], x.view(np.uint32)[bad[:5]])]
    np.testing.assert_array_equal(bf16, x.astype(ml_dtypes.bfloat16).view(np.uint16))


# -- scale optimisation -----------------------------------------------------------
shapes = st.sampled_from([(1, 1), (3, 33), (7, 100), (2, 64), (5, 257), (16, 31)])


@SETTINGS
@given(shape=shapes, bits=st.sampled_from(BITS), kind=st.sampled_from(["none", "divisor", "odd", "big"]),
       steps=st.sampled_from([0, 1, 2, 9, 40]), seed=st.integers(0, 2**32 - 1), zero_rows=st.integers(0, 2))
def test_optimize_scales_matches_reference(shape, bits, kind, steps, seed, zero_rows):
    w = weights(*shape, seed, zero_rows=zero_rows)
    cfg = QuantConfig(bits=bits, group_size=group_size_for(kind, shape[1]), steps=steps)
    got, want = adam_numba.optimize_scales(w, cfg), optimize_scales_reference(w, cfg)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    if steps == 0:
        np.testing.assert_array_equal(got, want)


def test_optimize_scales_moves_and_improves():
    """Guards against a no-op optimiser: scales leave s0 and the loss drops."""
    w = weights(64, 512, 3)
    cfg = QuantConfig(bits=3, steps=200, lr=1e-2)
    s0, s = adam_numba.optimize_scales(w, cfg.replace(steps=0)), adam_numba.optimize_scales(w, cfg)
    assert np.mean(s != s0) > 0.9
    np.testing.assert_allclose(s, optimize_scales_reference(w, cfg), rtol=1e-6)
    from eqcore.solvers.objective import reconstruction_loss

    assert np.all(reconstruction_loss(w, s, cfg) <= reconstruction_loss(w, s0, cfg))


@pytest.mark.parametrize("group_size", [None, 16, 24])
def test_optimize_scales_in_row_blocks_is_bit_identical(monkeypatch, group_size):
    """The solve is split into calls of bounded work (so that Ctrl-C is not held long); a
    block boundary must change no scale, a last block shorter than the others included."""
    w = weights(37, 64, 5)
    cfg = QuantConfig(bits=3, steps=30, group_size=group_size)
    whole = adam_numba.optimize_scales(w, cfg)
    monkeypatch.setattr(adam_numba, "CALL_WORK", 1)  # the smallest block: 4 rows a thread
    np.testing.assert_array_equal(adam_numba.optimize_scales(w, cfg), whole)


# -- encode / pack / unpack -------------------------------------------------------
@SETTINGS
@given(shape=shapes, bits=st.sampled_from(BITS), kind=st.sampled_from(["none", "divisor", "odd", "big"]),
       seed=st.integers(0, 2**32 - 1), jitter=st.booleans())
def test_encode_bit_exact(shape, bits, kind, seed, jitter):
    w = weights(*shape, seed, zero_rows=1)
    cfg = QuantConfig(bits=bits, group_size=group_size_for(kind, shape[1]), steps=0)
    s = optimize_scales_reference(w, cfg)
    if jitter:  # scales that clamp a lot, and exact .5 ties at power-of-two scales
        s = np.exp2(np.round(np.log2(s)) - 1).astype(np.float32)
        w[-1, : shape[1] // 2] = (np.arange(shape[1] // 2) % 7 + 0.5) * s[-1, 0]
    np.testing.assert_array_equal(cpu.encode(w, s, bits, cfg.group_size), encode_reference(w, s, bits, cfg.group_size))


@SETTINGS
@given(rows=st.integers(1, 5), cols=st.integers(1, 200), bits=st.sampled_from(BITS), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_bit_exact(rows, cols, bits, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, cols))
    p = cpu.pack(codes, bits)
    assert p.dtype == np.uint32
    np.testing.assert_array_equal(p, ref.pack(codes, bits))
    np.testing.assert_array_equal(cpu.unpack(p, bits, cols), ref.unpack(p, bits, cols))
    np.testing.assert_array_equal(cpu.unpack(p, bits, cols), codes)


@pytest.mark.parametrize("call", [
    lambda f: f.pack(np.zeros((2, 3), np.uint8), 5),
    lambda f: f.pack(np.zeros(3, np.uint8), 4),
    lambda f: f.pack(np.full((2, 3), 16), 4),
    lambda f: f.pack(np.full((2, 3), -1), 4),
    lambda f: f.unpack(np.zeros((2, 5), np.uint32), 4, 32),
    lambda f: f.unpack(np.zeros((2, 4), np.int32), 4, 32),
    lambda f: f.unpack(np.zeros(4, np.uint32), 4, 32),
])
def test_pack_unpack_reject_like_reference(call):
    with pytest.raises(ValueError):
        call(ref)
    with pytest.raises(ValueError):
        call(cpu)


# -- dequantize -------------------------------------------------------------------
@SETTINGS
@given(shape=shapes, bits=st.sampled_from(BITS), kind=st.sampled_from(["none", "divisor", "odd", "big"]),
       src=st.sampled_from(sorted(WEIGHT_DTYPES)), out=st.sampled_from([None, *sorted(WEIGHT_DTYPES)]),
       sigma=st.sampled_from([None, 1.0, 2.5]), seed=st.integers(0, 2**32 - 1))
def test_dequantize_bit_exact(shape, bits, kind, src, out, sigma, seed):
    w = weights(*shape, seed, dtype=WEIGHT_DTYPES[src])
    qt = eqcore.quantize(w, bits=bits, group_size=group_size_for(kind, shape[1]), sigma=sigma, steps=2, backend="numpy")
    want = dequantize_reference(qt, out)
    got = cpu.dequantize(qt, out)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("out", sorted(WEIGHT_DTYPES))
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_dequantize_large_values_many_outliers_wide(out):
    """fp16 overflow / subnormal products, outliers cast across dtypes, int32 column indices."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((3, 70000)) * 3e4).astype(np.float32)
    w[1] *= 1e-9  # float16 subnormal range
    qt = eqcore.quantize(w, bits=8, sigma=1.0, steps=1, outlier_stats="row", backend="numpy")
    assert qt.outlier_cols.dtype == np.int32 and qt.outlier_vals.size > 1000
    np.testing.assert_array_equal(cpu.dequantize(qt, WEIGHT_DTYPES[out]).view(np.uint8),
                                  dequantize_reference(qt, out).view(np.uint8))


@SETTINGS
@given(src=st.sampled_from(["float16", "bfloat16", "float32"]), out=st.sampled_from(sorted(WEIGHT_DTYPES)),
       bits=st.sampled_from(BITS), sigma=st.sampled_from([None, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_dequantize_saturation_bit_exact(src, out, bits, sigma, seed):
    """Weights at their dtype's max: the clamp to the output range is the reference's, bit for bit."""
    dt = WEIGHT_DTYPES[src]
    top = float(ml_dtypes.finfo(dt).max)
    rng = np.random.default_rng(seed)
    w = rng.uniform(-1, 1, (5, 70)) * top
    w[:, ::2] *= 1e-3
    w[0, 0] = -top
    qt = eqcore.quantize(w.astype(dt), bits=bits, sigma=sigma, steps=3, backend="numpy")
    want = dequantize_reference(qt, out)
    np.testing.assert_array_equal(cpu.dequantize(qt, WEIGHT_DTYPES[out]).view(np.uint8), want.view(np.uint8))
    assert np.all(np.isfinite(want.astype(np.float64)))


# -- quantize(backend=...) ---------------------------------------------------------
@pytest.mark.parametrize("bits,group_size", [(2, None), (3, 48), (4, 100), (8, 7)])
def test_quantize_numba_vs_numpy(bits, group_size):
    w = weights(24, 300, bits, dtype=ml_dtypes.bfloat16)
    a = eqcore.quantize(w, bits=bits, group_size=group_size, steps=0, backend="numba")
    b = eqcore.quantize(w, bits=bits, group_size=group_size, steps=0, backend="numpy")
    np.testing.assert_array_equal(a.qweight, b.qweight)
    np.testing.assert_array_equal(a.scales, b.scales)
    a = eqcore.quantize(w, bits=bits, group_size=group_size, steps=30, backend="numba")
    b = eqcore.quantize(w, bits=bits, group_size=group_size, steps=30, backend="numpy")
    np.testing.assert_allclose(a.scales, b.scales, rtol=1e-6)
    same = np.all(a.scales == b.scales, axis=1)
    np.testing.assert_array_equal(a.qweight[same], b.qweight[same])
    assert same.mean() > 0.9
    np.testing.assert_array_equal(eqcore.dequantize(a, backend="numba").view(np.uint16), dequantize_reference(a).view(np.uint16))
    assert math.isclose(float(np.abs(eqcore.dequantize(a, "float32") - w.astype(np.float32)).mean()),
                        float(np.abs(eqcore.dequantize(b, "float32") - w.astype(np.float32)).mean()), rel_tol=1e-3)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("grid", ["symmetric", "asymmetric", "codebook"])
def test_dequantize_table_and_direct_paths_bit_exact(bits, grid):
    """Groups of at least 2 * 2^bits columns (no column scales) are dequantized by table lookup
    (4-bit codes into 16-bit outputs a byte at a time when groups and rows have even widths),
    shorter ones value by value: all give the reference's bits, in every output dtype."""
    w = weights(6, 1100, seed=bits, dtype=np.float32)
    w[2, 5] = 1e4  # an outlier far beyond the grid, and a row of huge values for saturation
    w[4] *= 3e3
    for g in (2 << bits, (2 << bits) - 1, (2 << bits) + 1, None):
        for col in (False, True):
            qt = eqcore.quantize(w, bits=bits, grid=grid, group_size=g, col_scales=col, sigma=2.0, steps=0,
                                 backend="numpy")
            for out in sorted(WEIGHT_DTYPES):
                np.testing.assert_array_equal(cpu.dequantize(qt, out).view(np.uint8),
                                              dequantize_reference(qt, out).view(np.uint8))
    odd = eqcore.quantize(w[:, :1099], bits=bits, grid=grid, sigma=2.0, steps=0, backend="numpy")  # odd rows
    np.testing.assert_array_equal(cpu.dequantize(odd, "float16").view(np.uint8),
                                  dequantize_reference(odd, "float16").view(np.uint8))


def test_half_bits_to_f32_is_exact_for_every_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)

    @njit
    def convert(b, out):
        for i in range(b.shape[0]):
            out[i] = cpu.half_bits_to_f32(b[i])

    got = np.empty(bits.shape, np.float32)
    convert(bits, got)
    want = bits.view(np.float16).astype(np.float32)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[np.isinf(want)], want[np.isinf(want)])


@SETTINGS
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), src=st.sampled_from(["float16", "bfloat16", "float32"]),
       sigma=st.sampled_from([0.5, 1.0, 2.5, 3.0]), seed=st.integers(0, 2**32 - 1))
def test_split_outliers_is_the_reference_selection(rows, cols, src, sigma, seed):
    """The fused per-row sigma rule (statistics, float32 cast, zeroing, CSR) gives exactly what the
    reference's outlier_mask + to_csr + cast give, constant and zero rows included."""
    w = weights(rows, cols, seed, dtype=WEIGHT_DTYPES[src], scale=0.02)
    w[0, : cols // 2] = w[0, 0]  # a row with many equal values (ties at the threshold are likely)
    if rows > 2:
        w[1] = w[1, 0]  # a constant row: std 0, no outliers
        w[2, -1] = 100.0  # a far outlier
    assert_reference_split(w, sigma)
    assert cpu.split_outliers(w.astype(np.float64), sigma) is None


@pytest.mark.parametrize("src", ["float16", "bfloat16", "float32"])
def test_default_quantize_on_numba_equals_the_reference(src):
    """The default settings go through the fused split on Numba; everything stored is the reference's."""
    w = weights(40, 700, 3, dtype=WEIGHT_DTYPES[src])
    a, b = eqcore.quantize(w, backend="numba"), eqcore.quantize(w, backend="numpy")
    assert a.outlier_vals.size > 0
    for f, arr in b.arrays().items():
        np.testing.assert_array_equal(np.asarray(getattr(a, f)).view(np.uint8), np.asarray(arr).view(np.uint8))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("opts", [{}, dict(grid="asymmetric", group_size=32), dict(outliers="adpq", bits=3),
                                  dict(outlier_stats="tensor"), dict(col_scales=True)])
def test_row_blocks_give_the_whole_tensor_result(monkeypatch, backend, opts):
    """On the CPU a weight whose rows are independent is quantized a block of rows at a time
    (bounded memory): the stored arrays equal those of one pass over the whole tensor; settings
    with tensor-wide statistics keep one pass."""
    from eqcore import api

    w = weights(37, 96, 4, dtype=np.float16)
    whole = eqcore.quantize(w, backend=backend, **opts)
    monkeypatch.setattr(api, "ROW_BLOCK_ELEMENTS", 96 * 5)  # blocks of 5 rows, the last of 2
    calls = []
    real = api._quantize_checked
    monkeypatch.setattr(api, "_quantize_checked", lambda w, c, n, *a: (calls.append(w.shape[0]), real(w, c, n, *a))[1])
    blocked = eqcore.quantize(w, backend=backend, **opts)
    assert calls == ([5] * 7 + [2] if eqcore.QuantConfig(**opts).rows_independent else [37])
    for f, arr in whole.arrays().items():
        np.testing.assert_array_equal(np.asarray(getattr(blocked, f)).view(np.uint8), np.asarray(arr).view(np.uint8))


@pytest.mark.parametrize("src", sorted(WEIGHT_DTYPES))
def test_all_finite_in_pieces(monkeypatch, src):
    """Large NumPy arrays are checked a piece at a time (small temporaries): a NaN or an infinity in
    any piece, a transposed view included, is found."""
    from eqcore import dtypes

    monkeypatch.setattr(dtypes, "_FINITE_CHUNK", 7)
    a = weights(9, 13, 1, dtype=WEIGHT_DTYPES[src])
    assert dtypes.all_finite(a) and dtypes.all_finite(a.T)
    for bad in (np.inf, -np.inf, np.nan):
        for at in ((0, 0), (4, 6), (8, 12)):
            b = a.copy()
            b[at] = bad
            assert not dtypes.all_finite(b) and not dtypes.all_finite(b.T)
            assert not dtypes.all_finite(b.reshape(1, -1)) and not dtypes.all_finite(b.reshape(-1))
    assert dtypes.all_finite(a.reshape(1, -1)) and dtypes.all_finite(a.reshape(-1))
