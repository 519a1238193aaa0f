"""bench/peer_quantize.py leaves out a peer that is not installed, and says so."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import peer_quantize  # noqa: E402


def test_a_missing_peer_is_left_out_with_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    out = tmp_path / "peer.md"
    assert peer_quantize.main(["--shapes", "64x128", "--methods", "eqcore default", "bitsandbytes NF4",
                               "--repeat", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "- not measured (not installed): bitsandbytes NF4" in text
    assert "| eqcore default |" in text and "| bitsandbytes NF4 |" not in text
    assert "pip install --no-deps bitsandbytes" in capsys.readouterr().err
