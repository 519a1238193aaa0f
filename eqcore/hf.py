"""transformers integration: ``import eqcore.hf`` registers the quantization method "eqcore".

After it, ``AutoModelForCausalLM.from_pretrained(out_dir)`` on an ``eqcore quantize`` output
(its config.json carries ``quantization_config: {"quant_method": "eqcore"}``) builds
:class:`eqcore.torch.QuantizedLinear` layers from the packed tensors. transformers first loads
what it knows (the unquantized tensors); then every tensor of the checkpoint is put in place by
:func:`eqcore.torch.load_quantized`, which refuses a checkpoint that does not match the model.
"""
from __future__ import annotations

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .io.fileformat import PARTS, quantized_names
from .io.safetensors import SafetensorsReader
from .torch import load_quantized

__all__ = ["EqcoreConfig", "EqcoreHfQuantizer"]

METHOD = "eqcore"


class EqcoreConfig(QuantizationConfigMixin):
    """The ``quantization_config`` eqcore writes: quant_method "eqcore" (the tensors describe
    their own bits, grid and scales in the file's metadata)."""

    def __init__(self, load_with: str | None = None, **kwargs):
        self.quant_method = METHOD
        self.load_with = load_with

    def to_dict(self) -> dict:
        return {"quant_method": METHOD, "load_with": self.load_with}


class EqcoreHfQuantizer(HfQuantizer):
    """Loads eqcore checkpoints (pre-quantized only: quantize with ``eqcore quantize``)."""

    requires_calibration = True  # transformers' word for "loads pre-quantized weights only"

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files = None

    def validate_environment(self, *args, **kwargs):
        return None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("eqcore checkpoints load from local safetensors files only")
        self.checkpoint_files = list(checkpoint_files)
        # the packed entries (<name>.qweight, .scales, ...) are eqcore's, not unexpected
        parts = "|".join(PARTS)
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {
            rf"\.({parts})$"}
        # a quantized layer's <name>.weight is stored as an empty guard (eqcore.io.fileformat): its
        # parameter becomes empty too, so transformers takes the guard for it; the layer itself
        # comes from the packed tensors after loading; names the model lacks are left to
        # load_quantized, which refuses the checkpoint with a clear error
        modules = dict(model.named_modules())
        for f in self.checkpoint_files:
            for name in _quantized_names(f):
                owner, _, leaf = name.rpartition(".")
                m = modules.get(owner) if leaf == "weight" else None
                if isinstance(m, torch.nn.Linear):
                    m.weight = torch.nn.Parameter(m.weight.new_empty(0), requires_grad=False)

    def _process_model_after_weight_loading(self, model, **kwargs):
        return load_quantized(model, self.checkpoint_files).eval()

    def is_serializable(self, safe_serialization=None) -> bool:
        return False  # save with eqcore (quantize_checkpoint), not save_pretrained

    @property
    def is_trainable(self) -> bool:
        return False


def _quantized_names(path) -> list[str]:
    with SafetensorsReader(path) as r:
        return list(quantized_names(r))


if METHOD not in AUTO_QUANTIZER_MAPPING:  # importing twice (a reload) registers once
    register_quantization_config(METHOD)(EqcoreConfig)
    register_quantizer(METHOD)(EqcoreHfQuantizer)
