"""Cheaper metadata and other outlier selectors: float16 / bfloat16 scales, the AdpQ and budget
selectors; every option round-trips through the file format and dequantizes alike everywhere."""
import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest

import eqcore
from eqcore.config import QuantConfig
from eqcore.backends.numpy import dequantize as dequantize_reference
from eqcore.io.fileformat import load_file, save_file
from eqcore.io.safetensors import SafetensorsReader
from eqcore.outliers import adpq_mask, budget_mask

from helpers import weights

BF16 = np.dtype(ml_dtypes.bfloat16)


def sq_err(qt, w):
    return float(np.sum((eqcore.dequantize(qt, np.float32).astype(np.float64) - w.astype(np.float64)) ** 2))


@pytest.mark.parametrize("scale_dtype, worst", [("float16", 2e-3), ("bfloat16", 3e-2)])
def test_narrow_scales_cost_little_and_are_counted(scale_dtype, worst):
    w = weights(64, 512, seed=1)
    full = eqcore.quantize(w, bits=4, group_size=128, solver="exact")
    narrow = eqcore.quantize(w, bits=4, group_size=128, solver="exact", scale_dtype=scale_dtype)
    assert narrow.scales.dtype == np.dtype(scale_dtype if scale_dtype != "bfloat16" else BF16)
    assert sq_err(narrow, w) <= sq_err(full, w) * (1 + worst)
    saved = full.scales.nbytes - narrow.scales.nbytes
    assert full.bits_per_weight - narrow.bits_per_weight == pytest.approx(8 * saved / w.size)
    for backend in ("numba", "numpy"):
        np.testing.assert_array_equal(eqcore.dequantize(narrow, backend=backend).view(np.uint32),
                                      dequantize_reference(narrow).view(np.uint32))


def test_float16_scales_of_tiny_or_huge_weights():
    w = weights(4, 64, seed=2) * 1e-9  # scales below float16's range: floored at its smallest value
    qt = eqcore.quantize(w, bits=4, scale_dtype="float16")
    assert np.all(qt.scales.astype(np.float32) > 0)
    assert np.all(np.abs(eqcore.dequantize(qt) - w) <= np.abs(w).max())
    big = weights(4, 64, seed=3).astype(np.float32) * 1e7  # scales above it: capped, finite
    qt = eqcore.quantize(big, bits=4, scale_dtype="float16", sigma=None)
    assert np.all(np.isfinite(qt.scales.astype(np.float32))) and np.all(np.isfinite(eqcore.dequantize(qt)))


def test_files_say_version_2_or_3_only_when_they_need_it(tmp_path):
    w = weights(8, 96, seed=4, dtype=np.float16)

    def wide(qt):  # int32 row pointers, as files before version 3 hold them
        return dataclasses.replace(qt, outlier_rowptr=qt.outlier_rowptr.astype(np.int32))

    v1 = dict(steps=2, scale_dtype="float32")  # what version 1 holds (the default fp16 scales need version 2)
    a, b = eqcore.quantize(w, **v1), eqcore.quantize(w, steps=2, scale_dtype="float16")
    assert a.outlier_rowptr.dtype == b.outlier_rowptr.dtype == np.uint16  # what version 3 adds
    save_file({"a": wide(a)}, tmp_path / "v1.safetensors")
    save_file({"a": wide(a), "b": wide(b)}, tmp_path / "v2.safetensors")
    save_file({"a": wide(a), "b": b}, tmp_path / "v3.safetensors")
    for name, version in (("v1", "1"), ("v2", "2"), ("v3", "3")):
        with SafetensorsReader(tmp_path / f"{name}.safetensors") as r:
            assert r.metadata["eqcore.format_version"] == version
    back = load_file(tmp_path / "v3.safetensors")
    assert back["b"].scales.dtype == np.float16 and back["a"].scales.dtype == np.float32
    assert back["a"].outlier_rowptr.dtype == np.int32 and back["b"].outlier_rowptr.dtype == np.uint16
    for name in "ab":
        np.testing.assert_array_equal(eqcore.dequantize(back[name]), eqcore.dequantize({"a": a, "b": b}[name]))


def test_adpq_threshold_is_robust_to_the_outliers_themselves():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    w[:, :8] = 1e3  # huge entries inflate the std (sigma rule misses the milder ones) but not the MAD
    w[:, 8:12] = 6.0
    mask = adpq_mask(w, 4.0, None)
    assert mask[:, :12].all() and mask[:, 12:].mean() < 0.01
    sig = eqcore.find_outliers(w, 4.0, "row")[1]
    assert not sig[:, 8:12].any()  # the 6-sigma entries hide behind the inflated std
    assert adpq_mask(w, 4.0, 64)[:, :12].all()  # per group of 64 as well


def test_budget_spends_itself_where_removal_helps_most():
    from eqcore.solvers.objective import reconstruction_loss
    from eqcore.config import QuantConfig
    from eqcore.solvers import exact

    w = weights(4, 64, seed=7)
    w[2, [5, 17, 40]] = [0.9, -0.8, 0.7]  # three far-out entries in one row
    cfg = QuantConfig(bits=4, solver="exact")
    losses = lambda x: reconstruction_loss(x, exact.optimize_scales(x, cfg), cfg)  # noqa: E731
    m = budget_mask(w, 3 / w.size, losses)
    assert m.sum() == 3 and m[2, [5, 17, 40]].all()
    assert budget_mask(w, 0.0, losses).sum() == 0


def test_budget_selector_beats_the_sigma_rule_at_the_same_count():
    w = weights(128, 512, seed=6)
    sig = eqcore.quantize(w, bits=3, solver="exact", sigma=3.0)
    frac = sig.outlier_fraction
    bud = eqcore.quantize(w, bits=3, solver="exact", outliers="budget", outlier_fraction=frac)
    assert bud.outlier_vals.size == pytest.approx(sig.outlier_vals.size, abs=1)
    assert sq_err(bud, w) < sq_err(sig, w)
    meta = json.loads(json.dumps(bud.metadata()))
    assert meta["sigma"] is None


@pytest.mark.parametrize("kw, match", [(dict(outliers="magic"), "outliers must be one of"),
                                       (dict(outlier_fraction=0.7), "outlier_fraction"),
                                       (dict(scale_dtype="int8"), "scale_dtype")])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        eqcore.QuantConfig(**kw)


def test_defaults_are_the_tune_splits_choice_and_paper_is_the_paper():
    d, p = QuantConfig(), QuantConfig.paper(bits=3)
    assert (d.outlier_stats, d.scale_dtype, d.solver_name) == ("row", "float16", "exact")
    assert (p.bits, p.outlier_stats, p.scale_dtype, p.solver_name) == (3, "tensor", "float32", "adam")
    assert QuantConfig(steps=0).solver_name == "adam" and QuantConfig(steps=0, solver="exact").solver_name == "exact"
    w = weights(8, 96, seed=6)
    rtn = eqcore.quantize(w, sigma=None, steps=0)  # steps=0 keeps the max-abs scales: RTN
    want = (np.abs(w).max(axis=1, keepdims=True) / 7).astype(np.float16)
    np.testing.assert_array_equal(rtn.scales, want)
    ex = eqcore.quantize(w, sigma=None)
    assert not np.array_equal(ex.scales, rtn.scales)
