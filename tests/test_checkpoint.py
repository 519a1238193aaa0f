"""Whole checkpoints through the API and the `eqcore` command line."""
import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from eqcore.config import QuantConfig
from eqcore.io.checkpoint import dequantize_checkpoint, inspect_checkpoint, quantize_checkpoint
from eqcore.io.folders import INDEX
from eqcore.cli import main
from eqcore.io.fileformat import load_file
from eqcore.io.safetensors import SafetensorsReader, SafetensorsWriter
from eqcore.tensor import QuantizedTensor

from helpers import weights

BF16 = np.dtype(ml_dtypes.bfloat16)


def _model(dtype=BF16):
    return {
        "model.embed_tokens.weight": weights(100, 64, seed=1, dtype=dtype),
        "model.layers.0.self_attn.q_proj.weight": weights(64, 64, seed=2, dtype=dtype),
        "model.layers.0.mlp.up_proj.weight": weights(96, 64, seed=3, dtype=dtype),
        "model.layers.0.input_layernorm.weight": np.ones(64, dtype=dtype),
        "model.layers.1.mlp.down_proj.weight": weights(64, 96, seed=4, dtype=dtype),
        "model.layers.1.tiny.weight": weights(8, 64, seed=5, dtype=dtype),
        "lm_head.weight": weights(100, 64, seed=6, dtype=dtype),
    }


def _write(path, tensors):
    with SafetensorsWriter(path) as w:
        for k, v in tensors.items():
            w.add(k, v)


def _sharded(folder, tensors, n_shards=2):
    folder.mkdir()
    names = list(tensors)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::n_shards]}
        _write(folder / shard, part)
        weight_map.update({k: shard for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')


QUANTIZED = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.mlp.down_proj.weight"}


def test_quantize_and_dequantize_a_single_file(tmp_path):
    model = _model()
    _write(tmp_path / "m.safetensors", model)
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", progress=False)
    q = load_file(tmp_path / "q.safetensors")
    assert {k for k, v in q.items() if isinstance(v, QuantizedTensor)} == QUANTIZED
    for k in set(model) - QUANTIZED:  # embeddings, norms, lm_head, tiny matrices: copied exactly
        assert q[k].tobytes() == model[k].tobytes() and q[k].dtype == model[k].dtype
    dequantize_checkpoint(tmp_path / "q.safetensors", tmp_path / "d.safetensors", progress=False)
    with SafetensorsReader(tmp_path / "d.safetensors") as r:
        assert set(r.keys()) == set(model)
        for k in QUANTIZED:
            d, w = r.get(k), model[k]
            assert d.dtype == BF16 and d.shape == w.shape
            err = np.linalg.norm(d.astype(np.float32) - w.astype(np.float32)) / np.linalg.norm(w.astype(np.float32))
            assert 0 < err < 0.15
            assert q[k].outlier_vals.size > 0
            np.testing.assert_array_equal(d[np.abs(w.astype(np.float32)) > 0.2], w[np.abs(w.astype(np.float32)) > 0.2])


def test_sharded_folder_round_trip_keeps_index_and_extra_files(tmp_path):
    model = _model(np.float16)
    _sharded(tmp_path / "src", model)
    quantize_checkpoint(tmp_path / "src", tmp_path / "q", progress=False)
    index = json.loads((tmp_path / "q" / INDEX).read_text())
    # the model's config is kept and marked, so transformers says it does not know the method
    assert json.loads((tmp_path / "q" / "config.json").read_text()) == {
        "model_type": "llama", "quantization_config": {"quant_method": "eqcore", "load_with": "eqcore.torch.load_pretrained"}}
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert "model.layers.0.mlp.up_proj.weight.qweight" in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        (tmp_path / "q" / s).stat().st_size for s in set(index["weight_map"].values())) - sum(
        8 + int.from_bytes((tmp_path / "q" / s).read_bytes()[:8], "little") for s in set(index["weight_map"].values()))
    dequantize_checkpoint(tmp_path / "q", tmp_path / "d", dtype="float32", progress=False)
    index = json.loads((tmp_path / "d" / INDEX).read_text())
    assert set(index["weight_map"]) == set(model)
    assert json.loads((tmp_path / "d" / "config.json").read_text()) == {"model_type": "llama"}
    rows = {r["name"]: r for r in inspect_checkpoint(tmp_path / "q")}
    again = {r["name"]: r for r in inspect_checkpoint(tmp_path / "q", against=tmp_path / "src")}
    for k in QUANTIZED:
        assert rows[k]["rel_error"] == pytest.approx(again[k]["rel_error"], rel=1e-6)
        assert 4.0 < rows[k]["bits_per_weight"] < 6.0


def test_refuses_to_overwrite_and_leaves_nothing_behind_on_error(tmp_path):
    model = _model(np.float32)
    model["model.layers.1.mlp.down_proj.weight"][3, 3] = np.nan
    _sharded(tmp_path / "src", model)
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        quantize_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="down_proj.weight.*NaN"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "new", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    with pytest.raises(ValueError, match="differ from input"):
        quantize_checkpoint(tmp_path / "src", tmp_path / "src", overwrite=True, progress=False)


def test_force_replaces_an_earlier_output_but_not_a_foreign_file(tmp_path):
    _write(tmp_path / "m.safetensors", _model())
    (tmp_path / "q.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match="not an earlier eqcore output"):
        quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", overwrite=True, progress=False)
    assert (tmp_path / "q.safetensors").read_bytes() == b"old"
    (tmp_path / "q.safetensors").unlink()
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", QuantConfig(bits=8), progress=False)
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", QuantConfig(bits=2), overwrite=True,
                        progress=False)
    q = load_file(tmp_path / "q.safetensors")
    assert {v.bits for v in q.values() if isinstance(v, QuantizedTensor)} == {2}
    assert set(q) == set(_model())


def test_quantizing_a_quantized_file_is_refused(tmp_path):
    _write(tmp_path / "m.safetensors", _model())
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q.safetensors", tmp_path / "qq.safetensors", progress=False)


def test_cli_quantize_inspect_dequantize(tmp_path, capsys):
    _write(tmp_path / "m.safetensors", _model())
    assert main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "q.safetensors"), "--bits", "3",
                 "--group-size", "32", "--steps", "50", "--no-progress"]) == 0
    assert main(["inspect", str(tmp_path / "q.safetensors")]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "up_proj" in l)
    assert " 3 " in line and "96x64" in line and "%" in line
    assert main(["dequantize", str(tmp_path / "q.safetensors"), str(tmp_path / "d.safetensors"),
                 "--dtype", "float16", "--no-progress"]) == 0
    with SafetensorsReader(tmp_path / "d.safetensors") as r:
        assert r.get("model.layers.0.mlp.up_proj.weight").dtype == np.float16
        assert r.get("model.embed_tokens.weight").dtype == BF16


def test_cli_reports_errors_without_a_traceback(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", "quantize", str(tmp_path / "bad.safetensors"),
                        str(tmp_path / "o.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", "quantize", str(tmp_path / "nope"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no such file" in r.stderr
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", "quantize", "a", "b", "--bits", "5"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_peak_memory_is_about_one_tensor_not_the_model(tmp_path):
    import tracemalloc

    from eqcore.config import QuantConfig

    def peak(n_tensors):
        src = tmp_path / f"m{n_tensors}.safetensors"
        _write(src, {f"layers.{i}.proj.weight": weights(512, 1024, seed=i) for i in range(n_tensors)})
        tracemalloc.start()
        quantize_checkpoint(src, tmp_path / f"q{n_tensors}.safetensors", QuantConfig(steps=2), progress=False)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    one_tensor = 512 * 1024 * 4
    small, large = peak(2), peak(8)
    assert large < 1.25 * small + one_tensor  # does not grow with the number of tensors
    assert large < 8 * one_tensor             # and stays a few tensors' worth (the model is 8)


@pytest.mark.gpu
def test_checkpoint_on_the_gpu_matches_the_cpu(tmp_path):
    _write(tmp_path / "m.safetensors", _model())
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "cpu.safetensors", backend="numba", progress=False)
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "gpu.safetensors", backend="cupy", progress=False)
    cpu, gpu = inspect_checkpoint(tmp_path / "cpu.safetensors"), inspect_checkpoint(tmp_path / "gpu.safetensors")
    for a, b in zip(cpu, gpu):
        assert a["name"] == b["name"]
        if a["rel_error"] is not None:
            assert b["rel_error"] == pytest.approx(a["rel_error"], rel=1e-4)
    dequantize_checkpoint(tmp_path / "gpu.safetensors", tmp_path / "d.safetensors", backend="cupy", progress=False)
    with SafetensorsReader(tmp_path / "d.safetensors") as r:
        assert r.get("model.layers.0.mlp.up_proj.weight").dtype == BF16


def test_gpu_backend_without_a_gpu_is_a_clear_error(tmp_path):
    from eqcore.backends import gpu_available

    if gpu_available():
        pytest.skip("a GPU is present")
    _write(tmp_path / "m.safetensors", _model())
    assert main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "q.safetensors"),
                 "--backend", "cupy", "--no-progress"]) == 2
    assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("shape", [(1, 7), (3, 1), (97, 4099), (1100, 300)])
def test_error_sums_kernel_matches_the_reference(dtype, shape):
    """The checkpoint's per-chunk error sums from the Numba kernel equal the NumPy reference's
    (to float summation order), chunk by chunk."""
    from eqcore.io.compute import error_sums

    rng = np.random.default_rng(sum(shape))
    w = (rng.standard_normal(shape) * 0.02).astype(dtype)
    w_hat = (w.astype(np.float32) + rng.standard_normal(shape).astype(np.float32) * 1e-3)
    fast, ref = error_sums(w_hat, w), error_sums(w_hat, w, fast=False)
    assert len(fast) == len(ref) and len(ref) >= 1
    np.testing.assert_allclose(np.array(fast), np.array(ref), rtol=1e-12, atol=0)
