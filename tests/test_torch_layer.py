"""eqcore.torch: QuantizedLinear forward, state_dict, quantize_model and load_quantized."""
import importlib
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file as torch_save_file  # noqa: E402

import eqcore  # noqa: E402
from eqcore.torch import QuantizedLinear, load_quantized, quantize_model  # noqa: E402


def dense(q: QuantizedLinear) -> torch.Tensor:
    return torch.from_numpy(eqcore.dequantize(q.quantized, np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_is_the_dense_layer_of_the_dequantized_weight(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40).to(dtype)
    q = QuantizedLinear.from_linear(lin, bits=4, group_size=32, grid="asymmetric", sigma=1.5)
    x = torch.randn(3, 5, 96).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 5, 40)
    want = torch.nn.functional.linear(x.float(), dense(q), lin.bias.detach().float())
    torch.testing.assert_close(y.float(), want.to(dtype).float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)
    assert q.quantized.outlier_vals.size > 0 and q.bias is not None


@pytest.mark.parametrize("scale_dtype", ["float16", "log8"])
def test_quantized_property_and_state_dict_round_trip(scale_dtype):
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24, bias=False).half()
    qt = eqcore.quantize(lin.weight, bits=3, grid="codebook", col_scales=True, scale_dtype=scale_dtype, group_size=16)
    q = QuantizedLinear(qt)
    for f, a in qt.arrays().items():
        np.testing.assert_array_equal(np.asarray(getattr(q.quantized, f)), np.asarray(a))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    other = QuantizedLinear(eqcore.quantize(np.full((24, 64), 0.5, np.float16), bits=3, grid="codebook",
                                            col_scales=True, scale_dtype=scale_dtype, group_size=16))
    x = torch.randn(2, 64).half()
    before = other(x)  # builds (and keeps) the QuantizedTensor of the old buffers
    assert other.quantized is other.quantized
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other(x), q(x)) and not torch.equal(before, q(x))
    np.testing.assert_array_equal(eqcore.dequantize(other.quantized), eqcore.dequantize(qt))


def test_from_linear_refuses_what_is_not_a_linear():
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantizedLinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="QuantizedTensor"):
        QuantizedLinear(torch.zeros(3, 3))


def _model():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 10))


def test_quantize_model_replaces_linears_except_skipped():
    model = _model()
    x = torch.randn(4, 64)
    ref = model(x).detach()
    quantize_model(model, skip=r"^4$", bits=8)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["QuantizedLinear", "GELU", "QuantizedLinear", "GELU", "Linear"]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=2e-2)


def test_load_quantized_from_a_converted_checkpoint(tmp_path):
    model = _model()
    torch_save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    eqcore.quantize_checkpoint(tmp_path / "model.safetensors", tmp_path / "q.safetensors", skip="", progress=False,
                               min_features=8)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 10))
    load_quantized(fresh, tmp_path / "q.safetensors")
    assert all(isinstance(fresh[i], QuantizedLinear) for i in (0, 2, 4))
    expect = quantize_model(_model(), skip=None)  # same weights, same default settings
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), expect(x), rtol=0, atol=0)
    wrong = torch.nn.Sequential(torch.nn.Linear(64, 100))
    with pytest.raises(ValueError, match="shape"):
        load_quantized(wrong, tmp_path / "q.safetensors")


def test_a_transformers_model_round_trips_through_a_quantized_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    import json

    from eqcore.torch import load_pretrained

    model, _ = _tiny_lm_folder(tmp_path / "float")
    eqcore.quantize_checkpoint(tmp_path / "float", tmp_path / "q", eqcore.QuantConfig(bits=8), progress=False)
    marked = json.loads((tmp_path / "q" / "config.json").read_text())
    assert marked["quantization_config"]["quant_method"] == "eqcore"
    with pytest.MonkeyPatch.context() as mp:  # every weight comes from the file: no random initialisation
        for name in ("normal_", "uniform_", "kaiming_uniform_"):
            mp.setattr(torch.nn.init, name, lambda *a, **k: pytest.fail("a weight was initialised"))
        q = load_pretrained(tmp_path / "q")
    assert sum(isinstance(m, QuantizedLinear) for m in q.modules()) == 2 * 7
    assert q.lm_head.weight is q.model.embed_tokens.weight  # tied as the config says
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    assert torch.allclose(got, ref, atol=5e-2), float((got - ref).abs().max())
    importlib.import_module("eqcore.hf")  # registers quant_method "eqcore" with transformers

    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert sum(isinstance(m, QuantizedLinear) for m in auto.modules()) == 2 * 7
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, got)
    eqcore.dequantize_checkpoint(tmp_path / "q", tmp_path / "back", progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    del marked["quantization_config"]
    (tmp_path / "q" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no .safetensors"):
        load_pretrained(tmp_path / "q")


def test_a_quantized_folder_fails_loudly_in_transformers_without_eqcore(tmp_path):
    """Without ``import eqcore.hf`` transformers skips the unknown quant_method; the empty guard
    under each quantized weight's name then makes it refuse the folder instead of loading random
    weights (a subprocess, so no earlier test's registration of "eqcore" is in effect)."""
    import subprocess
    import sys

    _tiny_lm_folder(tmp_path / "float")
    eqcore.quantize_checkpoint(tmp_path / "float", tmp_path / "q", eqcore.QuantConfig(bits=4), progress=False)
    code = ("import sys, transformers\n"
            "try:\n    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n    sys.exit(3)\n"
            "assert 'eqcore' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "ignore_mismatched_sizes" in r.stdout and "q_proj.weight" in r.stdout + r.stderr


def test_from_pretrained_refuses_a_checkpoint_that_does_not_match_the_model(tmp_path):
    """A quantized layer the model lacks is a clear ValueError from load_quantized, not an
    AttributeError from inside the quantizer."""
    import json

    transformers = pytest.importorskip("transformers")
    _tiny_lm_folder(tmp_path / "float")
    eqcore.quantize_checkpoint(tmp_path / "float", tmp_path / "q", eqcore.QuantConfig(bits=4), progress=False)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    importlib.import_module("eqcore.hf")
    with pytest.raises(ValueError, match=r"layers\.1\..* is quantized but the model has no nn.Linear"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def _tiny_lm_folder(path):
    """A 2-layer Llama with a word-level tokenizer, saved as a transformers folder."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(95)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(words), tie_word_embeddings=True,
                                   eos_token_id=1, bos_token_id=None)
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model, fast


def test_generate_cli_continues_a_prompt_like_the_dequantized_model(tmp_path, capsys):
    from eqcore.cli import main
    from eqcore.generate import generate

    model, tok = _tiny_lm_folder(tmp_path / "float")
    eqcore.quantize_checkpoint(tmp_path / "float", tmp_path / "q", eqcore.QuantConfig(bits=8), progress=False)
    r = generate(tmp_path / "q", "w3 w7 w11", max_new_tokens=12)
    ids = tok("w3 w7 w11", return_tensors="pt").input_ids
    ref = eqcore.torch.load_pretrained(tmp_path / "q")
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=1)[0, ids.shape[1]:].tolist()
    assert r["tokens"] == want and len(want) >= 1
    assert 0 < r["linear_bytes"] < 0.6 * r["linear_fp16_bytes"]  # 8-bit codes + fp16 scales
    assert 0 < r["linear_kept_bytes"] < r["linear_bytes"]  # float32 row scales, level tables: no copy of the weights
    assert main(["generate", str(tmp_path / "q"), "w3 w7 w11", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("w3 w7 w11") and "tokens/s" in err and "of fp16" in err and "kept by the matmul" in err
    assert "warm-up" in err and r["warmup_seconds"] > 0
    assert main(["generate", str(tmp_path / "nowhere"), "w1"]) == 2
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc only")
def test_generate_reports_its_own_peak_memory_not_its_parents():
    """``ru_maxrss`` survives exec: a child of a large process reported the parent's peak (the
    end-to-end bench printed 2438 MiB for both models, its own size). The peak is this program's."""
    import subprocess
    import sys

    big = np.ones(96 << 20)  # 768 MiB, every page touched
    code = "from eqcore.generate import _peak_rss; print(_peak_rss())"
    peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < peak < big.nbytes / 2


def test_forward_validates_once_and_again_after_an_in_place_change(monkeypatch):
    """A layer validates its QuantizedTensor when built, not on every call (on a GPU each
    validation was 2-3 ms of small launches, 100x the GEMV); an in-place change of a buffer,
    which torch counts, or other memory put under a buffer (``.data =``) makes the next call
    validate again and refuse bad values."""
    from eqcore.tensor import FormatError, QuantizedTensor

    torch.manual_seed(3)
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), bits=4, group_size=32)
    x = torch.randn(2, 64)
    y = q(x)
    calls = []
    real = QuantizedTensor.validate
    monkeypatch.setattr(QuantizedTensor, "validate", lambda self: (calls.append(1), real(self))[1])
    assert torch.equal(q(x), y) and torch.equal(q(x), y)
    assert calls == []
    good = q.scales.detach().clone()
    with torch.no_grad():
        q.scales.fill_(float("nan"))
    with pytest.raises(FormatError, match="finite"):
        q(x)
    assert calls
    q.scales.data = good.clone()  # other memory under the same tensor object: built and validated again
    calls.clear()
    assert torch.equal(q(x), y) and calls == [1]
    q.scales.data = torch.full_like(good, float("nan"))
    with pytest.raises(FormatError, match="finite"):
        q(x)


@pytest.mark.parametrize("tile_rows", [None, 5])
def test_many_rows_multiply_by_the_weight_dequantized_in_tiles(monkeypatch, tile_rows):
    """From dense_rows() rows of x the CPU forward is F.linear on W dequantized to float32, a tile of
    whole rows at a time (here one tile, or 5 rows each: 9 tiles of 43 rows), within the matmul
    contract, without the packed kernel; fewer rows, or a float32 matmul precision that lets torch
    round (bf16 / tf32), take the kernel."""
    import eqcore.torch as et
    from eqcore.tensor import QuantizedTensor
    from helpers import assert_matmul_close

    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 43)
    q = QuantizedLinear.from_linear(lin, bits=4, group_size=32, grid="asymmetric", sigma=1.5)
    assert q.quantized.outlier_vals.size > 0
    bias = lin.bias.detach()
    assert et.dense_rows(43 * 96) % 2 == 0 and et.dense_rows(43 * 96) < et.dense_rows(4096 * 4096)
    x = torch.randn(2, et.dense_rows(43 * 96) // 2, 96)
    if tile_rows:
        monkeypatch.setattr(et, "TILE_WEIGHTS", tile_rows * 96)
    kernel, dense_linear = et.matmul, et._dense_linear
    monkeypatch.setattr(et, "matmul", lambda *a, **k: pytest.fail("the packed kernel ran"))
    q(x)  # validates once, as the kernel path does
    validated = []
    real = QuantizedTensor.validate
    monkeypatch.setattr(QuantizedTensor, "validate", lambda self: (validated.append(1), real(self))[1])
    y = q(x)
    assert validated == [] or tile_rows  # not again per call (row blocks are validated as they are built)
    monkeypatch.setattr(QuantizedTensor, "validate", real)
    assert y.shape == (2, et.dense_rows(43 * 96) // 2, 43)
    assert_matmul_close((y - bias).numpy(), x.numpy(), q.quantized)
    tiles = []
    monkeypatch.setattr(et, "_dense_linear", lambda *a: pytest.fail("the dense path ran"))
    monkeypatch.setattr(et, "matmul", lambda *a, **k: (tiles.append(1), kernel(*a, **k))[1])
    assert_matmul_close((q(x[:, :-1]) - bias).numpy(), x[:, :-1].numpy(), q.quantized)  # one row short
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert_matmul_close((q(x) - bias).numpy(), x.numpy(), q.quantized)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(tiles) == 2
    monkeypatch.setattr(et, "_dense_linear", dense_linear)
    monkeypatch.setattr(et, "dequantize", lambda t, *a, **k: (tiles.append(t.shape), eqcore.dequantize(t, *a, **k))[1])
    tiles.clear()
    q(x)
    assert tiles == ([(43, 96)] if tile_rows is None else [(5, 96)] * 8 + [(3, 96)])
