"""The NumPy reference: the readable specification every fast path is held to."""
import dataclasses

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import eqcore
from eqcore.config import QuantConfig
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.outliers import concat_csr, find_outliers
from eqcore.backends.numpy import pack, unpack
from eqcore.layout import narrow_rowptr, packed_cols, rowptr_dtype, stored_bytes
from eqcore.tensor import QuantizedTensor
from eqcore.solvers.adam import optimize_scales as optimize_scales_reference
from eqcore.solvers.objective import group_view, initial_scales, loss_and_grad, reconstruction_loss

from helpers import weights

BITS = st.sampled_from([2, 3, 4, 8])


@given(bits=BITS, rows=st.integers(1, 5), cols=st.integers(1, 130), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_roundtrip(bits, rows, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, cols))
    packed = pack(codes, bits)
    assert packed.dtype == np.uint32 and packed.shape == (rows, packed_cols(cols, bits))
    np.testing.assert_array_equal(unpack(packed, bits, cols), codes)


def test_pack_layout_is_the_documented_bit_stream():
    # 4-bit: code j sits at bits 4j of word j // 8 (little-endian nibbles)
    assert pack(np.arange(16).reshape(1, 16) % 16, 4)[0, 0] == 0x76543210
    # 3-bit: code 10 straddles words 0 and 1 (bits 30..32)
    codes = np.zeros((1, 32), dtype=np.int64)
    codes[0, 10] = 0b111
    p = pack(codes, 3)
    assert p[0, 0] == 0b11 << 30 and p[0, 1] == 0b1 and p.shape == (1, 3)
    # 8-bit: identical to the bytes of the codes
    c8 = np.arange(40, dtype=np.uint8).reshape(1, 40)
    np.testing.assert_array_equal(pack(c8, 8).view(np.uint8)[0, :40], c8[0])


@pytest.mark.parametrize("bad", [5, 1, 16, True])
def test_bad_bits_are_refused(bad):
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros((1, 4), int), bad)
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(bits=bad)


def test_pack_refuses_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must lie"):
        pack(np.full((1, 3), 16), 4)


def test_outliers_are_the_n_sigma_entries_in_csr():
    w = weights(20, 50, seed=1)
    out, mask = find_outliers(w, 2.5)
    expected = np.abs(w.astype(np.float64) - w.mean(dtype=np.float64)) >= 2.5 * w.astype(np.float64).std()
    np.testing.assert_array_equal(mask, expected)
    assert out.nnz == expected.sum() > 0
    assert out.rowptr.dtype == np.uint16 and out.cols.dtype == np.uint16 and out.vals.dtype == w.dtype
    for r in range(20):
        cols = out.cols[out.rowptr[r]:out.rowptr[r + 1]]
        np.testing.assert_array_equal(cols, np.nonzero(expected[r])[0])
        np.testing.assert_array_equal(out.vals[out.rowptr[r]:out.rowptr[r + 1]], w[r, cols])


def test_row_statistics_option_uses_each_rows_mean_and_std():
    w = weights(6, 200, seed=2)
    w[0] *= 100  # one loud row: per-tensor stats flag most of it, per-row stats do not
    _, per_tensor = find_outliers(w, 3.0, "tensor")
    _, per_row = find_outliers(w, 3.0, "row")
    assert per_tensor[0].mean() > 0.1 and per_row[0].mean() < 0.05


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("group_size", [None, 32, 50])
def test_dequant_restores_outliers_exactly_and_bounds_the_rest(dtype, group_size):
    w = weights(16, 130, seed=3, dtype=dtype)
    qt = eqcore.quantize(w, bits=4, group_size=group_size, steps=20, outlier_stats="tensor", backend="numpy")
    w_hat = dequantize_reference(qt)
    assert w_hat.dtype == np.dtype(dtype)
    _, mask = find_outliers(w, 3.0)
    assert mask.any()
    np.testing.assert_array_equal(w_hat[mask], w[mask])  # exact, bit for bit
    # every other entry is within half a step (or clamped at the grid's end)
    s = np.repeat(qt.scales, group_size or 130, axis=1)[:, :130]
    err = np.abs(w_hat.astype(np.float32) - w.astype(np.float32))
    clamp_err = np.abs(w.astype(np.float32)) - 7 * s
    tol = np.maximum(0.5 * s, clamp_err) * 1.01 + 1e-2 * np.abs(w.astype(np.float32))
    assert np.all(err[~mask] <= tol[~mask])


def test_dequant_equals_the_formula():
    w = weights(8, 70, seed=4)
    qt = eqcore.quantize(w, bits=3, group_size=16, steps=5, backend="numpy")
    q = unpack(qt.qweight, 3, 70).astype(np.float32) - 4
    s = np.repeat(qt.scales, 16, axis=1)[:, :70]
    expected = q * s
    rp = qt.outlier_rowptr
    for r in range(8):
        expected[r, qt.outlier_cols[rp[r]:rp[r + 1]]] = qt.outlier_vals[rp[r]:rp[r + 1]]
    np.testing.assert_array_equal(dequantize_reference(qt), expected)


@settings(max_examples=60)
@given(bits=BITS, n=st.integers(2, 40), seed=st.integers(0, 2**32 - 1), rel=st.floats(0.5, 1.5))
def test_gradient_matches_finite_difference_where_rounding_is_constant(bits, n, seed, rel):
    x = np.random.default_rng(seed).standard_normal((1, n)).astype(np.float32)
    cfg = QuantConfig(bits=bits)
    s = np.float32(rel * np.abs(x).max() / cfg.qmax)
    h = np.float32(s * 1e-4)
    sp, sm = np.array([s + h], np.float32), np.array([s - h], np.float32)
    q = lambda sc: np.clip(np.rint(x / sc), cfg.qmin, cfg.qmax)
    assume(np.array_equal(q(sp[0]), q(sm[0])) and np.array_equal(q(sp[0]), q(s)))
    _, grad = loss_and_grad(x, np.array([s], np.float32), cfg.qmin, cfg.qmax)
    lp, _ = loss_and_grad(x, sp, cfg.qmin, cfg.qmax)
    lm, _ = loss_and_grad(x, sm, cfg.qmin, cfg.qmax)
    fd = (lp[0] - lm[0]) / (float(sp[0]) - float(sm[0]))
    assert grad[0] == pytest.approx(fd, rel=1e-4, abs=1e-7 * float(np.sum(x.astype(np.float64) ** 2)) / float(s))


@given(bits=BITS, seed=st.integers(0, 1000), group=st.sampled_from([None, 7, 64]))
@settings(max_examples=25, deadline=None)
def test_adam_keeps_the_best_scale_so_never_worse_than_its_start(bits, seed, group):
    x = weights(6, 90, seed=seed)
    cfg = QuantConfig(bits=bits, group_size=group, steps=30, lr=0.05)
    best = reconstruction_loss(x, optimize_scales_reference(x, cfg), cfg)
    start = reconstruction_loss(x, optimize_scales_reference(x, cfg.replace(steps=0)), cfg)
    assert np.all(best <= start)


def test_best_scale_is_kept_not_the_last():
    # a learning rate this large makes Adam overshoot; the returned scale must be the best seen
    x = weights(4, 256, seed=7)
    cfg = QuantConfig(bits=4, steps=12, lr=0.5)
    xg, n, _ = group_view(x, None)
    s0 = initial_scales(np.abs(xg).max(axis=1), cfg.qmax)
    losses = []
    u, m, v = np.ones(4), np.zeros(4), np.zeros(4)
    from eqcore.solvers import rowmath
    for t in range(1, 13):
        s = (u * s0).astype(np.float32)
        loss, grad = loss_and_grad(xg, s, cfg.qmin, cfg.qmax)
        losses.append(loss)
        for i in range(4):
            u[i], m[i], v[i] = rowmath.adam_step(u[i], m[i], v[i], grad[i] / (n[i] * s0[i]), t, cfg.lr, 0.9, 0.999, cfg.eps)
    losses = np.array(losses)
    got = reconstruction_loss(x, optimize_scales_reference(x, cfg), cfg)
    np.testing.assert_allclose(got, losses.min(axis=0), rtol=1e-12)
    assert np.any(losses[-1] > losses.min(axis=0))  # the last was not the best somewhere


def test_optimised_scales_beat_max_abs_on_gaussian_weights():
    x = weights(32, 512, seed=8)
    cfg = QuantConfig(bits=4, steps=200, lr=1e-2)
    best = reconstruction_loss(x, optimize_scales_reference(x, cfg), cfg)
    start = reconstruction_loss(x, optimize_scales_reference(x, cfg.replace(steps=0)), cfg)
    assert best.sum() < 0.8 * start.sum()


def test_all_zero_rows_and_all_outlier_rows():
    w = weights(4, 64, seed=9)
    w[1] = 0
    w[2] = 50.0  # a whole row of outliers
    qt = eqcore.quantize(w, bits=4, steps=10, backend="numpy")
    assert np.all(np.isfinite(qt.scales)) and np.all(qt.scales > 0)
    w_hat = dequantize_reference(qt)
    assert np.all(w_hat[1] == 0) and np.all(w_hat[2] == 50.0)


@pytest.mark.parametrize("bad, match", [
    (np.zeros(5, np.float32), "2-D"),
    (np.zeros((0, 4), np.float32), "empty"),
    (np.zeros((2, 3, 4), np.float32), "2-D"),
    (np.array([[1.0, np.nan]], np.float32), "NaN or Inf"),
    (np.array([[1.0, np.inf]], np.float16), "NaN or Inf"),
    (np.ones((4, 4), np.int32), "unsupported weight dtype"),
    ("weights", "expected an array"),
    ([[1, 2], [3]], "inhomogeneous"),
])
def test_bad_weights_are_refused_clearly(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        eqcore.quantize(bad, backend="numpy")


@pytest.mark.parametrize("kw, match", [
    (dict(sigma=-1), "sigma"), (dict(sigma=float("nan")), "sigma"), (dict(group_size=0), "group_size"),
    (dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(outlier_stats="col"), "outlier_stats"),
    (dict(betas=(1.0, 0.9)), "betas"),
])
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kw)


def test_array_like_input_is_accepted():
    qt = eqcore.quantize([[0.5, -0.25, 0.125, 1.0]], bits=8, backend="numpy")
    assert qt.dtype == "float64" and qt.shape == (1, 4)


@pytest.mark.parametrize("scale_dtype, scale_bits", [("float32", 32), ("float16", 16), ("bfloat16", 16)])
def test_bits_per_weight_counts_codes_scales_and_outliers(scale_dtype, scale_bits):
    w = weights(64, 256, seed=10)
    qt = eqcore.quantize(w, bits=4, steps=0, scale_dtype=scale_dtype, backend="numpy")
    nnz = qt.outlier_vals.size
    expected = (64 * 256 * 4 + 64 * scale_bits + 65 * 16 + nnz * (16 + 32)) / (64 * 256)  # uint16 row pointers
    assert qt.bits_per_weight == pytest.approx(expected)
    assert qt.outlier_fraction == nnz / (64 * 256)


def test_row_pointers_are_uint16_up_to_65535_outliers_then_int32():
    assert rowptr_dtype(65535) == np.uint16 and rowptr_dtype(65536) == np.int32
    w = weights(320, 1024, seed=12)
    qt = eqcore.quantize(w, bits=4, sigma=1.0, steps=0)  # about a third of the entries: past 65535
    assert qt.outlier_vals.size > 65535 and qt.outlier_rowptr.dtype == np.int32
    assert qt.nbytes == stored_bytes(w.shape, 4, nnz=qt.outlier_vals.size, weight_itemsize=4, scale_dtype="float16")
    half = [qt.row_block(0, 160), qt.row_block(160, 320)]
    narrow = [dataclasses.replace(b, outlier_rowptr=narrow_rowptr(b.outlier_rowptr)) for b in half]
    assert all(b.outlier_rowptr.dtype == np.uint16 for b in narrow)  # each half holds fewer than 65536
    back = QuantizedTensor.stack_rows(narrow)  # together they need int32 again
    assert back.outlier_rowptr.dtype == np.int32
    np.testing.assert_array_equal(back.outlier_rowptr, qt.outlier_rowptr)
    np.testing.assert_array_equal(eqcore.dequantize(back), eqcore.dequantize(qt))
    wide = dataclasses.replace(narrow[0], outlier_rowptr=narrow[0].outlier_rowptr.astype(np.int32))
    np.testing.assert_array_equal(eqcore.dequantize(wide), eqcore.dequantize(narrow[0]))  # both dtypes read alike
    alone = concat_csr([wide.outliers])  # one block, int32 pointers as older files hold them: narrowed
    assert alone.rowptr.dtype == np.uint16
    np.testing.assert_array_equal(alone.rowptr, narrow[0].outlier_rowptr)
    bad = narrow[0].outlier_rowptr.copy()
    bad[3] = bad[4] + 1  # a decrease that uint16 differences would wrap around
    with pytest.raises(ValueError, match="non-decreasing"):
        dataclasses.replace(narrow[0], outlier_rowptr=bad)


def test_readme_example_runs(tmp_path):
    w = weights(64, 256, seed=11, dtype=np.float16)
    qt = eqcore.quantize(w, bits=4)
    w_hat = eqcore.dequantize(qt)
    assert w_hat.dtype == np.float16 and 4 < qt.bits_per_weight < 5 and 0 < qt.outlier_fraction < 0.05
    eqcore.save_file({"layer.weight": qt}, tmp_path / "q.safetensors")
    back = eqcore.load_file(tmp_path / "q.safetensors")["layer.weight"]
    np.testing.assert_array_equal(eqcore.dequantize(back), w_hat)
