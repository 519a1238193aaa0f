"""Cross-check bench.eval's NumPy forward against independent runtimes.

    python -m bench.eval.reference_check [--tokens 48] [--ppl-tokens 2048]

References (each skipped when not importable):
  * transformers LlamaForCausalLM (fp32, eager attention) built from a config
    written here and loaded with the SAME dequantized weights -> isolates the
    forward-pass implementation (expect ~1e-4 agreement).
  * llama-cpp-python on the same GGUF file, logits_all=True -> independent
    loader, dequantizer, RoPE convention and tokenizer; note llama.cpp's CPU
    matmuls quantize activations to 8 bits for Q4_1/Q8_0 weights, so only
    ~1e-2..1e-1 logit agreement is expected.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

from bench.eval import (find_model_file, forward, load_model, load_tokenizer,
                               split_tokens)
from bench.eval.perplexity import log_softmax_nll


def stats(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return dict(max_abs=float(np.max(np.abs(a - b))),
                mean_abs=float(np.mean(np.abs(a - b))),
                corr=float(np.corrcoef(a, b)[0, 1]))


def ppl_from_logits(logits, toks):
    return math.exp(float(np.mean(log_softmax_nll(logits[:-1], toks[1:]))))


def transformers_model(weights, cfg):
    """A transformers ``LlamaForCausalLM`` (fp32, eager attention) holding ``weights``."""
    import torch
    import transformers

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
              intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps, hidden_act="silu",
              max_position_embeddings=8192, tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=False, mlp_bias=False)
    try:   # transformers >= 5 keeps rope settings in rope_parameters
        hcfg = transformers.LlamaConfig(
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **kw)
    except TypeError:
        hcfg = transformers.LlamaConfig(rope_theta=cfg.rope_theta, **kw)
    hcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hcfg).float().eval()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def transformers_ref(weights, cfg, toks):
    import torch
    import transformers

    model = transformers_model(weights, cfg)
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(toks, np.int64))[None]).logits[0]
    return out.numpy(), transformers.__version__


def llamacpp_ref(path, toks):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, len(toks) + 8),
                          n_batch=512, n_ubatch=512, logits_all=True, verbose=False,
                          n_threads=2)
    llm.reset()
    llm.eval(list(map(int, toks)))
    logits = np.array(llm.scores[:len(toks)], dtype=np.float32)
    return logits, llama_cpp.__version__, llm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    args = ap.parse_args()

    t0 = time.time()
    weights, cfg = load_model()
    print(f"load_model: {time.time() - t0:.1f}s  {cfg}")
    toks_all = split_tokens("tune", n_tokens=0)
    toks = toks_all[: args.tokens]
    ptoks = toks_all[: args.ppl_tokens]

    t0 = time.time()
    ours = forward(weights, toks, cfg)
    print(f"numpy forward ({len(toks)} tokens): {time.time() - t0:.2f}s")
    ours_p = forward(weights, ptoks, cfg)
    print(f"numpy ppl on first {len(ptoks)} tune tokens (single window): "
          f"{ppl_from_logits(ours_p, ptoks):.4f}")

    try:
        ref, ver = transformers_ref(weights, cfg, toks)
    except ImportError as e:
        print("transformers reference skipped:", e)
    else:
        print(f"transformers {ver}: {stats(ours, ref)}  argmax-agree="
              f"{float(np.mean(ours.argmax(-1) == ref.argmax(-1))):.3f}")
        ref_p, _ = transformers_ref(weights, cfg, ptoks)
        print(f"  transformers ppl ({len(ptoks)} tokens): {ppl_from_logits(ref_p, ptoks):.4f}"
              f"  logits {stats(ours_p, ref_p)}")

    try:
        ref, ver, llm = llamacpp_ref(find_model_file(), toks)
    except ImportError as e:
        print("llama-cpp-python reference skipped:", e)
    else:
        print(f"llama-cpp-python {ver}: {stats(ours, ref)}  argmax-agree="
              f"{float(np.mean(ours.argmax(-1) == ref.argmax(-1))):.3f}")
        ref_p, _, llm = llamacpp_ref(find_model_file(), ptoks)
        print(f"  llama.cpp ppl ({len(ptoks)} tokens): {ppl_from_logits(ref_p, ptoks):.4f}"
              f"  logits {stats(ours_p, ref_p)}")
        # tokenizer cross-check on the whole corpus text
        from bench.eval.data import DOC_SEPARATOR, load_documents
        text = DOC_SEPARATOR.join(load_documents())
        a = load_tokenizer().encode(text, add_special_tokens=False).ids
        b = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        print(f"  tokenizer: ours {len(a)} tokens, llama.cpp {len(b)} tokens, identical={a == b}")


if __name__ == "__main__":
    main()
