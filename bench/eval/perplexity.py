"""Teacher-forced perplexity with a fixed, documented protocol.

Protocol (``PROTOCOL``), all in tokens of the SmolLM2 tokenizer:

* corpus: the 300 Lee news articles (gensim's ``lee_background.cor``), joined
  by a blank line; no BOS token is added (SmolLM2's own tokenizer adds none).
* split: ``tune`` = articles 0..149 (37,785 tokens), ``test`` = articles
  150..299 (37,891 tokens), disjoint, each tokenized on its own.  Use ``tune``
  for every choice of hyper-parameters; report final numbers on ``test`` only.
* from a split the first ``n_tokens`` tokens are scored (default 8192);
  ``n_tokens=0`` takes the whole split (~74 windows) for final tables.
* windows: ``ctx`` = 512, ``stride`` = 512, i.e. disjoint 512-token windows,
  each evaluated from scratch (positions restart at 0).  In general window
  ``k`` covers ``[k*stride, k*stride + ctx)`` and scores the targets not
  scored by the previous window that have at least one token of context in
  the window (the HF sliding-window recipe); with ``stride < ctx`` every
  target after the first window sees at least ``ctx - stride`` tokens.
  With disjoint windows the first token of each window is not a target
  (8192 tokens -> 16 windows, 8176 scored targets).
* ppl = exp(mean negative log-likelihood over scored targets), natural log,
  log-softmax in float64 over fp32 logits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import numpy as np

from .model import LlamaConfig, forward, infer_config

__all__ = ["PROTOCOL", "Protocol", "split_tokens", "perplexity", "nll_windows", "score_windows",
           "log_softmax_nll"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    ctx: int = 512
    stride: int = 512
    n_tokens: int = 8192
    split_at_document: int = 150   # tune = docs[:150], test = docs[150:]


PROTOCOL = Protocol()


def split_documents(documents, split: str, protocol: Protocol = PROTOCOL) -> list:
    """The ``"tune"`` (first ``split_at_document``) or ``"test"`` (the rest) documents."""
    cut = protocol.split_at_document
    if split == "tune":
        return documents[:cut]
    if split == "test":
        return documents[cut:]
    raise ValueError("split must be 'tune' or 'test'")


def split_tokens(split: str, n_tokens: int | None = None, documents=None,
                 tokenizer=None, protocol: Protocol = PROTOCOL) -> np.ndarray:
    """Token stream of the ``"tune"`` or ``"test"`` split, truncated to ``n_tokens``.

    ``n_tokens=None`` means the protocol default; ``n_tokens=0`` or negative
    means the whole split.
    """
    from .data import corpus_tokens, load_documents

    docs = documents if documents is not None else load_documents()
    toks = corpus_tokens(split_documents(docs, split, protocol), tokenizer)
    n = protocol.n_tokens if n_tokens is None else int(n_tokens)
    return toks[:n] if n > 0 else toks


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-row negative log-likelihood of ``targets`` under ``logits`` (float64)."""
    z = logits.astype(np.float64, copy=False)
    m = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=-1)) + m[:, 0]
    return lse - z[np.arange(len(targets)), targets]


def nll_windows(weights: Mapping[str, np.ndarray], tokens, ctx: int = PROTOCOL.ctx,
                stride: int = PROTOCOL.stride, config: LlamaConfig | None = None,
                n_layers: int | None = None, progress=None) -> np.ndarray:
    """NLL (nats) of every scored target, in stream order.

    Every token except the first is scored once, except that with
    ``stride == ctx`` the first token of each later window has no context in
    its window and is skipped (``len(tokens) - 1 - (n_windows - 1)`` targets).
    """
    cfg = config or infer_config(weights)
    return score_windows(tokens, lambda window, first: forward(weights, window, cfg, n_layers=n_layers,
                                                               logits_from=first),
                         ctx=ctx, stride=stride, progress=progress)


def score_windows(tokens, logits_of: Callable, ctx: int = PROTOCOL.ctx, stride: int = PROTOCOL.stride,
                  progress=None) -> np.ndarray:
    """The window plan of :func:`nll_windows` for any model: ``logits_of(window, first)`` returns
    the logits of the window's positions from ``first`` on (row j predicts window[first + j + 1])."""
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if not (0 < stride <= ctx):
        raise ValueError("need 0 < stride <= ctx")
    if toks.size < 2:
        raise ValueError("need at least 2 tokens")
    out = []
    prev_end = 1          # targets [1, prev_end) already scored
    begin = 0
    n = toks.size
    while prev_end < n:
        end = min(begin + ctx, n)
        # a target t needs context inside the window: t >= begin + 1
        start = max(prev_end, begin + 1)
        # logits row j predicts toks[begin + j + 1]; score targets [start, end)
        first = start - begin - 1
        if start >= end:      # only possible for a 1-token tail window
            break
        logits = logits_of(toks[begin:end - 1], first)
        out.append(log_softmax_nll(logits, toks[start:end]))
        if progress is not None:
            progress(end, n)
        prev_end = end
        begin += stride
    return np.concatenate(out)


def perplexity(weights: Mapping[str, np.ndarray], tokens, ctx: int = PROTOCOL.ctx,
               stride: int = PROTOCOL.stride, config: LlamaConfig | None = None,
               n_layers: int | None = None, progress=None) -> float:
    """exp(mean NLL) of ``tokens`` under the model given by ``weights``.

    ``weights`` is the dict from :func:`bench.eval.load_gguf`, possibly
    with any linear weights replaced (same shapes, float32).  ``config``
    defaults to :func:`infer_config` (SmolLM2-135M head_dim/rope/eps).
    """
    nll = nll_windows(weights, tokens, ctx=ctx, stride=stride, config=config,
                      n_layers=n_layers, progress=progress)
    return float(math.exp(float(np.mean(nll))))
