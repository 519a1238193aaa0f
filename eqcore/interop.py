"""Array interop, in and out: NumPy and CuPy pass through; torch, JAX and any other DLPack
array come in without copying where possible (bfloat16 included), and results go back out
to torch or JAX the same way (:func:`to_torch`, :func:`to_jax`)."""
from __future__ import annotations

import numpy as np

from .dtypes import bfloat16


def is_cupy(a) -> bool:
    return type(a).__module__.startswith("cupy")


def array_module(a):
    """``cupy`` for CuPy arrays, else ``numpy`` (like ``cupy.get_array_module``)."""
    if is_cupy(a):
        import cupy

        return cupy
    return np


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


def to_torch(a):
    """A torch tensor sharing ``a``'s memory (NumPy -> CPU tensor, CuPy -> CUDA tensor);
    bfloat16 arrays become torch.bfloat16."""
    import torch

    a = as_array(a)
    if a.dtype == bfloat16:
        return to_torch(a.view(np.int16)).view(torch.bfloat16)
    if is_cupy(a):
        return torch.from_dlpack(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch refuses read-only memory


def to_jax(a):
    """A JAX array of ``a`` (zero-copy through DLPack where JAX allows it; bfloat16 kept)."""
    import jax.numpy as jnp

    a = as_array(a)
    if is_cupy(a):
        import jax.dlpack

        return jax.dlpack.from_dlpack(a)
    return jnp.asarray(a)


def _from_torch(t):
    import torch

    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        bits = _from_torch(t.view(torch.int16))
        return bits.view(bfloat16)  # NumPy via ml_dtypes; CuPy >= 14 knows ml_dtypes.bfloat16 too
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t)
    try:
        return t.numpy()  # a view, as from_dlpack gives, in half its time (a layer's forward pays it each call)
    except (TypeError, RuntimeError):  # conjugate or negative views, devices NumPy cannot see
        return np.from_dlpack(t)
