"""Quantized safetensors files: round trip, interoperability, and refusal of malformed files."""
import dataclasses
import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file as st_save

import eqcore
from eqcore.io.fileformat import load_file, save_file
from eqcore.io.safetensors import SafetensorsReader, SafetensorsWriter
from eqcore.tensor import FIELDS, FormatError

from helpers import weights


def _qt(dtype=np.float16, cols=300, **kw):
    return eqcore.quantize(weights(12, cols, seed=1, dtype=dtype), steps=5, backend="numpy", **kw)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("bits, group", [(4, None), (3, 64), (2, 100), (8, None)])
def test_save_load_roundtrip_is_bit_exact(tmp_path, dtype, bits, group):
    qt = _qt(dtype, bits=bits, group_size=group)
    norm = np.arange(12, dtype=dtype)
    save_file({"layer.weight": qt, "layer.norm": norm}, tmp_path / "m.safetensors")
    back = load_file(tmp_path / "m.safetensors")
    assert set(back) == {"layer.weight", "layer.norm"}
    q2 = back["layer.weight"]
    for f in FIELDS:
        a, b = getattr(qt, f), getattr(q2, f)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f
    assert (q2.shape, q2.dtype, q2.bits, q2.group_size, q2.sigma) == (qt.shape, qt.dtype, qt.bits, qt.group_size, qt.sigma)
    assert back["layer.norm"].tobytes() == norm.tobytes() and back["layer.norm"].dtype == norm.dtype


@pytest.mark.parametrize("scale_dtype, rowptr, version", [("float32", np.int32, "1"), ("float16", np.int32, "2"),
                                                           ("float32", np.uint16, "3"), ("float16", np.uint16, "3")])
def test_files_are_readable_by_the_safetensors_package(tmp_path, scale_dtype, rowptr, version):
    qt = _qt(np.float32, scale_dtype=scale_dtype)
    assert qt.outlier_rowptr.dtype == np.uint16  # few outliers: the narrow row pointers
    qt = dataclasses.replace(qt, outlier_rowptr=qt.outlier_rowptr.astype(rowptr))
    save_file({"w": qt, "b": np.ones(3, np.float32)}, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == {"w", "w.qweight", "w.scales", "w.outlier_rowptr", "w.outlier_cols", "w.outlier_vals",
                                 "b"}
        np.testing.assert_array_equal(f.get_tensor("w.qweight"), qt.qweight)
        guard = f.get_tensor("w")  # the weight's own name: an empty guard, never the weight
        assert guard.shape == (0,) and guard.dtype == np.uint8
        meta = f.metadata()
    assert meta["eqcore.format_version"] == version  # the oldest version that holds the tensor
    assert json.loads(meta["eqcore.tensor.w"])["bits"] == 4


def test_reads_files_written_by_the_safetensors_package(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float16).reshape(2, 3), "b": np.arange(4, dtype=np.int64)}
    st_save(arrays, str(tmp_path / "x.safetensors"))
    with SafetensorsReader(tmp_path / "x.safetensors") as r:
        for k, v in arrays.items():
            np.testing.assert_array_equal(r.get(k), v)


def _write_raw(path, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("case, match", [
    ("empty", "shorter than 8 bytes"),
    ("huge_header", "header length"),
    ("not_json", "not valid JSON"),
    ("bad_dtype", "unknown or missing dtype"),
    ("offsets", "outside"),
    ("size", "do not hold"),
    ("overlap", "overlap"),
])
def test_malformed_safetensors_are_refused(tmp_path, case, match):
    p = tmp_path / "bad.safetensors"
    if case == "empty":
        p.write_bytes(b"abc")
    elif case == "huge_header":
        p.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    elif case == "not_json":
        p.write_bytes(struct.pack("<Q", 4) + b"{x:1")
    elif case == "bad_dtype":
        _write_raw(p, {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    elif case == "offsets":
        _write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4)
    elif case == "size":
        _write_raw(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    elif case == "overlap":
        _write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(FormatError, match=match):
        load_file(p)


def _rewrite(src, dst, change_meta=None, change_array=None, drop=None):
    """Copy a quantized file, tampering with it on the way."""
    with SafetensorsReader(src) as r:
        meta = dict(r.metadata)
        if change_meta:
            change_meta(meta)
        with SafetensorsWriter(dst, meta) as w:
            for k in r.keys():
                if k == drop:
                    continue
                a = np.array(r.get(k))
                w.add(k, change_array(k, a) if change_array else a)


def test_files_without_the_guard_read_the_same(tmp_path):
    qt = _qt(np.float16, cols=300)
    save_file({"w": qt}, tmp_path / "ok.safetensors")
    _rewrite(tmp_path / "ok.safetensors", tmp_path / "old.safetensors", drop="w")  # as written before guards
    for f in ("ok", "old"):
        back = load_file(tmp_path / f"{f}.safetensors")
        assert list(back) == ["w"] and back["w"].qweight.tobytes() == qt.qweight.tobytes()


@pytest.mark.parametrize("tamper, match", [
    (dict(change_meta=lambda m: m.update({"eqcore.format_version": "99"})), "version '99' is not supported"),
    (dict(change_meta=lambda m: m.update({"eqcore.tensor.w": "{not json"})), "not JSON"),
    (dict(change_meta=lambda m: m.update({"eqcore.tensor.w": json.dumps({**json.loads(m["eqcore.tensor.w"]), "bits": 5})})), "bits"),
    (dict(change_meta=lambda m: m.update({"eqcore.tensor.w": json.dumps({**json.loads(m["eqcore.tensor.w"]), "shape": [12, 333]})})), "qweight"),
    (dict(change_meta=lambda m: m.pop("eqcore.format_version")), "no eqcore.format_version"),
    (dict(drop="w.scales"), "lacks"),
    (dict(change_array=lambda k, a: a[:-1] if k == "w.outlier_rowptr" else a), "outlier_rowptr"),
    (dict(change_array=lambda k, a: a.astype(np.int64) if k == "w.outlier_cols" else a), "outlier_cols"),
    (dict(change_array=lambda k, a: np.full_like(a, 299 + 1) if k == "w.outlier_cols" else a), "out of range"),
    (dict(change_array=lambda k, a: -a if k == "w.scales" else a), "positive"),
    (dict(change_array=lambda k, a: a.astype(np.float32) if k == "w.outlier_vals" else a), "outlier_vals"),
    (dict(change_array=lambda k, a: np.ones((2, 2), np.float32) if k == "w" else a), "both a plain tensor"),
])
def test_malformed_quantized_files_are_refused_with_a_clear_error(tmp_path, tamper, match):
    save_file({"w": _qt(np.float16, cols=300)}, tmp_path / "ok.safetensors")
    _rewrite(tmp_path / "ok.safetensors", tmp_path / "bad.safetensors", **tamper)
    with pytest.raises(FormatError, match=match):
        load_file(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("col_dtype, n_cols", [(np.uint16, 300), (np.int32, 70000)])
def test_outlier_columns_are_checked_in_their_own_dtype(col_dtype, n_cols):
    from eqcore.outliers import check_csr

    rowptr, vals = np.array([0, 2, 4], np.int32), np.ones(4, np.float16)
    check_csr(rowptr, np.array([5, 9, 0, n_cols - 1], col_dtype), vals, (2, n_cols))  # a new row may go back
    for cols, match in (([9, 5, 0, 1], "strictly increasing"), ([5, 5, 0, 1], "strictly increasing"),
                        ([5, 9, 0, n_cols], "out of range"), ([5, 9, 0, np.iinfo(col_dtype).max], "out of range")):
        with pytest.raises(ValueError, match=match):
            check_csr(rowptr, np.array(cols, col_dtype), vals, (2, n_cols))
    if col_dtype == np.int32:
        with pytest.raises(ValueError, match="out of range"):
            check_csr(rowptr, np.array([-1, 9, 0, 1], col_dtype), vals, (2, n_cols))


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(ValueError, match="duplicate"):
        with SafetensorsWriter(target) as w:
            w.add("a", np.ones(3, np.float32))
            w.add("a", np.ones(3, np.float32))
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("grid", ["symmetric", "codebook"])
def test_built_tensors_are_the_constructors_and_the_tests_validate_them(grid):
    """quantize assembles its result with QuantizedTensor.built (no validation: valid by
    construction); it binds arguments as the constructor does, and in the tests (conftest) every
    built tensor is validated, so an invalid one fails."""
    from eqcore.tensor import QuantizedTensor

    qt = eqcore.quantize(weights(6, 100, seed=2), bits=4, grid=grid, group_size=32, sigma=2.0, steps=2)
    args = [getattr(qt, f) for f in FIELDS]
    meta = dict(shape=list(qt.shape), dtype=qt.dtype, bits=qt.bits, group_size=qt.group_size, sigma=qt.sigma,
                grid=qt.grid, codebook=qt.codebook)
    a, b = QuantizedTensor(*args, **meta), QuantizedTensor.built(*args, **meta)
    assert a.metadata() == b.metadata() and a.shape == b.shape == qt.shape
    assert all(a.arrays()[k] is b.arrays()[k] for k in a.arrays()) and a.arrays().keys() == b.arrays().keys()
    bad = dict(meta, bits=3)  # the packed words no longer match the shape
    with pytest.raises(FormatError):
        QuantizedTensor.built(*args, **bad)
