"""Reliability: eqcore never loses or damages data, never writes out of bounds, never crashes
the process and never returns a silently wrong value. One test per failure mode found by
trying it as a new user would (and with deliberately bad input)."""
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file as st_save

import eqcore
from eqcore import FormatError, QuantizedTensor
from eqcore import interrupts
from eqcore.interrupts import Terminated, raised_at_safe_points

from helpers import weights

INDEX = "model.safetensors.index.json"
BF16 = np.dtype(ml_dtypes.bfloat16)
FINFO_MAX = {"float16": 65504.0, "bfloat16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
             "float32": float(np.finfo(np.float32).max)}


def cli(*args, timeout=120, **kw):
    """Run the `eqcore` command line in a fresh process: (returncode, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, **kw)
    return r.returncode, r.stdout, r.stderr


def one_line_error(rc, err, *needles):
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in err, (n, err)


def model_tensors(seed=0):
    return {
        "model.embed_tokens.weight": weights(40, 32, seed=seed, dtype=np.float16),
        "model.layers.0.self_attn.q_proj.weight": weights(32, 32, seed=seed + 1, dtype=np.float16),
        "model.layers.0.mlp.up_proj.weight": weights(48, 32, seed=seed + 2, dtype=np.float16),
        "model.layers.0.input_layernorm.weight": np.ones(32, np.float16),
        "model.layers.1.mlp.down_proj.weight": weights(32, 48, seed=seed + 3, dtype=np.float16),
    }


def write_sharded(folder: Path, tensors=None, n_shards=2, subfolders=None, metadata=None):
    """A transformers-style sharded folder (index, config, tokenizer files)."""
    tensors = tensors or model_tensors()
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        if subfolders:
            shard = f"{subfolders[i]}/model.safetensors"
            (folder / subfolders[i]).mkdir(exist_ok=True)
        part = {k: tensors[k] for k in names[i::n_shards]}
        st_save(part, str(folder / shard), metadata=metadata)
        weight_map.update({k: shard for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def tree(folder: Path) -> dict:
    """{relative path: bytes (files) / '->target' (links)} of a folder, for before/after checks."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "->" + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
        elif p.is_dir():
            out[rel] = "dir"
    return out


def read_all(path):
    """Every tensor of a plain safetensors file through the reference `safetensors` package."""
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---------------------------------------------------------------------------------------------
# Data loss
# ---------------------------------------------------------------------------------------------
def test_force_never_replaces_the_folder_that_holds_the_input(tmp_path):
    p = tmp_path / "p"
    write_sharded(p / "model")
    (p / "notes.txt").write_text("mine")
    before = tree(p)
    rc, _, err = cli("quantize", p / "model", p, "--force", "--no-progress")
    one_line_error(rc, err, "contains the input")
    assert tree(p) == before


def test_force_never_replaces_an_input_shard(tmp_path):
    m = write_sharded(tmp_path / "m")
    before = tree(m)
    rc, _, err = cli("quantize", m, m / "model-00001-of-00002.safetensors", "--force", "--no-progress")
    one_line_error(rc, err, "inside the input")
    assert tree(m) == before


def test_output_inside_the_input_folder_is_refused(tmp_path):
    m = write_sharded(tmp_path / "m")
    before = tree(m)
    rc, _, err = cli("quantize", m, m / "q", "--no-progress")
    one_line_error(rc, err, "inside the input")
    assert tree(m) == before


def test_force_replaces_only_earlier_eqcore_outputs_or_empty_places(tmp_path):
    m = write_sharded(tmp_path / "m")
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    rc, _, err = cli("quantize", m, user, "--force", "--no-progress")
    one_line_error(rc, err, "not an earlier eqcore output")
    assert (user / "thesis.tex").read_text() == "years of work"

    (tmp_path / "user.safetensors").write_bytes(b"not ours")
    rc, _, err = cli("quantize", m / "model-00001-of-00002.safetensors", tmp_path / "user.safetensors",
                     "--force", "--no-progress")
    one_line_error(rc, err, "not an earlier eqcore output")
    assert (tmp_path / "user.safetensors").read_bytes() == b"not ours"

    (tmp_path / "empty").mkdir()  # an empty folder may be replaced
    eqcore.quantize_checkpoint(m, tmp_path / "empty", overwrite=True, progress=False)
    assert (tmp_path / "empty" / INDEX).is_file()
    eqcore.quantize_checkpoint(m, tmp_path / "empty", overwrite=True, progress=False)  # our own output: again
    (tmp_path / "empty" / "added-by-user.txt").write_text("keep me")  # ... unless the user put files in it
    with pytest.raises(ValueError, match="added-by-user.txt"):
        eqcore.quantize_checkpoint(m, tmp_path / "empty", overwrite=True, progress=False)
    assert (tmp_path / "empty" / "added-by-user.txt").read_text() == "keep me"


def test_force_replaces_an_earlier_single_file_output_with_new_content(tmp_path):
    src = tmp_path / "m.safetensors"
    st_save(model_tensors(), str(src))
    eqcore.quantize_checkpoint(src, tmp_path / "q.safetensors", eqcore.QuantConfig(bits=8), progress=False)
    eqcore.quantize_checkpoint(src, tmp_path / "q.safetensors", eqcore.QuantConfig(bits=3), overwrite=True,
                               progress=False)
    q = eqcore.load_file(tmp_path / "q.safetensors")
    assert q["model.layers.0.mlp.up_proj.weight"].bits == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "q.safetensors"]


def test_shards_with_the_same_name_in_different_subfolders_keep_their_paths(tmp_path):
    t = model_tensors()
    m = write_sharded(tmp_path / "m", t, subfolders=["a", "b"])
    eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    eqcore.dequantize_checkpoint(tmp_path / "q", tmp_path / "d", progress=False)
    index = json.loads((tmp_path / "d" / INDEX).read_text())
    assert set(index["weight_map"]) == set(t)
    assert set(index["weight_map"].values()) == {"a/model.safetensors", "b/model.safetensors"}
    got = {}
    for shard in ("a", "b"):
        got.update(read_all(tmp_path / "d" / shard / "model.safetensors")[0])
    assert set(got) == set(t)


def test_the_whole_tree_of_other_files_is_copied(tmp_path):
    m = write_sharded(tmp_path / "m")
    (m / "tokenizer").mkdir()
    (m / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (m / "1_Pooling").mkdir()
    (m / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (m / "modules.json").write_text("[]")
    eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    assert (tmp_path / "q" / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert (tmp_path / "q" / "1_Pooling" / "config.json").read_text() == '{"pooling_mode_mean_tokens": true}'
    assert (tmp_path / "q" / "modules.json").read_text() == "[]"


def test_safetensors_metadata_of_the_input_is_kept(tmp_path):
    m = write_sharded(tmp_path / "m", metadata={"format": "pt"})
    eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    eqcore.dequantize_checkpoint(tmp_path / "q", tmp_path / "d", progress=False)
    for out in ("q", "d"):
        for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
            _, meta = read_all(tmp_path / out / shard)
            assert meta["format"] == "pt", (out, shard, meta)
    _, meta = read_all(tmp_path / "d" / "model-00001-of-00002.safetensors")
    assert not any(k.startswith("eqcore.tensor.") for k in meta)  # dense output: no stale quantized entries


def test_index_with_an_empty_weight_map_is_refused(tmp_path):
    m = write_sharded(tmp_path / "m")
    (m / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(ValueError, match="empty weight_map"):
        eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    t = model_tensors()
    m = write_sharded(tmp_path / "m", t)
    # shard 2 also holds a tensor the index assigns to shard 1
    name = "model.embed_tokens.weight"
    part = read_all(m / "model-00002-of-00002.safetensors")[0]
    st_save({**part, name: t[name]}, str(m / "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="two shards|more than one shard"):
        eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    # an index JSON naming one tensor twice
    text = (m / INDEX).read_text().replace('"weight_map": {', f'"weight_map": {{"{name}": "model-00002-of-00002.safetensors", ')
    write_sharded(tmp_path / "m2")
    (tmp_path / "m2" / INDEX).write_text(text)
    with pytest.raises(ValueError, match="twice"):
        eqcore.quantize_checkpoint(tmp_path / "m2", tmp_path / "q2", progress=False)


# ---------------------------------------------------------------------------------------------
# Out of bounds and crashes
# ---------------------------------------------------------------------------------------------
TAMPER = r"""
import sys, numpy as np, eqcore
w = np.random.default_rng(0).standard_t(3, size=(64, 300)).astype(np.float32)
qt = eqcore.quantize(w, bits=4, steps=2, backend="numpy")
how, backend = sys.argv[1], sys.argv[2]
if how == "cols":
    qt.outlier_cols[:] = 60000
elif how == "rowptr":
    qt.outlier_rowptr[-1] += 60000  # past every entry, in the range of the uint16 row pointers
elif how == "rowptr_mid":
    qt.outlier_rowptr[5] = 60000
try:
    eqcore.dequantize(qt, backend=backend)
except (ValueError, eqcore.FormatError) as e:
    print("refused:", e)
    sys.exit(3)
sys.exit(0)
"""


@pytest.mark.parametrize("how", ["cols", "rowptr", "rowptr_mid"])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_dequantize_checks_outliers_changed_after_construction(how, backend):
    r = subprocess.run([sys.executable, "-c", TAMPER, how, backend], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "outlier" in r.stdout


def test_gpu_dequant_launch_plan_checks_the_outliers():
    """The CUDA kernel writes through the CSR: its launch plan must refuse indices outside the output."""
    from eqcore.backends import launch

    out = np.zeros((2, 10), np.float32)
    q, s = np.zeros((2, 4), np.uint32), np.ones((2, 1), np.float32)
    vals = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="outlier"):  # column 10 of a 10-column matrix
        launch.dequant_launch(q, s, np.array([0, 1, 2], np.int32), np.array([3, 10], np.uint16), vals, out, 4, None)
    with pytest.raises(ValueError, match="outlier"):  # rowptr past the outliers
        launch.dequant_launch(q, s, np.array([0, 1, 5], np.int32), np.array([3, 4], np.uint16), vals, out, 4, None)


TRUNCATE = r"""
import os, sys, numpy as np, eqcore
path = sys.argv[1]
t = eqcore.load_file(path)
os.truncate(path, 8)
print(float(np.asarray(t["big"], dtype=np.float64).sum()))
"""


def test_load_file_survives_the_file_being_truncated(tmp_path):
    p = tmp_path / "f.safetensors"
    st_save({"big": np.ones(1 << 20, np.float32)}, str(p))
    r = subprocess.run([sys.executable, "-c", TRUNCATE, str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert float(r.stdout) == float(1 << 20)


def test_load_file_mmap_is_an_explicit_read_only_opt_in(tmp_path):
    p = tmp_path / "f.safetensors"
    st_save({"a": np.arange(6, dtype=np.float32)}, str(p))
    copied = eqcore.load_file(p)["a"]
    assert copied.flags.writeable  # a private copy, not a view of the file
    mapped = eqcore.load_file(p, mmap=True)["a"]
    assert not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, copied)
    assert "SIGBUS" in eqcore.load_file.__doc__


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_named_like_a_shard_is_not_opened(tmp_path):
    m = tmp_path / "m"
    m.mkdir()
    st_save(model_tensors(), str(m / "model.safetensors"))
    os.mkfifo(m / "trap.safetensors")
    rc, out, err = cli("quantize", m, tmp_path / "q", "--no-progress", timeout=120)
    assert rc == 0, err
    assert "trap.safetensors" in err  # said it was skipped
    assert (tmp_path / "q" / "model.safetensors").is_file() and not (tmp_path / "q" / "trap.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Silent wrong answers
# ---------------------------------------------------------------------------------------------
@settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(["float16", "bfloat16", "float32"]), bits=st.sampled_from([2, 3, 4, 8]),
       frac=st.floats(0.5, 1.0), sign=st.sampled_from([1.0, -1.0]), steps=st.sampled_from([0, 5, 50]),
       group=st.sampled_from([None, 8]), sigma=st.sampled_from([None, 3.0]), seed=st.integers(0, 2**16),
       tail=st.booleans(), scale_dtype=st.sampled_from(["float16", "log8"]))
def test_weights_near_the_dtype_max_dequantize_to_finite_values(dtype, bits, frac, sign, steps, group, sigma, seed,
                                                                  tail, scale_dtype):
    dt = np.dtype(BF16 if dtype == "bfloat16" else dtype)
    top = FINFO_MAX[dtype]
    rng = np.random.default_rng(seed)
    w = (rng.uniform(-1, 1, size=(6, 40)) * top * frac)
    if tail:  # most entries small, a few at the top: those become outliers
        w[:, 3:] *= 1e-3
    w[0, 0] = sign * top  # the dtype's largest finite value
    w = w.astype(dt)
    assert np.all(np.isfinite(w.astype(np.float64)))
    for backend in ("numpy", "numba"):
        qt = eqcore.quantize(w, bits=bits, steps=steps, group_size=group, sigma=sigma, backend=backend,
                             scale_dtype=scale_dtype)
        for out in ("float16", "bfloat16", "float32", "float64"):
            d = eqcore.dequantize(qt, out, backend=backend).astype(np.float64)
            assert np.all(np.isfinite(d)), (backend, out)
        d = eqcore.dequantize(qt, backend=backend).astype(np.float64)
        # and still a quantization of w: half a step from the grid, or clipped at qmax * s,
        # plus the rounding of the result into the weight dtype
        s = np.repeat(qt.float_scales().astype(np.float64), qt.shape[1] if group is None else group, axis=1)[:, :40]
        a = np.abs(w.astype(np.float64))
        qmax = (1 << (bits - 1)) - 1
        ulp = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24}[dtype]
        bound = np.maximum(s / 2, a - qmax * s) * (1 + 1e-6) + np.abs(d) * ulp
        assert np.all(np.abs(d - w.astype(np.float64)) <= bound), backend


@pytest.mark.parametrize("big", [1e39, 1e300, -1e39])
def test_float64_beyond_float32_range_is_refused(big):
    w = weights(8, 64, dtype=np.float64)
    w[3, 5] = big
    with pytest.raises(ValueError, match="float32"):
        eqcore.quantize(w, backend="numpy")
    with pytest.raises(ValueError, match="float32"):
        eqcore.quantize(w, sigma=None, backend="numba")


def _quantized_file(tmp_path, cols=96, dtype=np.float16, **kw):
    qt = eqcore.quantize(weights(12, cols, seed=3, dtype=dtype), steps=3, backend="numpy", **kw)
    path = tmp_path / "ok.safetensors"
    eqcore.save_file({"w": qt, "norm": np.ones(4, np.float32)}, path)
    return path, qt


def _rewrite_raw(src, dst, meta_fn=None, tensor_fn=None, drop=()):
    """Re-emit a safetensors file with its header or tensors changed (no eqcore code involved)."""
    raw = Path(src).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", {})
    if meta_fn:
        meta_fn(meta)
    tensors = {}
    for k, e in header.items():
        if k in drop:
            continue
        b0, b1 = e["data_offsets"]
        tensors[k] = (e["dtype"], e["shape"], data[b0:b1])
    if tensor_fn:
        tensor_fn(tensors)
    new, blob, off = {"__metadata__": meta}, b"", 0
    for k, (dt, shape, b) in tensors.items():
        new[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        blob += b
        off += len(b)
    h = json.dumps(new).encode()
    Path(dst).write_bytes(struct.pack("<Q", len(h)) + h + blob)


def _set_meta(field, value):
    def fn(meta):
        m = json.loads(meta["eqcore.tensor.w"])
        m[field] = value
        meta["eqcore.tensor.w"] = json.dumps(m)
    return fn


def test_metadata_that_changes_the_column_count_is_refused(tmp_path):
    path, _ = _quantized_file(tmp_path, cols=96)
    _rewrite_raw(path, tmp_path / "bad.safetensors", meta_fn=_set_meta("shape", [12, 90]))
    with pytest.raises(FormatError, match="padding"):
        eqcore.load_file(tmp_path / "bad.safetensors")


def test_orphan_quantized_parts_are_refused(tmp_path):
    path, _ = _quantized_file(tmp_path)
    _rewrite_raw(path, tmp_path / "bad.safetensors", meta_fn=lambda m: m.pop("eqcore.tensor.w"))
    with pytest.raises(FormatError, match="orphan"):
        eqcore.load_file(tmp_path / "bad.safetensors")
    rc, _, err = cli("dequantize", tmp_path / "bad.safetensors", tmp_path / "d.safetensors", "--no-progress")
    one_line_error(rc, err, "orphan")
    assert not (tmp_path / "d.safetensors").exists()


def _f32(value):
    return np.array([value], np.float32).tobytes()


@pytest.mark.parametrize("what, value, match", [
    ("scales", 1e38, "overflow"),
    ("scales", float("nan"), "finite"),
    ("scales", float("inf"), "finite"),
    ("outlier_vals", float("nan"), "finite"),
    ("outlier_vals", float("inf"), "finite"),
])
def test_non_finite_or_overflowing_values_are_refused(tmp_path, what, value, match):
    path, qt = _quantized_file(tmp_path, dtype=np.float32)
    assert qt.outlier_vals.size

    def tamper(tensors):
        dt, shape, b = tensors[f"w.{what}"]
        tensors[f"w.{what}"] = (dt, shape, _f32(value) + b[4:])
    _rewrite_raw(path, tmp_path / "bad.safetensors", tensor_fn=tamper)
    with pytest.raises(FormatError, match=match):
        eqcore.load_file(tmp_path / "bad.safetensors")


def test_scales_that_overflow_the_weight_dtype_are_refused_by_the_constructor():
    qt = eqcore.quantize(weights(4, 64, dtype=np.float16), steps=0, backend="numpy")
    scales = qt.scales.copy()
    scales[1, 0] = 65504.0 / 7 * 1.01  # 7 * s > float16 max
    with pytest.raises(FormatError, match="overflow"):
        QuantizedTensor(qt.qweight, scales, *qt.outliers, shape=qt.shape, dtype=qt.dtype, bits=4)


def test_inspect_against_a_different_shape_is_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    st_save({"w": weights(32, 64, dtype=np.float16)}, str(a))
    st_save({"w": weights(32, 32, dtype=np.float16)}, str(b))
    eqcore.quantize_checkpoint(a, tmp_path / "q.safetensors", skip="", progress=False)
    rc, _, err = cli("inspect", tmp_path / "q.safetensors", "--against", b)
    one_line_error(rc, err, "shape")


def test_dequantize_of_a_checkpoint_without_quantized_tensors_says_so(tmp_path):
    src = tmp_path / "m.safetensors"
    st_save(model_tensors(), str(src))
    rc, _, err = cli("dequantize", src, tmp_path / "d.safetensors", "--no-progress")
    one_line_error(rc, err, "no quantized tensor")
    assert not (tmp_path / "d.safetensors").exists()
    rc, _, err = cli("dequantize", src, tmp_path / "d.safetensors", "--no-progress", "--allow-none")
    assert rc == 0, err
    assert read_all(tmp_path / "d.safetensors")[0].keys() == model_tensors().keys()


# ---------------------------------------------------------------------------------------------
# Unsafe acceptance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["../outside.safetensors", "ABSOLUTE"])
def test_index_paths_that_leave_the_folder_are_refused(tmp_path, target):
    outside = tmp_path / "outside.safetensors"
    st_save({"secret": np.ones((32, 32), np.float16)}, str(outside))
    m = write_sharded(tmp_path / "m")
    index = json.loads((m / INDEX).read_text())
    index["weight_map"]["secret"] = str(outside) if target == "ABSOLUTE" else target
    (m / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


def test_symlinks_leaving_the_folder_are_not_followed_and_in_tree_links_stay_links(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    m = write_sharded(tmp_path / "m")
    os.symlink(secret, m / "passwd")
    with pytest.raises(ValueError, match="outside"):
        eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()
    (m / "passwd").unlink()
    os.symlink("config.json", m / "config-link.json")
    eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
    link = tmp_path / "q" / "config-link.json"
    assert link.is_symlink() and os.readlink(link) == "config.json"
    assert link.read_text() == (tmp_path / "q" / "config.json").read_text()  # the marked copy


# ---------------------------------------------------------------------------------------------
# Clean failure
# ---------------------------------------------------------------------------------------------
def _slow_model(folder):
    """Big enough that a conversion with many Adam steps takes a few seconds."""
    folder.mkdir()
    st_save({f"layers.{i}.proj.weight": weights(512, 512, seed=i, dtype=np.float16) for i in range(6)},
            str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    return folder


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_clean_up_and_say_so(tmp_path, sig, code):
    m = _slow_model(tmp_path / "m")
    # SIGINT as a terminal delivers it, even where the test runs in a background job (which inherits it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "eqcore.cli", "quantize", str(m), str(tmp_path / "q"),
                             "--solver", "adam", "--steps", "100000", "--no-progress"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(".eqcore" in n for n in os.listdir(tmp_path)):
        time.sleep(0.05)
    assert any(".eqcore" in n for n in os.listdir(tmp_path)), "conversion never started"
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    # a signal that lands in the JIT compiler is held until it finishes, with one line saying so
    one_line_error(proc.returncode, "\n".join(l for l in err.splitlines() if "JIT compiler finishes" not in l))
    assert _leftovers(tmp_path, {"m"}) == []


def _signal_self_then_spin(sig):
    os.kill(os.getpid(), sig)  # delivered at the next bytecode, in this frame
    for _ in range(10_000):
        pass
    return "finished"


@pytest.fixture
def sigint_as_in_a_terminal():
    """Python's own SIGINT handler, even where the tests run in a background job (CI), which
    inherits SIGINT ignored, a state raised_at_safe_points keeps."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("sig, exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_in_a_finalizer_is_not_swallowed(sig, exc, sigint_as_in_a_terminal):
    """Python prints and drops an exception raised in __del__ (as in llvmlite's), so a plain
    handler lets the conversion run on after Ctrl-C; the signal must arrive after it instead."""
    class Finalized:
        def __del__(self):
            _signal_self_then_spin(sig)

    with pytest.raises(exc), raised_at_safe_points():
        Finalized()  # dropped at once: __del__ runs here
        time.sleep(2)  # the held signal is raised here
        pytest.fail("the signal was swallowed")


def test_a_signal_in_the_jit_compiler_waits_until_it_returns_and_says_so(monkeypatch, capsys,
                                                                        sigint_as_in_a_terminal):
    jit = {"__name__": "numba.core.fake", "os": os}
    compile_ = type(_signal_self_then_spin)(_signal_self_then_spin.__code__, jit)  # its frame is in "numba"
    monkeypatch.setattr(interrupts, "SAY_AFTER", -1.0)  # say it at once
    done = []
    with pytest.raises(KeyboardInterrupt), raised_at_safe_points():
        done.append(compile_(signal.SIGINT))
        time.sleep(2)
    assert done == ["finished"]
    assert capsys.readouterr().err.count("stopping once the JIT compiler finishes") == 1


def test_safe_points_keep_an_ignored_sigint_ignored_and_restore_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGALRM)}
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with raised_at_safe_points():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGINT, old)


def test_stale_temporary_files_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    m = _slow_model(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "eqcore.cli", "quantize", str(m), str(tmp_path / "q"),
                             "--solver", "adam", "--steps", "100000", "--no-progress"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(".eqcore" in n for n in os.listdir(tmp_path)):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=60)
    assert _leftovers(tmp_path, {"m"}), "kill -9 should leave a partial output behind"
    rc, _, err = cli("quantize", m, tmp_path / "q", "--steps", "1", "--no-progress", timeout=300)
    assert rc == 0, err
    assert _leftovers(tmp_path, {"m", "q"}) == []


def test_the_writer_streams_each_shard_once(tmp_path, monkeypatch):
    """Disk use is one copy of the output: no second temporary file while a shard is finished."""
    from eqcore.io import fileformat

    seen = []
    real_replace = os.replace

    def spy(a, b, *args, **kw):
        seen.append(sorted(os.listdir(os.path.dirname(os.path.abspath(b)))))
        return real_replace(a, b, *args, **kw)

    monkeypatch.setattr(os, "replace", spy)
    qt = eqcore.quantize(weights(64, 256), steps=1)
    fileformat.save_file({f"w{i}": qt for i in range(5)}, tmp_path / "x.safetensors")
    assert seen and all(len(s) == 1 for s in seen), seen
    src = tmp_path / "m.safetensors"
    st_save(model_tensors(), str(src))
    monkeypatch.setattr(os, "replace", real_replace)
    (tmp_path / "c").mkdir()
    eqcore.quantize_checkpoint(src, tmp_path / "c" / "q.safetensors", progress=False)
    monkeypatch.setattr(os, "replace", spy)
    seen.clear()
    eqcore.quantize_checkpoint(src, tmp_path / "c" / "q.safetensors", overwrite=True, progress=False)
    assert seen and all(len([n for n in s if n != "q.safetensors"]) == 1 for s in seen), seen


LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
           "os.execv(sys.executable, [sys.executable, '-m', 'eqcore.cli', *sys.argv[2:]])")


def test_a_full_disk_is_one_clear_line_and_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE makes every write past 200 kB fail as a full disk would (EFBIG)."""
    m = _slow_model(tmp_path / "m")
    r = subprocess.run([sys.executable, "-c", LIMITED, "200000", "quantize", str(m), str(tmp_path / "q"),
                        "--steps", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    one_line_error(r.returncode, r.stderr, "eqcore quantize: error")
    assert _leftovers(tmp_path, {"m"}) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_output_folder_is_one_clear_line(tmp_path):
    m = _slow_model(tmp_path / "m")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, _, err = cli("quantize", m, ro / "q", "--steps", "1", "--no-progress")
        one_line_error(rc, err, "ermission")
    finally:
        ro.chmod(0o755)


def test_an_output_folder_that_cannot_be_created_is_one_clear_line(tmp_path):
    m = _slow_model(tmp_path / "m")
    (tmp_path / "afile").write_text("x")
    rc, _, err = cli("quantize", m, tmp_path / "afile" / "q", "--steps", "1", "--no-progress")
    one_line_error(rc, err, "afile")


def test_an_invalid_skip_regex_is_one_clear_line(tmp_path):
    src = tmp_path / "m.safetensors"
    st_save(model_tensors(), str(src))
    rc, _, err = cli("quantize", src, tmp_path / "q.safetensors", "--skip", "(", "--no-progress")
    one_line_error(rc, err, "--skip")


def test_debug_shows_the_traceback(tmp_path):
    rc, _, err = cli("quantize", tmp_path / "nope", tmp_path / "q", "--debug")
    assert rc != 0 and "Traceback" in err


def _raw_file(path, header, data=b""):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("header, match", [
    pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested|JSON", id="deep"),  # short id: it goes into the env
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "dtype"),
    ({"a": {"dtype": "F32", "shape": [10**20], "data_offsets": [0, 4]}}, "shape|bytes"),
    ({"a": {"dtype": "F32", "shape": [2**62, 2**2], "data_offsets": [0, 0]}}, "do not hold"),
    ({"a": {"dtype": "U8", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}, "do not hold"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "shape"),
    ({"a": "F32"}, "dtype"),
])
def test_malformed_headers_are_clear_format_errors(tmp_path, header, match):
    p = tmp_path / "bad.safetensors"
    _raw_file(p, header, b"\0" * 4)
    with pytest.raises(FormatError, match=match):
        eqcore.load_file(p)
    rc, _, err = cli("inspect", p)
    one_line_error(rc, err)


@pytest.mark.parametrize("field, value, match", [
    ("bits", 4.0, "bits"),
    ("bits", True, "bits"),
    ("sigma", "three", "sigma"),
    ("sigma", -1, "sigma"),
    ("rel_error", "small", "rel_error"),
    ("rel_error", float("nan"), "rel_error"),
    ("group_size", 32.5, "group_size"),
    ("shape", [12, "96"], "shape"),
    ("dtype", ["float16"], "dtype"),
])
def test_bad_metadata_values_are_refused_at_load(tmp_path, field, value, match):
    path, _ = _quantized_file(tmp_path)
    _rewrite_raw(path, tmp_path / "bad.safetensors", meta_fn=_set_meta(field, value))
    with pytest.raises(FormatError, match=match):
        eqcore.load_file(tmp_path / "bad.safetensors")
    rc, _, err = cli("inspect", tmp_path / "bad.safetensors")
    one_line_error(rc, err, match)


def test_outputs_follow_the_umask(tmp_path):
    m = write_sharded(tmp_path / "m")
    old = os.umask(0o022)
    try:
        eqcore.quantize_checkpoint(m, tmp_path / "q", progress=False)
        eqcore.quantize_checkpoint(m / "model-00001-of-00002.safetensors", tmp_path / "q1.safetensors",
                                   progress=False)
        eqcore.save_file({"a": np.ones(3, np.float32)}, tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o755
    for p in [tmp_path / "q" / "model-00001-of-00002.safetensors", tmp_path / "q" / INDEX,
              tmp_path / "q1.safetensors", tmp_path / "s.safetensors"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
