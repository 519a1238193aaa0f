"""eqcore: data-free EasyQuant weight quantization (outliers + optimised scales + packing).

    >>> import numpy as np, eqcore
    >>> w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float16)
    >>> qt = eqcore.quantize(w, bits=4)          # outliers at 3 sigma, Adam on scales
    >>> w_hat = eqcore.dequantize(qt)            # float16, outliers restored exactly
    >>> eqcore.save_file({"w": qt}, "w.eq.safetensors")
"""
from .checkpoint import dequantize_checkpoint, inspect_checkpoint, quantize_checkpoint
from .config import QuantConfig, SUPPORTED_BITS
from .dequant import dequantize
from .fileformat import load_file, save_file
from .outliers import Outliers, find_outliers
from .packing import pack, unpack
from .quantize import quantize
from .tensor import FormatError, QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "QuantConfig", "SUPPORTED_BITS", "quantize", "dequantize", "QuantizedTensor", "FormatError",
    "Outliers", "find_outliers", "pack", "unpack", "save_file", "load_file",
    "quantize_checkpoint", "dequantize_checkpoint", "inspect_checkpoint", "__version__",
]
