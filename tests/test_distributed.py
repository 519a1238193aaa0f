"""Checkpoints converted on a Dask cluster (a LocalCluster of 2 worker processes, 1 thread each):
bit-identical to one process, sharded in and out, a failing tensor, a worker killed mid-run."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from eqcore.cli import main
from eqcore.config import QuantConfig
from eqcore.io import distributed as dist
from eqcore.io.checkpoint import quantize_checkpoint
from eqcore.io.folders import INDEX
from eqcore.io.safetensors import SafetensorsWriter
from eqcore.outliers import row_chunks
from eqcore.tensor import QuantizedTensor

from helpers import weights

pytest.importorskip("distributed")

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def client():
    with dist.cluster_client(workers=2) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


def _write(path, tensors):
    with SafetensorsWriter(path, {"format": "pt"}) as w:
        for k, v in tensors.items():
            w.add(k, v)


def _model():
    return {
        "model.embed_tokens.weight": weights(100, 64, seed=1, dtype=BF16),
        "model.layers.0.self_attn.q_proj.weight": weights(64, 64, seed=2, dtype=BF16),
        "model.layers.0.mlp.up_proj.weight": weights(1100, 256, seed=3, dtype=BF16),  # 2 row chunks
        "model.layers.0.input_layernorm.weight": np.ones(64, dtype=BF16),
        "model.layers.1.mlp.down_proj.weight": weights(2100, 256, seed=4),             # 3 row chunks, fp32
        "model.layers.1.tiny.weight": weights(8, 64, seed=5, dtype=BF16),
        "lm_head.weight": weights(100, 64, seed=6, dtype=BF16),
    }


def _sharded(folder, tensors, n_shards=2):
    folder.mkdir()
    (folder / "sub").mkdir()
    weight_map = {}
    for i in range(n_shards):
        shard = f"sub/model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in list(tensors)[i::n_shards]}
        _write(folder / shard, part)
        weight_map.update({k: shard for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    (folder / "config.json").write_text('{"model_type": "llama"}')


def _files(root: Path) -> dict:
    root = Path(root)
    if root.is_file():
        return {".": root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_blocks(monkeypatch):
    """Split tensors above one row chunk (2^18 weights) into row blocks, as large ones would be."""
    monkeypatch.setattr(dist, "SPLIT_ELEMENTS", 1 << 18)


def test_row_blocks_cover_the_rows_in_whole_chunks():
    cfg = QuantConfig()
    for shape in [(1100, 256), (5000, 100), (3, 1 << 20), (4096, 4096)]:
        chunk_starts = {c.start for c in row_chunks(shape)}
        for split in (1 << 18, 1 << 20, 3 << 19):
            blocks = dist.row_blocks(shape, cfg, split)
            if blocks == [None]:
                assert shape[0] * shape[1] <= split or len(chunk_starts) == 1
                continue
            assert blocks[0][0] == 0 and blocks[-1][1] == shape[0]
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert all(b[0] in chunk_starts for b in blocks)
            one_chunk = {(c.start, min(c.stop, shape[0])) for c in row_chunks(shape)}
            assert all((b[1] - b[0]) * shape[1] <= split or b in one_chunk for b in blocks)
    # settings that look at the whole tensor are never split
    for cfg in (QuantConfig.paper(), QuantConfig(outliers="budget"), QuantConfig(col_scales=True),
                QuantConfig(grid="codebook")):
        assert dist.row_blocks((4096, 4096), cfg, 1 << 18) == [None]
    assert len(dist.row_blocks((4096, 4096), QuantConfig(grid="codebook", codebook="nf"), 1 << 18)) == 64


def test_stack_rows_inverts_row_block():
    import eqcore

    qt = eqcore.quantize(weights(300, 96, seed=7), group_size=32, grid="asymmetric", sigma=2.0)
    assert qt.outlier_vals.size > 0
    back = QuantizedTensor.stack_rows([qt.row_block(0, 10), qt.row_block(10, 11), qt.row_block(11, 300)])
    for f, a in qt.arrays().items():
        b = back.arrays()[f]
        assert a.dtype == b.dtype and np.array_equal(a, b), f
    assert back.shape == qt.shape
    other = eqcore.quantize(weights(10, 96, seed=8), bits=3)
    with pytest.raises(ValueError, match="cannot be stacked"):
        QuantizedTensor.stack_rows([qt.row_block(0, 10), other])


def test_a_file_is_bit_identical_to_one_process(client, small_blocks, tmp_path):
    _write(tmp_path / "m.safetensors", _model())
    one = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "one.safetensors", progress=False)
    many = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "many.safetensors", progress=False, client=client)
    assert _files(tmp_path / "many.safetensors") == _files(tmp_path / "one.safetensors")
    assert {k: many[k] for k in one} == one and one["tensors"] == 3
    tasks = sum(w["tasks"] for w in many["workers"].values())
    assert tasks == 1 + 2 + 3  # the two large tensors went out in row blocks
    assert all(address.startswith("tcp://") and w["seconds"] > 0 for address, w in many["workers"].items())
    import numba  # each worker's task thread ran Numba on its share of the cores

    for address in many["workers"]:
        threads = client.submit(numba.get_num_threads, workers=[address], pure=False).result()
        assert threads == max(1, (os.cpu_count() or 1) // 2)
    assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {None}  # glibc keeps freed blocks


def test_sharded_folder_is_bit_identical_with_progress(client, small_blocks, tmp_path, capsys):
    _sharded(tmp_path / "src", _model())
    cfg = QuantConfig(bits=3, group_size=64, grid="asymmetric")
    quantize_checkpoint(tmp_path / "src", tmp_path / "one", cfg, progress=False)
    quantize_checkpoint(tmp_path / "src", tmp_path / "many", cfg, progress=True, client=client)
    assert "quantize 3/3 tensors" in capsys.readouterr().err
    one, many = _files(tmp_path / "one"), _files(tmp_path / "many")
    assert set(one) == {INDEX, "config.json", ".eqcore-manifest.json", "sub/model-00001-of-00002.safetensors",
                        "sub/model-00002-of-00002.safetensors"}
    assert many == one


def test_paper_settings_are_bit_identical_unsplit(client, small_blocks, tmp_path):
    _write(tmp_path / "m.safetensors", _model())
    cfg = QuantConfig.paper(steps=20)
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "one.safetensors", cfg, progress=False)
    many = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "many.safetensors", cfg, progress=False,
                               client=client)
    assert _files(tmp_path / "many.safetensors") == _files(tmp_path / "one.safetensors")
    assert sum(w["tasks"] for w in many["workers"].values()) == 3


def test_backpressure_bounds_the_tasks_not_yet_written(client, monkeypatch, tmp_path):
    _write(tmp_path / "m.safetensors", {f"l.{i}.w": weights(64, 64, seed=i) for i in range(12)})
    monkeypatch.setattr(dist, "IN_FLIGHT_PER_THREAD", 1)  # a window of 2 tasks on 2 threads
    submitted, seen = [], []  # tasks submitted and not yet taken for writing, at each take
    submit, take = client.submit, dist.RemoteQuantizer.take
    monkeypatch.setattr(client, "submit", lambda *a, **k: submitted.append(1) or submit(*a, **k))
    monkeypatch.setattr(dist.RemoteQuantizer, "take",
                        lambda self, name: seen.append(len(submitted) - len(seen)) or take(self, name))
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "q.safetensors", progress=False, client=client)
    assert len(submitted) == len(seen) == 12 and max(seen) == 2


def test_client_memory_does_not_grow_with_the_model(client, tmp_path):
    import tracemalloc

    def peak(n_tensors):
        src = tmp_path / f"m{n_tensors}.safetensors"
        _write(src, {f"layers.{i}.proj.weight": weights(512, 1024, seed=i) for i in range(n_tensors)})
        tracemalloc.start()
        quantize_checkpoint(src, tmp_path / f"q{n_tensors}.safetensors", progress=False, client=client)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    one_tensor = 512 * 1024 * 4
    small, large = peak(2), peak(12)
    assert large < 1.25 * small + one_tensor / 4  # not with the number of tensors
    assert large < one_tensor                     # the client never reads an input tensor, only packed results


def test_a_failing_tensor_fails_cleanly_and_names_it(client, tmp_path):
    model = _model()
    bad = weights(64, 64, seed=9)
    bad[3, 5] = np.nan
    model["model.layers.1.self_attn.o_proj.weight"] = bad
    _sharded(tmp_path / "src", model)
    before = _files(tmp_path / "src")
    for dst in ("out", "out.safetensors"):
        src = tmp_path / "src" if dst == "out" else tmp_path / "src" / "sub" / "model-00002-of-00002.safetensors"
        with pytest.raises(ValueError, match=r"tensor 'model.layers.1.self_attn.o_proj.weight'.*NaN"):
            quantize_checkpoint(src, tmp_path / dst, progress=False, client=client)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no partial files
    assert _files(tmp_path / "src") == before
    deadline = time.time() + 10  # every task of the failed run was cancelled
    while any(str(k).startswith("eqcore-quantize") for k in client.futures) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(str(k).startswith("eqcore-quantize") for k in client.futures)


def test_cli_scheduler_and_workers(client, tmp_path, capsys):
    _write(tmp_path / "m.safetensors", _model())
    assert main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "one.safetensors"), "--no-progress"]) == 0
    assert main(["quantize", str(tmp_path / "m.safetensors"), str(tmp_path / "many.safetensors"), "--no-progress",
                 "--scheduler", client.scheduler.address]) == 0
    out = capsys.readouterr()
    assert "3 tensors quantized" in out.out and out.err.count("  worker tcp://") >= 1
    assert _files(tmp_path / "many.safetensors") == _files(tmp_path / "one.safetensors")
    assert main(["quantize", "a", "b", "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "eqcore quantize: error: --workers must be at least 1, got 0"
    with pytest.raises(SystemExit):
        main(["quantize", "a", "b", "--workers", "2", "--scheduler", "tcp://x:1"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_workers_starts_a_local_cluster(tmp_path):
    """As a user runs it, end to end in a new process."""
    _write(tmp_path / "m.safetensors", _model())
    r = subprocess.run([sys.executable, "-m", "eqcore.cli", "quantize", str(tmp_path / "m.safetensors"),
                        str(tmp_path / "many.safetensors"), "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "quantize 3/3 tensors" in r.stderr and r.stderr.count("  worker tcp://") >= 1
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "one.safetensors", progress=False)
    assert _files(tmp_path / "many.safetensors") == _files(tmp_path / "one.safetensors")


def test_without_dask_the_error_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["quantize", "a", "b", "--workers", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("eqcore quantize: error: running on a Dask cluster needs "
                                               "dask.distributed: pip install eqcore[dask]")


def test_a_worker_killed_mid_run_is_replaced_and_the_output_is_complete(client, tmp_path):
    """Last in the file: the nanny restarts the killed worker, which takes a moment."""
    model = {f"model.layers.{i}.mlp.up_proj.weight": weights(256, 512, seed=i, dtype=BF16) for i in range(16)}
    _write(tmp_path / "m.safetensors", model)
    cfg = QuantConfig(solver="adam", steps=2500)  # tasks of a few tenths of a second
    quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "one.safetensors", cfg, progress=False)
    pids = client.run(os.getpid)
    target = sorted(pids)[0]
    state = {"finished": False}

    def kill_when_busy():
        deadline = time.time() + 60
        while time.time() < deadline and not state["finished"]:
            if any(str(k).startswith("eqcore-quantize") for k in client.processing().get(target, ())):
                state["killed_before_finish"] = not state["finished"]
                os.kill(pids[target], signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    try:
        many = quantize_checkpoint(tmp_path / "m.safetensors", tmp_path / "many.safetensors", cfg, progress=False,
                                   client=client)
    finally:
        state["finished"] = True
        killer.join()
    assert state.get("killed_before_finish") is True
    with pytest.raises(ProcessLookupError):
        os.kill(pids[target], 0)
    assert _files(tmp_path / "many.safetensors") == _files(tmp_path / "one.safetensors")
    assert many["tensors"] == 16
    client.wait_for_workers(2, timeout=60)
