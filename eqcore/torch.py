"""torch integration: :class:`QuantizedLinear` (an ``nn.Linear`` that keeps its weight packed),
:func:`quantize_model` and :func:`load_quantized`.

The forward pass is :func:`eqcore.matmul` on the module's buffers, shared with torch through
DLPack (CPU: the Numba kernels; CUDA: the CuPy backend): the dense weight is never stored. On the
CPU, from :func:`dense_rows` rows of x (a long prompt, a perplexity pass) torch's float32 GEMM is
faster than the packed kernel, so W is dequantized to float32 a tile of rows at a time for
``F.linear`` (the same contract: x @ dequantize(W, float32).T up to summation order).
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .api import dequantize, matmul, quantize
from .config import QuantConfig
from .interop import as_array, to_torch
from .tensor import FIELDS, OPTIONAL, QuantizedTensor

__all__ = ["QuantizedLinear", "quantize_model", "load_quantized", "load_pretrained"]

_VIEWS = {np.dtype(np.uint32): np.int32, np.dtype(np.uint16): np.int16}  # dtypes torch handles fully
TILE_WEIGHTS = 1 << 23  # weights of W per float32 tile when the CPU forward dequantizes it (32 MiB)


def dense_rows(weights: int) -> int:
    """Rows of x from which the CPU forward multiplies by W dequantized (float32 tiles, F.linear)
    rather than by the packed kernel: the lowest crossover measured on a 2-core Zen 5, so that the
    layer is never slower than that path (bench/results/matmul_cpu_large*.md): 176 rows for up to
    4M weights (SmolLM2's 576x1536 lost from 192 rows on 2026-11-30, where torch's GEMM is fast;
    576x576 and 1536x576 from 224-256; an earlier run put all three at 256-320), 320 above
    (LLaMA-7B's 4096x4096 even at 320 rows and behind at 384 that day; 384-512 before)."""
    return 176 if weights <= 1 << 22 else 320


def _to_buffer(a) -> torch.Tensor:
    a = as_array(a)
    view = _VIEWS.get(np.dtype(a.dtype))
    return to_torch(a.view(view) if view is not None else a)


def _from_buffer(t: torch.Tensor, dtype) -> object:
    a = as_array(t)
    return a.view(dtype) if np.dtype(dtype) in _VIEWS else a


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as an eqcore :class:`QuantizedTensor` (packed codes, scales,
    exact outliers); build it with :meth:`from_linear` or from a QuantizedTensor."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(quantized, QuantizedTensor):
            raise TypeError(f"expected a QuantizedTensor, got {type(quantized).__name__}")
        self.out_features, self.in_features = quantized.shape
        self._meta = quantized.metadata()
        self._dtypes = {f: np.dtype(a.dtype) for f, a in quantized.arrays().items()}
        for f, a in quantized.arrays().items():
            self.register_buffer(f, _to_buffer(a))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig | None = None, **options) -> "QuantizedLinear":
        """Quantize an ``nn.Linear``'s weight (``config`` or :class:`QuantConfig` keywords); the
        bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        qt = quantize(linear.weight.detach(), config, **options)
        return cls(qt, linear.bias)

    @property
    def quantized(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (views of this module's buffers), validated. Built and
        validated once, then kept while the buffers stay the same tensors, unchanged: ``.to()``
        and loading replace them, and torch counts in-place changes (``Tensor._version``)."""
        buffers = self._buffers
        cached = self.__dict__.get("_quantized_cache")
        if cached is not None and cached[0] is self._meta and all(
                buffers.get(f) is b and b._version == v and b.data_ptr() == p and b.shape == shape
                for f, b, v, p, shape in cached[1]):
            return cached[2]  # the same buffer tensors, unchanged (in place: _version; ``.data =``: pointer, shape)
        held = [(f, b, b._version, b.data_ptr(), b.shape) for f, b in ((f, buffers[f]) for f in self._dtypes)]
        arrays = {f: _from_buffer(b, self._dtypes[f]) for f, b, *_ in held}
        qt = QuantizedTensor.from_arrays(arrays, self._meta)
        self.__dict__["_quantized_cache"] = (self._meta, held, qt)
        return qt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qweight = self._buffers["qweight"]
        if x.device != qweight.device:
            raise ValueError(f"input on {x.device} but the quantized weight is on {qweight.device}; "
                             "move one of them (module.to(device))")
        xf = (x if x.dtype == torch.float32 else x.float()).contiguous()
        if (qweight.device.type == "cpu"
                and xf.numel() >= dense_rows(self.out_features * self.in_features) * max(1, self.in_features)
                and torch.get_float32_matmul_precision() == "highest"):  # else F.linear may round to bf16 / tf32
            y = _dense_linear(xf.reshape(-1, self.in_features), self.quantized).reshape(*x.shape[:-1], -1)
        else:
            y = to_torch(matmul(xf, self.quantized, check=False))  # validated there
        if self.bias is not None:
            y = y + self.bias.float()
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def get_extra_state(self) -> dict:
        return {"meta": dict(self._meta), "dtypes": {f: str(d) for f, d in self._dtypes.items()}}

    def set_extra_state(self, state: dict) -> None:
        self._meta = dict(state["meta"])
        self._dtypes = {f: _np_dtype(d) for f, d in state["dtypes"].items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for f in (*FIELDS, *OPTIONAL):  # buffers take the shapes of what is loaded
            key = prefix + f
            if key in state_dict and f in self._buffers:
                self._buffers[f] = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        m = self._meta
        group = "row" if m.get("group_size") is None else m["group_size"]
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={m['bits']}, group_size={group}, grid={m.get('grid', 'symmetric')}")


def _dense_linear(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x (n, cols) float32 @ W^T by F.linear on W dequantized to float32, tiles of at most
    TILE_WEIGHTS weights (whole rows) at a time, all written into one buffer; ``qt`` validated by
    the caller (:attr:`QuantizedLinear.quantized`), so not again per call."""
    rows, cols = qt.shape
    step = min(rows, max(1, TILE_WEIGHTS // max(1, cols)))
    tiles = [qt] if step == rows else [qt.row_block(r, min(rows, r + step)) for r in range(0, rows, step)]
    buf = np.empty((step, cols), np.float32)
    parts = [F.linear(x, to_torch(dequantize(t, np.float32, out=buf[:t.shape[0]], check=False))) for t in tiles]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _np_dtype(name: str):
    from .dtypes import bfloat16

    return bfloat16 if name == "bfloat16" else np.dtype(name)


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *, skip: str | None = r"lm_head|embed",
                   progress: bool = False, **options) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` whose qualified name does not match ``skip`` (a
    regex) by a :class:`QuantizedLinear`, in place; returns ``model``."""
    pattern = re.compile(skip) if skip else None
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not (pattern and pattern.search(name))]
    if progress:
        from tqdm.auto import tqdm

        targets = tqdm(targets, desc="quantize", unit="layer")
    for name, m in targets:
        _set(model, name, QuantizedLinear.from_linear(m, config, **options))
    return model


def load_quantized(model: nn.Module, path) -> nn.Module:
    """Put the quantized weights of an eqcore file or folder (``eqcore quantize`` output), or of
    a list of its files (shards), into ``model``: every ``nn.Linear`` whose ``<name>.weight`` is
    quantized there becomes a :class:`QuantizedLinear`, other tensors are loaded as they are.
    Refuses a checkpoint whose names or shapes do not match the model."""
    from pathlib import Path

    from .io.fileformat import load_file

    if isinstance(path, (list, tuple)):
        files = [Path(f) for f in path]
    else:
        path = Path(path)
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no .safetensors file")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    modules = dict(model.named_modules())
    plain, replaced = {}, set()
    for key, value in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if isinstance(value, QuantizedTensor):
            m = modules.get(owner)
            if leaf != "weight" or not isinstance(m, (nn.Linear, QuantizedLinear)):
                raise ValueError(f"{key} is quantized but the model has no nn.Linear {owner!r}")
            if (m.out_features, m.in_features) != value.shape:
                raise ValueError(f"{key}: checkpoint shape {value.shape} != model's "
                                 f"{(m.out_features, m.in_features)}")
            bias = m.bias.detach() if m.bias is not None else None
            bias_key = owner + ".bias"
            if bias_key in tensors:
                bias = to_torch(np.array(tensors[bias_key]))
            _set(model, owner, QuantizedLinear(value, bias).to(_device_of(model, m)))
            replaced.add(owner)
        else:
            plain[key] = value
    state = model.state_dict()
    ptr = {key: t.data_ptr() for key, t in state.items() if isinstance(t, torch.Tensor) and t.numel()}
    given = {ptr.get(key) for key in plain} - {None}
    for key in state:  # every other tensor must come from the file (tied ones under any of their names)
        if key not in plain and key.rpartition(".")[0] not in replaced and ptr.get(key, key) not in given:
            raise ValueError(f"the checkpoint has no {key!r}")
    for key, value in plain.items():
        if key.rpartition(".")[0] in replaced:
            continue  # a quantized layer's bias: it went into the QuantizedLinear
        if key not in state:
            raise ValueError(f"{key} is in the checkpoint but not in the model")
        t = to_torch(np.array(value))
        if tuple(t.shape) != tuple(state[key].shape):
            raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model's {tuple(state[key].shape)}")
        with torch.no_grad():
            state[key].copy_(t)
    return model


def load_pretrained(path, model_class=None, **config_options):
    """A transformers model from an ``eqcore quantize`` output folder: the architecture from its
    config.json (``model_class``, default ``AutoModelForCausalLM``), then :func:`load_quantized`.
    transformers' own ``from_pretrained`` does not know eqcore's tensors."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, **config_options)
    config.__dict__.pop("quantization_config", None)
    cls = model_class or transformers.AutoModelForCausalLM
    with _no_init_weights():  # every weight comes from the file: random ones would only take memory
        model = cls.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # part of the initialisation skipped above
    return load_quantized(model, path).eval()


def _no_init_weights():
    """transformers' context that skips weight initialisation (untouched pages of the float
    linear weights that QuantizedLinear replaces are never resident); a null context if absent."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _device_of(model: nn.Module, m: nn.Module) -> torch.device:
    """Where a replacement for ``m`` belongs: its weight's device, or (a weight still on the meta
    device, as while transformers loads) that of the model's first real parameter, else the CPU."""
    for p in itertools.chain(m.parameters(), model.parameters()):
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
