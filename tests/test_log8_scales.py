""""log8" scales: a uint8 code per group under a float16 scale per row (s = row * 2^(-q/32)).
Exact round trip of the stored form, the rounding's error bound, the bits it saves (counted
exactly), every backend and the file format alike, and clear refusals of malformed tensors."""
import dataclasses

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import eqcore
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.errors import FormatError
from eqcore.io.fileformat import load_file, save_file
from eqcore.io.safetensors import SafetensorsReader
from eqcore.layout import LOG8, LOG8_STEP, float_scales, round_scales, split_log8, stored_bytes
from eqcore.tensor import QuantizedTensor

from helpers import assert_matmul_close, weights

STEP = 2.0 ** (1 / LOG8_STEP)  # ratio of neighbouring codes


def test_table_is_the_documented_one():
    assert LOG8.dtype == np.float32 and LOG8.shape == (256,) and LOG8[0] == 1.0
    np.testing.assert_allclose(LOG8[1:] / LOG8[:-1], 1 / STEP, rtol=1e-6)


scales_st = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)),
                       elements=st.floats(2.0 ** -20, 1024.0, width=32))


@settings(max_examples=200, deadline=None)
@given(scales_st)
@example(np.array([[1e-6]], np.float32))  # a float16-subnormal row scale that rounded up past a code step
@example(np.array([[3.3e-7, 1e-7]], np.float32))
def test_rounding_is_stored_exactly_and_is_close(s):
    r = round_scales(s, "log8")
    q, rows = split_log8(r)
    assert q.dtype == np.uint8 and rows.dtype == np.float16 and rows.shape == (s.shape[0],)
    np.testing.assert_array_equal(float_scales(q, rows), r)  # the stored form gives back every value
    top = s.max(axis=1, keepdims=True).astype(np.float64)
    normal = top >= np.finfo(np.float16).tiny  # float16 subnormals are coarser than a code step
    assert np.all((rows == top[:, 0].astype(np.float16))[normal[:, 0]])  # the row scale: each row's largest
    assert np.all((np.abs(rows.astype(np.float64) - top[:, 0]) <= 2.0 ** -24)[~normal[:, 0]])  # else a subnormal step
    in_range = (s >= top * LOG8[-1] * STEP) & normal  # the rest are clipped to the row's smallest step
    ratio = r.astype(np.float64) / s
    bound = np.sqrt(STEP) * (1 + 2.0 ** -11) * (1 + 2.0 ** -23) ** 2
    assert np.all(ratio[in_range] <= bound) and np.all(ratio[in_range] >= 1 / bound)
    floor = np.broadcast_to(rows[:, None].astype(np.float32) * LOG8[-1], s.shape)
    clipped = (s < top * LOG8[-1] * STEP)
    assert np.all(r[clipped] >= floor[clipped])


@pytest.mark.parametrize("grid", ["symmetric", "codebook", "asymmetric"])
def test_log8_saves_what_it_says_at_a_small_cost(grid):
    w = weights(64, 576, seed=11)
    kw = dict(bits=4, group_size=128, grid=grid)
    f16 = eqcore.quantize(w, scale_dtype="float16", **kw)
    log8 = eqcore.quantize(w, scale_dtype="log8", **kw)
    assert log8.scales.dtype == np.uint8 and log8.row_scales.dtype == np.float16
    rows, cols = w.shape
    saved = rows * log8.n_groups - 2 * rows  # a byte per group, two back per row
    assert f16.bits_per_weight - log8.bits_per_weight == pytest.approx(8 * saved / w.size)
    assert log8.nbytes == stored_bytes(w.shape, 4, 128, nnz=log8.outlier_vals.size, weight_itemsize=4, grid=grid,
                                       scale_dtype="log8")
    err = [float(np.sum((eqcore.dequantize(qt, np.float32) - w) ** 2)) for qt in (f16, log8)]
    assert err[1] <= err[0] * 1.01  # a 1.1% scale step, codes chosen for it, costs well under 1%
    for backend in ("numba", "numpy"):
        np.testing.assert_array_equal(eqcore.dequantize(log8, backend=backend).view(np.uint32),
                                      dequantize_reference(log8).view(np.uint32))
    x = np.random.default_rng(0).standard_normal((3, cols)).astype(np.float32)
    for backend in ("numba", "numpy"):
        assert_matmul_close(eqcore.matmul(x, log8, backend=backend), x, log8)


def test_row_blocks_and_stacking_alike(monkeypatch):
    from eqcore import api

    w = weights(700, 640, seed=12)
    whole = eqcore.quantize(w, bits=3, group_size=64, scale_dtype="log8")
    monkeypatch.setattr(api, "ROW_BLOCK_ELEMENTS", 256 * 640)  # the fused row-blocked path, 3 blocks
    blocked = eqcore.quantize(w, bits=3, group_size=64, scale_dtype="log8")
    stacked = QuantizedTensor.stack_rows([eqcore.quantize(w[r:r + 256], bits=3, group_size=64, scale_dtype="log8")
                                          for r in range(0, 700, 256)])
    for qt in (blocked, stacked):
        for f in ("qweight", "scales", "row_scales", "outlier_vals"):
            np.testing.assert_array_equal(getattr(whole, f), getattr(qt, f))
    other = eqcore.quantize(w[:10], bits=3, group_size=64, scale_dtype="float16")
    with pytest.raises(ValueError, match="different tensors or settings"):
        QuantizedTensor.stack_rows([whole, other])
    block = whole.row_block(100, 300)
    np.testing.assert_array_equal(eqcore.dequantize(block), eqcore.dequantize(whole)[100:300])


def test_files_with_log8_say_version_4_and_read_back(tmp_path):
    w = weights(16, 256, seed=13, dtype=np.float16)
    a, b = eqcore.quantize(w, group_size=64), eqcore.quantize(w, group_size=64, scale_dtype="log8")
    save_file({"a": a}, tmp_path / "a.safetensors")
    save_file({"a": a, "b": b}, tmp_path / "ab.safetensors")
    with SafetensorsReader(tmp_path / "a.safetensors") as r:
        assert r.metadata["eqcore.format_version"] == "3"  # older files stay readable by older readers
    with SafetensorsReader(tmp_path / "ab.safetensors") as r:
        assert r.metadata["eqcore.format_version"] == "4"
    back = load_file(tmp_path / "ab.safetensors")["b"]
    for f in ("qweight", "scales", "row_scales"):
        np.testing.assert_array_equal(getattr(back, f), getattr(b, f))
    np.testing.assert_array_equal(eqcore.dequantize(back), eqcore.dequantize(b))


def test_malformed_log8_tensors_are_refused():
    qt = eqcore.quantize(weights(8, 128, seed=14), group_size=32, scale_dtype="log8")
    with pytest.raises(FormatError, match="row_scales are present exactly"):
        dataclasses.replace(qt, row_scales=None)
    with pytest.raises(FormatError, match="row_scales are present exactly"):
        dataclasses.replace(qt, scales=qt.float_scales().astype(np.float16))
    with pytest.raises(FormatError, match="row_scales must be float16"):
        dataclasses.replace(qt, row_scales=qt.row_scales.astype(np.float32))
    with pytest.raises(FormatError, match="row_scales must be float16"):
        dataclasses.replace(qt, row_scales=qt.row_scales[:-1])
    with pytest.raises(FormatError, match="finite and positive"):
        dataclasses.replace(qt, row_scales=np.zeros_like(qt.row_scales))


def test_cli_offers_log8(tmp_path):
    from eqcore.cli import main
    save_file({"layer.weight": weights(32, 256, seed=15, dtype=np.float16)}, tmp_path / "m.safetensors")
    assert main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "q.safetensors"),
                 "--group-size", "64", "--scale-dtype", "log8"]) == 0
    qt = load_file(tmp_path / "q.safetensors")["layer.weight"]
    assert qt.scales.dtype == np.uint8 and qt.row_scales.shape == (32,)
