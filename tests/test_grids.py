"""The grids beyond the symmetric one (asymmetric zero-points, codebooks, column scales): each is
never worse than its plain start (max-abs / min-max), keeps outliers bit-exact, counts its
metadata in bits_per_weight, is identical on every CPU backend and round-trips through files."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eqcore
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.backends.numpy import encode as encode_reference
from eqcore.config import QuantConfig
from eqcore.grids import column_scales, fit_codebook, nf_codebook
from eqcore.io.fileformat import load_file, save_file
from eqcore.layout import group_layout
from eqcore.tensor import QuantizedTensor

from helpers import weights

GRIDS = [dict(grid="asymmetric"), dict(grid="codebook"), dict(grid="codebook", codebook="nf"),
         dict(grid="symmetric", col_scales=True, solver="lloyd"), dict(grid="asymmetric", col_scales=True),
         dict(grid="codebook", col_scales=True, scale_dtype="float16")]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def err(qt, w):
    d = dequantize_reference(qt, np.float32).astype(np.float64) - w.astype(np.float64)
    return (d * d).sum(axis=1)


def plain(w, config, qt):
    """The same grid (codebook, column scales, outliers) at its start: max-abs scales (symmetric,
    codebook) or min-max scale and zero (asymmetric), per row or group."""
    rows, cols = w.shape
    x = w.astype(np.float32).copy()
    mask = np.zeros(w.shape, bool)
    r = np.repeat(np.arange(rows), np.diff(qt.outlier_rowptr))
    mask[r, qt.outlier_cols.astype(np.int64)] = True
    x[mask] = 0
    col = None if qt.col_scales is None else qt.col_scales.astype(np.float32)
    y = x if col is None else x / col
    g, ng = group_layout(cols, config.group_size)
    pad = np.zeros((rows, ng * g), np.float32)
    pad[:, :cols] = y
    pad = pad.reshape(rows, ng, g)
    kept = np.zeros((rows, ng * g), bool)
    kept[:, :cols] = ~mask
    kept = kept.reshape(rows, ng, g)
    zeros = None
    if config.grid == "asymmetric":  # min-max over the entries that are not outliers
        lo = np.where(kept, pad, np.inf).min(axis=2).astype(np.float64)
        hi = np.where(kept, pad, -np.inf).max(axis=2).astype(np.float64)
        lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
        s = (hi - lo) / ((1 << config.bits) - 1)
        s = np.where(s > 0, s, np.maximum(np.abs(lo), 1e-30) / ((1 << config.bits) - 1)).astype(np.float32)
        zeros = np.where(hi > lo, -lo / s, np.where(lo > 0, 0.0, (1 << config.bits) - 1)).astype(np.float32)
    else:
        top = float(np.abs(qt.codebook).max()) if qt.codebook is not None else config.qmax
        s = np.abs(pad).max(axis=2) / top
        s = np.where(s > 0, s, 1.0).astype(np.float32)
    qw = encode_reference(x, s, config.bits, config.group_size, zeros=zeros, codebook=qt.codebook, col_scales=col)
    base = QuantizedTensor(qw, s, qt.outlier_rowptr, qt.outlier_cols, qt.outlier_vals, shape=w.shape,
                           dtype=qt.dtype, bits=config.bits, group_size=config.group_size, grid=config.grid,
                           zeros=zeros, codebook=qt.codebook, col_scales=None if col is None else col)
    return err(base, w)


@SETTINGS
@given(st.sampled_from(GRIDS), st.sampled_from([2, 3, 4, 8]), st.sampled_from([None, 32, 64, 7]),
       st.integers(1, 6), st.integers(1, 150), st.integers(0, 2**31), st.sampled_from([None, 2.5]))
def test_never_worse_than_the_plain_start(opts, bits, g, rows, cols, seed, sigma):
    w = weights(rows, cols, seed=seed)
    if seed % 3 == 0:
        w[0] = 0.0  # an all-zero row
    if seed % 5 == 0:
        w[:, 0] = 0.3  # a constant column
    config = QuantConfig(bits=bits, group_size=g, sigma=sigma, **{"scale_dtype": "float32", **opts})
    if config.scale_dtype != "float32":  # rounding the scales may cost a little against float32 starts
        config = QuantConfig(**{**config.__dict__, "scale_dtype": "float32"})
    qt = eqcore.quantize(w, config, backend="numpy")
    got, start = err(qt, w), plain(w, config, qt)
    assert np.all(got <= start * (1 + 1e-6) + 1e-30), (got, start)


@pytest.mark.parametrize("opts", GRIDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_backends_agree_bit_for_bit_and_outliers_come_back(opts, dtype):
    w = weights(40, 300, seed=3, dtype=dtype)
    w[3, 7] = 0.9  # a far outlier
    for g in (None, 64):
        ref = eqcore.quantize(w, bits=4, group_size=g, backend="numpy", **opts)
        fast = eqcore.quantize(w, bits=4, group_size=g, backend="numba", **opts)
        for name, a in ref.arrays().items():
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(fast.arrays()[name]).view(np.uint8),
                                          err_msg=name)
        for out in ("float16", "bfloat16", "float32"):
            a = eqcore.dequantize(ref, out, backend="numba")
            b = dequantize_reference(ref, out)
            assert a.tobytes() == b.tobytes()
        back = dequantize_reference(ref)
        r = np.repeat(np.arange(w.shape[0]), np.diff(ref.outlier_rowptr))
        c = ref.outlier_cols.astype(np.int64)
        assert ref.outliers.nnz > 0 and back[3, 7] == w[3, 7]
        np.testing.assert_array_equal(back[r, c], w[r, c])


@pytest.mark.parametrize("opts", GRIDS)
def test_bits_per_weight_counts_what_is_stored(opts, tmp_path):
    w = weights(32, 256, seed=4, dtype=np.float16)
    qt = eqcore.quantize(w, bits=3, group_size=64, **opts)
    stored = sum(a.nbytes for a in qt.arrays().values())
    assert qt.bits_per_weight == pytest.approx(8 * stored / w.size)
    assert ("zeros" in qt.arrays()) == (opts["grid"] == "asymmetric")
    assert ("codebook" in qt.arrays()) == (opts["grid"] == "codebook")
    assert ("col_scales" in qt.arrays()) == bool(opts.get("col_scales"))
    save_file({"w": qt}, tmp_path / "q.safetensors")
    back = load_file(tmp_path / "q.safetensors")["w"]
    assert back.grid == qt.grid and back.bits_per_weight == qt.bits_per_weight
    np.testing.assert_array_equal(eqcore.dequantize(back), eqcore.dequantize(qt))


def test_better_grids_lower_the_error_on_heavy_tailed_weights():
    """What they are for: on t(4) weights each grid beats the symmetric one at the same group size."""
    w = weights(256, 512, seed=5)
    base = err(eqcore.quantize(w, bits=4, group_size=64, solver="exact"), w).sum()
    for opts in (dict(grid="asymmetric"), dict(grid="codebook"), dict(grid="codebook", col_scales=True)):
        assert err(eqcore.quantize(w, bits=4, group_size=64, **opts), w).sum() < base, opts


def test_codebooks():
    nf4 = nf_codebook(4)
    assert nf4.shape == (16,) and nf4[0] == -1 and nf4[-1] == 1 and 0.0 in nf4 and np.all(np.diff(nf4) > 0)
    np.testing.assert_allclose(nf4[6:9], [-0.0911, 0.0, 0.0796], atol=1e-3)  # bitsandbytes' NF4 table
    y = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    cb = fit_codebook(y, 3, None)
    assert cb.dtype == np.float32 and cb.shape == (8,) and np.all(np.diff(cb) > 0) and np.abs(cb).max() == 1
    assert 0.0 in cb and 0.0 not in fit_codebook(y, 4, None)  # a zero level up to ZERO_LEVEL_BITS bits
    tiny = fit_codebook(np.zeros((2, 3), np.float32), 4, None)  # too few values: NF levels
    np.testing.assert_array_equal(tiny, nf_codebook(4))


def _fit_by_bincount(y, bits, group_size):
    """fit_codebook as first written: each round assigns every value with searchsorted and sums
    with bincount (the readable form of its Lloyd-Max rounds)."""
    from eqcore import grids

    v = grids._normalised(y, group_size).astype(np.float64)
    v = v[v != 0] if int((v != 0).sum()) >= (1 << bits) else v
    if v.size > grids.FIT_SAMPLE:
        v = v[:: -(-v.size // grids.FIT_SAMPLE)]
    v, n = np.sort(v), 1 << bits
    if v.size < n:
        return nf_codebook(bits)
    pin = grids._with_zero if bits <= grids.ZERO_LEVEL_BITS else (lambda lev: lev)
    lev = pin(v[(((np.arange(n) + 0.5) / n) * v.size).astype(np.int64)])
    for _ in range(grids.FIT_ROUNDS):
        idx = np.searchsorted((lev[1:] + lev[:-1]) / 2, v)
        sums, counts = np.bincount(idx, weights=v, minlength=n), np.bincount(idx, minlength=n)
        lev = pin(np.where(counts > 0, sums / np.maximum(counts, 1), lev))
    lev = np.sort(lev)
    out = (lev / np.abs(lev).max()).astype(np.float32)
    for j in range(1, n):
        if out[j] <= out[j - 1]:
            out[j] = np.nextafter(out[j - 1], np.float32(np.inf))
    return out


@SETTINGS
@given(rows=st.integers(1, 40), cols=st.integers(1, 90), bits=st.sampled_from([2, 3, 4, 8]),
       group=st.sampled_from([None, 7, 32]), kind=st.sampled_from(["t", "few", "ties", "zeros", "tiny"]),
       sample=st.sampled_from([None, 5, 37, 300]), seed=st.integers(0, 2**32 - 1))
def test_fit_codebook_matches_the_bincount_rounds(rows, cols, bits, group, kind, sample, seed):
    """The sample taken in two passes over y (NumPy) and the rounds' run sums (binary-searched
    bounds in the sorted values, each run summed in order) give the same levels, bit for bit, as
    normalising every group, sampling, assigning and bincounting every value."""
    from eqcore import grids

    rng = np.random.default_rng(seed)
    y = (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32)
    if kind == "few":  # few distinct values: empty levels, values on the midpoints
        y = rng.integers(-3, 4, (rows, cols)).astype(np.float32)
    elif kind == "ties":
        y[:, ::2] = y[0, 0]
    elif kind == "zeros":  # zero rows and groups, mostly zeros
        y[rng.random((rows, cols)) < 0.8] = 0
        y[::3] = 0
    elif kind == "tiny":  # quotients that underflow to 0 in float32
        y[:, 1::2] = np.float32(1e-44)
        y[:, ::5] = np.float32(3e38)
    old = grids.FIT_SAMPLE
    grids.FIT_SAMPLE = old if sample is None else sample  # small samples: the every-step-th rule
    try:
        got, want = fit_codebook(y, bits, group), _fit_by_bincount(y, bits, group)
    finally:
        grids.FIT_SAMPLE = old
    np.testing.assert_array_equal(got, want)


def test_column_scales_even_out_columns():
    rng = np.random.default_rng(1)
    spread = np.exp(rng.uniform(-2, 2, 256))
    x = (rng.standard_normal((128, 256)) * spread).astype(np.float32)
    c = column_scales(x)
    assert c.dtype == np.float32 and np.all(c > 0)
    before, after = x.std(axis=0), (x / c).std(axis=0)
    assert after.std() / after.mean() < 0.3 * before.std() / before.mean()
    assert column_scales(x, "float16").dtype == np.float16
    huge = np.full((2, 4), 3e38, np.float32)
    assert np.all(np.isfinite(huge / column_scales(huge)))


@pytest.mark.parametrize("opts", GRIDS)
def test_groups_made_only_of_outliers(opts):
    w = weights(6, 40, seed=9)
    w[2, :4] = [1.0, -1.0, 2.0, 1.5]  # group 0 of row 2: outliers only
    qt = eqcore.quantize(w, bits=4, group_size=4, sigma=3.0, outlier_stats="tensor", **opts)  # tensor statistics
    back = eqcore.dequantize(qt)
    np.testing.assert_array_equal(back[2, :4], w[2, :4])
    assert np.all(np.isfinite(back))


def test_asymmetric_constant_group_is_exact():
    w = np.full((3, 64), 0.25, np.float32)
    w[1] = -0.5
    qt = eqcore.quantize(w, bits=4, grid="asymmetric", sigma=None, scale_dtype="float32")  # fp16 scales round
    np.testing.assert_array_equal(eqcore.dequantize(qt), w)


@pytest.mark.parametrize("kw, match", [(dict(grid="hex"), "grid must be one of"),
                                       (dict(grid="codebook", solver="exact"), "handles the symmetric grid"),
                                       (dict(codebook="nf5"), "codebook must be one of"),
                                       (dict(col_scales=1), "col_scales must be True or False")])
def test_bad_grid_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        eqcore.QuantConfig(**kw)


def test_bad_grid_files_are_refused():
    qt = eqcore.quantize(weights(4, 64, seed=8), bits=4, grid="codebook")
    arrays, meta = qt.arrays(), qt.metadata()
    bad = dict(arrays, codebook=arrays["codebook"][::-1].copy())
    with pytest.raises(eqcore.FormatError, match="strictly increasing"):
        QuantizedTensor.from_arrays(bad, meta).validate()
    missing = {k: v for k, v in arrays.items() if k != "codebook"}
    with pytest.raises(eqcore.FormatError, match="codebook"):
        QuantizedTensor.from_arrays(missing, meta).validate()
    asym = eqcore.quantize(weights(4, 64, seed=8), bits=4, grid="asymmetric")
    a = asym.arrays()
    a["zeros"] = a["zeros"].copy()
    a["zeros"][0, 0] = np.nan
    with pytest.raises(eqcore.FormatError, match="zeros must be finite"):
        QuantizedTensor.from_arrays(a, asym.metadata()).validate()


def test_fitted_codebook_sends_small_weights_to_zero():
    """Weights far below the grid's step dequantize to 0 on the fitted codebook, as on the
    symmetric grid: a codebook without a zero level moves each of them by a whole level, which an
    input channel carrying a large activation multiplies (regression: SmolLM2's v_proj at 3 bits). At 4 bits the fit is free (the tune split preferred it)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((32, 256)) * 0.02).astype(np.float32)
    w[:, 7] *= 1e-3  # an input channel of tiny weights
    for bits in (2, 3):
        for gs in (None, 64):
            w_hat = np.asarray(eqcore.dequantize(eqcore.quantize(w, bits=bits, grid="codebook", group_size=gs)))
            sym = np.asarray(eqcore.dequantize(eqcore.quantize(w, bits=bits, group_size=gs)))
            assert np.all(w_hat[:, 7] == 0) and np.all(sym[:, 7] == 0), (bits, gs)
