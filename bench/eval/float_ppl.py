"""Float (dequantized fp32) perplexity of SmolLM2-135M under the eqcore protocol.

    python -m bench.eval.float_ppl [--split test] [--n-tokens 8192] [--llama-cpp]

Prints the NumPy forward's perplexity and wall/CPU time; with --llama-cpp also
the perplexity llama-cpp-python gives on exactly the same windows/targets,
(a) running the shipped Q4_1 file and (b) running an all-F32 export of the
dequantized weights with an F32 KV cache.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np

from bench.eval import (PROTOCOL, export_f32_gguf, find_model_file, load_model,
                               nll_windows, split_tokens)
from bench.eval.perplexity import log_softmax_nll


def llama_cpp_nll(path, toks, ctx, stride, f32_kv):
    import llama_cpp

    kw = dict(type_k=0, type_v=0, flash_attn=False) if f32_kv else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                          logits_all=True, verbose=False, n_threads=os.cpu_count(), **kw)
    out, prev_end, begin, n = [], 1, 0, len(toks)
    while prev_end < n:            # same windows/targets as nll_windows
        end = min(begin + ctx, n)
        start = max(prev_end, begin + 1)
        if start >= end:
            break
        inp = toks[begin:end - 1]
        llm.reset()
        llm.eval(inp.tolist())
        logits = np.array(llm.scores[:len(inp)], dtype=np.float32)
        out.append(log_softmax_nll(logits[start - begin - 1:], toks[start:end]))
        prev_end = end
        begin += stride
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test", choices=["tune", "test"])
    ap.add_argument("--n-tokens", type=int, default=PROTOCOL.n_tokens)
    ap.add_argument("--ctx", type=int, default=PROTOCOL.ctx)
    ap.add_argument("--stride", type=int, default=PROTOCOL.stride)
    ap.add_argument("--llama-cpp", action="store_true")
    args = ap.parse_args()

    w, cfg = load_model()
    toks = split_tokens(args.split, n_tokens=args.n_tokens)
    t0, c0 = time.time(), time.process_time()
    nll = nll_windows(w, toks, ctx=args.ctx, stride=args.stride, config=cfg)
    wall, cpu = time.time() - t0, time.process_time() - c0
    print(f"[numpy fp32] split={args.split} tokens={len(toks)} targets={len(nll)} "
          f"ctx={args.ctx} stride={args.stride} ppl={math.exp(nll.mean()):.4f} "
          f"wall={wall:.1f}s cpu={cpu:.1f}s")
    if args.llama_cpp:
        src = find_model_file()
        nq = llama_cpp_nll(src, toks, args.ctx, args.stride, f32_kv=False)
        print(f"[llama.cpp Q4_1 file, f16 KV] ppl={math.exp(nq.mean()):.4f} "
              f"targets={len(nq)} mean|dNLL|={np.mean(np.abs(nq - nll)):.4f}")
        with tempfile.TemporaryDirectory() as d:
            f32 = os.path.join(d, "f32.gguf")
            export_f32_gguf(src, f32)
            nf = llama_cpp_nll(f32, toks, args.ctx, args.stride, f32_kv=True)
        print(f"[llama.cpp F32 export, f32 KV] ppl={math.exp(nf.mean()):.4f} "
              f"max|dNLL|={np.max(np.abs(nf - nll)):.2e}")


if __name__ == "__main__":
    main()
