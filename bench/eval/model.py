"""Minimal fp32 NumPy forward pass for LLaMA-family causal LMs stored as GGUF.

Only what teacher-forced perplexity needs: token embedding, RMSNorm, rotary
position embedding, grouped-query causal self-attention, SwiGLU MLP, final
norm and (possibly tied) LM head.  No KV cache, no sampling.

Weights are exposed as a plain ``dict[str, np.ndarray]`` (float32) with
Hugging Face ``LlamaForCausalLM`` names and layouts (``W`` is ``(out, in)``;
``y = x @ W.T``).  GGUF stores Q/K projections with rows permuted for
llama.cpp's interleaved RoPE; :func:`load_gguf` undoes that permutation, so the
dict is exactly what a HF checkpoint of the same model would hold (after
dequantization) and the forward uses HF's "rotate-half" RoPE.

Any caller may replace entries of the dict (e.g. each 2-D linear weight by its
quantized-then-dequantized version) and pass the modified dict to
:func:`forward`; nothing is cached between calls.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

__all__ = [
    "LlamaConfig",
    "load_gguf",
    "export_f32_gguf",
    "config_from_gguf",
    "infer_config",
    "linear_weight_names",
    "forward",
    "rope_tables",
]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError("n_heads must be a multiple of n_kv_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")


# ---------------------------------------------------------------- loading

_GGUF_TO_HF = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    """Hugging Face name of a LLaMA GGUF tensor ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_TO_HF and parts[3] == "weight":
        return f"model.layers.{int(parts[1])}.{_GGUF_TO_HF[parts[2]]}.weight"
    raise ValueError(f"unsupported tensor {gguf_name!r}")


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def config_from_gguf(reader) -> LlamaConfig:
    """Read the LLaMA hyper-parameters from an open ``gguf.GGUFReader``."""
    arch = _field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise ValueError(f"only the 'llama' GGUF architecture is supported, got {arch!r}")
    d_model = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", d_model // n_heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError("partial rotary embeddings are not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("RoPE scaling is not supported")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(
        n_layers=int(_field(reader, "llama.block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_ff=int(_field(reader, "llama.feed_forward_length")),
        vocab_size=int(vocab),
        head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in names,
    )


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``convert_hf_to_gguf`` Q/K row permutation.

    GGUF rows of one head are ordered (pair0_re, pair0_im, pair1_re, ...) for
    interleaved RoPE; HF orders them (re_0..re_{d/2-1}, im_0..im_{d/2-1}).
    """
    out, inp = w.shape
    hd = out // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp))


def _permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF -> GGUF row order (llama.cpp ``convert_hf_to_gguf`` permute)."""
    out, inp = w.shape
    hd = out // n_heads
    return np.ascontiguousarray(
        w.reshape(n_heads, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp))


def export_f32_gguf(src_path, dst_path, weights: Mapping[str, np.ndarray] | None = None,
                    max_layers: int | None = None) -> None:
    """Write an all-F32 copy of a LLaMA GGUF (same metadata and vocabulary).

    ``weights`` (HF names/layout, e.g. with quantized-dequantized linears)
    replaces the tensors; ``None`` writes the source's dequantized tensors.
    ``max_layers`` truncates the model (``llama.block_count`` is rewritten).
    Lets llama.cpp act as an independent reference on exactly these weights.
    """
    import gguf

    reader = gguf.GGUFReader(str(src_path))
    cfg = config_from_gguf(reader)
    n_layers = cfg.n_layers if max_layers is None else min(int(max_layers), cfg.n_layers)
    writer = gguf.GGUFWriter(str(dst_path), arch="llama")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_uint32(key, int(gguf.LlamaFileType.ALL_F32))
        elif key == "llama.block_count":
            writer.add_uint32(key, n_layers)
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        name = t.name
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_layers:
            continue
        if weights is None:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        else:
            arr = np.asarray(weights[hf_name(name)], dtype=np.float32)
            if name.endswith("attn_q.weight"):
                arr = _permute_qk(arr, cfg.n_heads)
            elif name.endswith("attn_k.weight"):
                arr = _permute_qk(arr, cfg.n_kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf(path, max_layers: int | None = None) -> tuple[dict[str, np.ndarray], LlamaConfig]:
    """Dequantize every tensor of a LLaMA GGUF file to float32.

    Returns ``(weights, config)``; ``weights`` uses HF names
    (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``,
    ..., ``model.norm.weight`` and ``lm_head.weight`` only when untied).
    ``max_layers``: load only the first blocks (a truncated model, for tests);
    the returned config then has ``n_layers = max_layers``.
    """
    import gguf  # run-time dependency of the evaluation only

    reader = gguf.GGUFReader(str(path))
    cfg = config_from_gguf(reader)
    if max_layers is not None:
        cfg = dataclasses.replace(cfg, n_layers=min(int(max_layers), cfg.n_layers))
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= cfg.n_layers:
            continue
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.array(arr, dtype=np.float32, order="C")  # own, writable copy
        name = t.name
        if name == "rope_freqs.weight":
            raise ValueError("per-dimension rope frequencies are not supported")
        hf = hf_name(name)
        if name.endswith("attn_q.weight"):
            arr = _unpermute_qk(arr, cfg.n_heads)
        elif name.endswith("attn_k.weight"):
            arr = _unpermute_qk(arr, cfg.n_kv_heads)
        weights[hf] = arr
    _check_shapes(weights, cfg)
    return weights, cfg


def _check_shapes(weights: Mapping[str, np.ndarray], cfg: LlamaConfig) -> None:
    d, hd = cfg.d_model, cfg.head_dim
    exp = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        exp["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        exp[p + "self_attn.q_proj.weight"] = (cfg.n_heads * hd, d)
        exp[p + "self_attn.k_proj.weight"] = (cfg.n_kv_heads * hd, d)
        exp[p + "self_attn.v_proj.weight"] = (cfg.n_kv_heads * hd, d)
        exp[p + "self_attn.o_proj.weight"] = (d, cfg.n_heads * hd)
        exp[p + "mlp.gate_proj.weight"] = (cfg.d_ff, d)
        exp[p + "mlp.up_proj.weight"] = (cfg.d_ff, d)
        exp[p + "mlp.down_proj.weight"] = (d, cfg.d_ff)
        exp[p + "input_layernorm.weight"] = (d,)
        exp[p + "post_attention_layernorm.weight"] = (d,)
    missing = sorted(set(exp) - set(weights))
    if missing:
        raise ValueError(f"missing tensors: {missing[:5]}")
    for k, shp in exp.items():
        if tuple(weights[k].shape) != shp:
            raise ValueError(f"{k}: shape {weights[k].shape} != expected {shp}")


def infer_config(weights: Mapping[str, np.ndarray], head_dim: int = 64,
                 rope_theta: float = 100000.0, rms_eps: float = 1e-5) -> LlamaConfig:
    """Rebuild a config from tensor shapes (head_dim/rope/eps must be given)."""
    n_layers = 0
    while f"model.layers.{n_layers}.self_attn.q_proj.weight" in weights:
        n_layers += 1
    v, d = weights["model.embed_tokens.weight"].shape
    q = weights["model.layers.0.self_attn.q_proj.weight"].shape[0]
    k = weights["model.layers.0.self_attn.k_proj.weight"].shape[0]
    ff = weights["model.layers.0.mlp.gate_proj.weight"].shape[0]
    return LlamaConfig(n_layers=n_layers, d_model=d, n_heads=q // head_dim,
                       n_kv_heads=k // head_dim, d_ff=ff, vocab_size=v,
                       head_dim=head_dim, rope_theta=rope_theta, rms_eps=rms_eps,
                       tie_embeddings="lm_head.weight" not in weights)


def linear_weight_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the 2-D projection matrices to quantize, in layer order.

    Every ``q/k/v/o_proj`` and ``gate/up/down_proj`` weight; the token
    embedding, the (tied or untied) LM head and all norm vectors are excluded.
    """
    def key(name):
        parts = name.split(".")
        return (int(parts[2]), name)

    names = [n for n, w in weights.items()
             if n.startswith("model.layers.") and n.endswith("_proj.weight")
             and np.ndim(w) == 2]
    return sorted(names, key=key)


# ---------------------------------------------------------------- forward

def rope_tables(n_pos: int, head_dim: int, theta: float, offset: int = 0):
    """cos/sin tables ``(n_pos, head_dim)`` for HF rotate-half RoPE (float32)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    pos = np.arange(offset, offset + n_pos, dtype=np.float64)
    ang = np.outer(pos, inv)
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rmsnorm(x, w, eps):
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def _rotate(x, cos, sin):
    # x: (H, T, hd)
    h = x.shape[-1] // 2
    rot = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos + rot * sin


def _silu(x):
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


def _softmax_inplace(s):
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


def forward(weights: Mapping[str, np.ndarray], tokens, config: LlamaConfig | None = None,
            n_layers: int | None = None, logits_from: int = 0) -> np.ndarray:
    """Teacher-forced forward over one sequence; returns logits ``(T, vocab)``.

    ``tokens``: 1-D int sequence (positions start at 0).  ``n_layers``: run only
    the first ``n_layers`` blocks (then final norm and head), for quick tests.
    ``logits_from``: compute the LM head only for positions
    ``>= logits_from`` (the result then has ``T - logits_from`` rows).  All
    arithmetic is float32.
    """
    cfg = config or infer_config(weights)
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    T = toks.shape[0]
    if T == 0:
        raise ValueError("empty token sequence")
    if toks.min() < 0 or toks.max() >= cfg.vocab_size:
        raise ValueError("token id out of range")
    L = cfg.n_layers if n_layers is None else int(n_layers)
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    group = H // Hkv
    f32 = np.float32

    emb = weights["model.embed_tokens.weight"]
    x = np.asarray(emb[toks], dtype=f32)
    cos, sin = rope_tables(T, hd, cfg.rope_theta)
    mask = np.triu(np.full((T, T), -np.inf, dtype=f32), k=1)
    scale = f32(1.0 / np.sqrt(hd))
    eps = f32(cfg.rms_eps)

    for i in range(L):
        p = f"model.layers.{i}."
        h = _rmsnorm(x, weights[p + "input_layernorm.weight"], eps)
        q = (h @ weights[p + "self_attn.q_proj.weight"].T).reshape(T, H, hd).transpose(1, 0, 2)
        k = (h @ weights[p + "self_attn.k_proj.weight"].T).reshape(T, Hkv, hd).transpose(1, 0, 2)
        v = (h @ weights[p + "self_attn.v_proj.weight"].T).reshape(T, Hkv, hd).transpose(1, 0, 2)
        q = _rotate(q, cos, sin)
        k = _rotate(k, cos, sin)
        # GQA: query head j uses kv head j // group
        qg = q.reshape(Hkv, group * T, hd)
        s = (qg @ k.transpose(0, 2, 1)).reshape(Hkv, group, T, T)
        s *= scale
        s += mask
        _softmax_inplace(s)
        o = (s.reshape(Hkv, group * T, T) @ v).reshape(H, T, hd)
        o = o.transpose(1, 0, 2).reshape(T, H * hd)
        x = x + o @ weights[p + "self_attn.o_proj.weight"].T
        h = _rmsnorm(x, weights[p + "post_attention_layernorm.weight"], eps)
        g = h @ weights[p + "mlp.gate_proj.weight"].T
        u = h @ weights[p + "mlp.up_proj.weight"].T
        x = x + (_silu(g) * u) @ weights[p + "mlp.down_proj.weight"].T

    x = _rmsnorm(x[logits_from:], weights["model.norm.weight"], eps).astype(f32, copy=False)
    head = weights.get("lm_head.weight")
    if head is None:
        head = emb
    return x @ head.T
