"""eqcore: data-free EasyQuant weight quantization (outliers + optimised scales + packing).

    >>> import numpy as np, eqcore
    >>> w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float16)
    >>> qt = eqcore.quantize(w, bits=4)          # outliers at 3 sigma, Adam on scales
    >>> w_hat = eqcore.dequantize(qt)            # float16, outliers restored exactly
    >>> eqcore.save_file({"w": qt}, "w.eq.safetensors")
"""
from .api import dequantize, matmul, pack, quantize, unpack
from .config import QuantConfig
from .errors import FormatError
from .interop import to_jax, to_torch
from .io.checkpoint import dequantize_checkpoint, inspect_checkpoint, quantize_checkpoint
from .io.fileformat import load_file, save_file
from .layout import SUPPORTED_BITS
from .outliers import Outliers, find_outliers
from .tensor import QuantizedTensor

from ._version import __version__

__all__ = [
    "QuantConfig", "SUPPORTED_BITS", "quantize", "dequantize", "matmul", "QuantizedTensor", "FormatError",
    "Outliers", "find_outliers", "pack", "unpack", "save_file", "load_file", "to_torch", "to_jax",
    "quantize_checkpoint", "dequantize_checkpoint", "inspect_checkpoint", "__version__",
]
