"""``eqcore generate``: greedy text from a quantized causal-LM folder, with speed and memory."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

__all__ = ["generate", "linear_bytes"]


def generate(path, prompt: str, max_new_tokens: int = 32) -> dict:
    """Greedy continuation of ``prompt`` by the model in folder ``path`` (an ``eqcore quantize``
    output of a transformers causal LM, with its tokenizer). Returns the text, the new token ids,
    tokens/s of the generation loop (after an untimed two-token warm-up, which compiles the
    kernels on a first run: ``warmup_seconds``), the peak resident memory of this process and the
    bytes the linear weights take (stored, and what the kernels keep beside them) against their
    fp16 size."""
    import torch
    import transformers

    from .torch import load_pretrained

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder (no config.json)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{path} has no usable tokenizer ({' '.join(str(e).split())[:200]})") from None
    model = load_pretrained(path)
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt gives no tokens")
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=min(2, max_new_tokens), **options)  # the prompt's and one token's kernels
        warmup = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, **options)
        seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    stored, kept, fp16 = linear_bytes(model)
    return {"text": tok.decode(new, skip_special_tokens=True), "tokens": new, "seconds": seconds,
            "tokens_per_s": len(new) / seconds if seconds > 0 else float("inf"), "warmup_seconds": warmup,
            "peak_rss": _peak_rss(),
            "linear_bytes": stored, "linear_kept_bytes": kept, "linear_fp16_bytes": fp16}


def linear_bytes(model) -> tuple[int, int, int]:
    """(bytes stored, bytes the matmul keeps beside them (:meth:`eqcore.QuantizedTensor.derived_nbytes`,
    after a forward pass), bytes in fp16) of the :class:`eqcore.torch.QuantizedLinear` weights of ``model``."""
    from .torch import QuantizedLinear

    layers = [m.quantized for m in model.modules() if isinstance(m, QuantizedLinear)]
    return (sum(q.nbytes for q in layers), sum(q.derived_nbytes() for q in layers),
            sum(2 * q.shape[0] * q.shape[1] for q in layers))


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes: Linux's VmHWM, the high-water mark of this
    program's own memory. (``ru_maxrss`` keeps the parent's peak across the exec that started a
    child process, so a process started by a large one reported the parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
