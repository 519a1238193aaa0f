"""Array interop: NumPy and CuPy pass through; torch, JAX and other DLPack arrays are
converted without copying where possible (bfloat16 included)."""
from __future__ import annotations

import numpy as np

from .backend import is_cupy
from .dtypes import bfloat16


def as_array(a):
    """NumPy or CuPy view of ``a`` (NumPy, CuPy, torch, JAX, or any DLPack producer)."""
    if isinstance(a, np.ndarray) or is_cupy(a):
        return a
    mod = type(a).__module__
    if mod.startswith("torch"):
        return _from_torch(a)
    if hasattr(a, "__dlpack_device__"):
        dev_type, _ = a.__dlpack_device__()
        if dev_type == 1:  # kDLCPU
            try:
                return np.from_dlpack(a)
            except (BufferError, TypeError, RuntimeError):
                return np.asarray(a)  # e.g. JAX bfloat16, which NumPy's DLPack does not know
        import cupy

        return cupy.from_dlpack(a)
    if isinstance(a, (str, bytes, dict)) or a is None:
        raise TypeError(f"expected an array, got {type(a).__name__}")
    return np.asarray(a)  # array_like: lists, scalars, objects with __array__


def to_host(a) -> np.ndarray:
    """NumPy copy of a CuPy array; NumPy arrays pass through."""
    return a.get() if is_cupy(a) else np.asarray(a)


def to_backend(a, backend: str):
    """``a`` moved to the GPU for backend "cupy"; unchanged otherwise."""
    if backend == "cupy" and not is_cupy(a):
        import cupy

        return cupy.asarray(a)
    return a


def _from_torch(t):
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        bits = _from_torch(t.view(torch.int16))
        return bits.view(bfloat16)  # NumPy via ml_dtypes; CuPy >= 14 knows ml_dtypes.bfloat16 too
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t)
    return np.from_dlpack(t)
