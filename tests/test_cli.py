"""The command line and the data type's face to a new user: help texts, messages, totals, repr."""
import argparse
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file as st_save

import eqcore
from eqcore.cli import build_parser, main
from eqcore.io.safetensors import SafetensorsReader

from helpers import weights


def _model(tmp_path):
    src = tmp_path / "m.safetensors"
    st_save({"layers.0.q.weight": weights(32, 64, seed=1, dtype=np.float16),
             "layers.0.norm.weight": np.ones(64, np.float32),
             "embed_tokens.weight": weights(40, 32, seed=2, dtype=np.float32)}, str(src))
    return src


def test_every_option_has_help_text():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing
    assert set(sub.choices) == {"quantize", "dequantize", "inspect", "generate", "demo"}


def test_output_exists_message_speaks_cli(tmp_path, capsys):
    src = _model(tmp_path)
    (tmp_path / "q.safetensors").write_bytes(b"")
    assert main(["quantize", str(src), str(tmp_path / "q.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pass --force" in err and "overwrite=True" not in err
    with pytest.raises(FileExistsError, match="overwrite=True"):  # the API names its own argument
        eqcore.quantize_checkpoint(src, tmp_path / "q.safetensors", progress=False)


def test_inspect_prints_a_totals_row(tmp_path, capsys):
    src = _model(tmp_path)
    assert main(["quantize", str(src), str(tmp_path / "q.safetensors"), "--steps", "5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q.safetensors")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    total = lines[-1]
    assert total.startswith("all 1 quantized of 3 tensors") and "2,048w" in total
    qt = eqcore.load_file(tmp_path / "q.safetensors")["layers.0.q.weight"]
    assert f"{qt.bits_per_weight:.3f}" in total


def test_dequantize_progress_counts_weights_not_stored_elements(tmp_path, capsys):
    src = _model(tmp_path)
    eqcore.quantize_checkpoint(src, tmp_path / "q.safetensors", skip="", progress=False)
    main(["dequantize", str(tmp_path / "q.safetensors"), str(tmp_path / "d.safetensors")])
    err = capsys.readouterr().err
    done = re.findall(r"(\d[\d.]*k?)/(\d[\d.]*k?) ", err)
    assert done and done[-1][0] == done[-1][1], err[-500:]  # ends at exactly 100%
    assert "100%" in err and not re.search(r"1[0-9][1-9]%|[2-9]\d\d%", err)


def test_dequantize_all_floats_casts_every_float_tensor(tmp_path):
    src = _model(tmp_path)
    eqcore.quantize_checkpoint(src, tmp_path / "q.safetensors", progress=False)
    assert main(["dequantize", str(tmp_path / "q.safetensors"), str(tmp_path / "d.safetensors"), "--dtype",
                 "bfloat16", "--all-floats", "--no-progress"]) == 0
    with SafetensorsReader(tmp_path / "d.safetensors") as r:
        assert {k: r.info(k)[0] for k in r.keys()} == {k: np.dtype(ml_dtypes.bfloat16) for k in r.keys()}
    assert main(["dequantize", str(tmp_path / "q.safetensors"), str(tmp_path / "d2.safetensors"), "--dtype",
                 "float16", "--no-progress"]) == 0
    with SafetensorsReader(tmp_path / "d2.safetensors") as r:  # without it, only the quantized weights change
        assert r.info("layers.0.norm.weight")[0] == np.float32 and r.info("layers.0.q.weight")[0] == np.float16


def test_repr_is_a_summary_not_arrays():
    qt = eqcore.quantize(weights(64, 256, dtype=np.float16), steps=2)
    text = repr(qt)
    assert text.startswith("QuantizedTensor(shape=(64, 256), dtype=float16, bits=4, group_size=row")
    assert "bits_per_weight=" in text and "outliers=" in text and "array(" not in text and len(text) < 200
