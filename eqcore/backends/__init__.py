"""Backends: interchangeable implementations of the codec, chosen where the data lives.

    numpy  the reference (eqcore.backends.numpy), readable, slow
    numba  the reference compiled for the CPU, parallel over rows
    cupy   CUDA C kernels (raw_kernels/) launched with CuPy, on the GPU

Each backend module has the same operations with the same signatures (see
:mod:`eqcore.backends.numpy`): ``name``, ``asarray``, ``encode``, ``pack``, ``unpack``,
``dequantize``. Scale solvers are registered apart (:mod:`eqcore.solvers`); a backend may also
do the default quantize in one pass per row (:data:`ONE_PASS`). To add a backend:
write its module and add it to :data:`BACKENDS` (and give the solvers an entry for it).
"""
from __future__ import annotations

import importlib

from ..interop import is_cupy

BACKENDS = {"numpy": "eqcore.backends.numpy", "numba": "eqcore.backends.numba", "cupy": "eqcore.backends.cupy"}
CHOICES = ("auto", *BACKENDS)
ONE_PASS = {"numba": "eqcore.backends.numba_quantize"}  # the default quantize in one pass per row


def one_pass(name: str):
    """Backend ``name``'s ``quantize_rows`` (the default rules' quantize in one pass: split, exact
    scales, rounding and packing), imported on first use; None where it has none."""
    module = ONE_PASS.get(name)
    return None if module is None else importlib.import_module(module).quantize_rows


_MODULES = {}


def get(name: str):
    """The backend module ``name`` (imported on first use)."""
    module = _MODULES.get(name)
    if module is None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
        module = _MODULES[name] = importlib.import_module(BACKENDS[name])
    return module


def gpu_available() -> bool:
    """True when CuPy is installed and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device
        return False


def for_files(backend: str) -> str:
    """The backend for data read from disk: "auto" means the GPU when there is one, else Numba."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        return "cupy" if gpu_available() else "numba"
    if backend == "cupy" and not gpu_available():
        raise ValueError("backend 'cupy' needs CuPy and a CUDA device; none was found (use 'auto' or 'numba')")
    return backend


def select(backend: str, *arrays) -> str:
    """Resolve ``backend`` for the given arrays; "auto" follows where the data lives."""
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    on_gpu = any(is_cupy(a) for a in arrays)
    if backend == "auto":
        return "cupy" if on_gpu else "numba"
    if on_gpu != (backend == "cupy"):
        where = "CuPy (GPU)" if on_gpu else "NumPy (CPU)"
        raise ValueError(f"backend {backend!r} cannot run on {where} arrays; move the data or use backend='auto'")
    return backend
